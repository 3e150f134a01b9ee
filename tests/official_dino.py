"""Our DINO step against the official one (facebookresearch/dino), same weights, same crops.

    python tests/official_dino.py /path/to/facebookresearch/dino [steps]

The official main_dino.py, utils.py and vision_transformer.py are imported at run time from that
folder (a checkout kept outside this repository, never copied here). Both sides start from the
same ViT-pico/8 + DINO head weights and take `steps` AdamW steps on the same multi-crop batches
(official DINOLoss, MultiCropWrapper, get_params_groups, cosine_scheduler, clip_gradients,
cancel_gradients_last_layer, EMA loop); prints the losses and the largest parameter differences
and exits 1 if they are above float32 noise."""
import functools
import os
import sys

import torch
import torch.distributed as tdist
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import dino  # noqa: E402
import train  # noqa: E402


def main(official_dir, steps=20, batch=16, steps_per_epoch=10):
    sys.path.insert(1, official_dir)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    tdist.init_process_group("gloo", rank=0, world_size=1)  # the official DINOLoss all-reduces
    import main_dino as OM
    import utils as OU
    import vision_transformer as OV

    cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, ["--freeze_last_layer", "0", "--drop_path_rate", "0",
                                                           "--batch_size_per_gpu", str(batch)])
    ours = dino.DINO(cfg, steps_per_epoch)
    dim, depth, heads = dino.ARCHS[cfg.arch]
    vit = lambda: OV.VisionTransformer(img_size=[cfg.global_crops_size], patch_size=cfg.patch_size, embed_dim=dim,
                                       depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                       norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    head = lambda: OV.DINOHead(dim, cfg.out_dim, use_bn=False, norm_last_layer=cfg.norm_last_layer,
                               hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    student, teacher = OU.MultiCropWrapper(vit(), head()), OU.MultiCropWrapper(vit(), head())
    student.load_state_dict(ours.student.state_dict(), strict=True)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = OM.DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                          cfg.warmup_teacher_temp_epochs, cfg.epochs)
    opt_off = torch.optim.AdamW(OU.get_params_groups(student))
    lr = OU.cosine_scheduler(cfg.lr * batch / 256, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs)
    wd = OU.cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    mom = OU.cosine_scheduler(cfg.momentum_teacher, 1, cfg.epochs, steps_per_epoch)

    groups = ours.param_groups()
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    images, _ = data.make_synthetic(batch * steps, seed=5)
    augment = data.MultiCrop(cfg.global_crops_size, cfg.local_crops_size, cfg.global_crops_scale,
                             cfg.local_crops_scale, cfg.local_crops_number)
    for it in range(steps):
        crops = augment(images[it * batch:(it + 1) * batch], torch.Generator().manual_seed(it))
        epoch = it // steps_per_epoch
        # the official step (main_dino.py train_one_epoch)
        for i, g in enumerate(opt_off.param_groups):
            g["lr"] = lr[it]
            if i == 0:
                g["weight_decay"] = wd[it]
        loss_off = loss_fn(student(crops), teacher(crops[:2]), epoch)
        opt_off.zero_grad()
        loss_off.backward()
        OU.clip_gradients(student, cfg.clip_grad)
        OU.cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
        opt_off.step()
        with torch.no_grad():
            for q, k in zip(student.parameters(), teacher.parameters()):
                k.data.mul_(mom[it]).add_((1 - mom[it]) * q.detach().data)
        # ours (the train.py loop body)
        sched = train.schedules(cfg, it, steps_per_epoch)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = sched["lr"] * g["lr_mult"], sched["wd"] * g["wd_mult"]
        loss, _ = ours(crops, it)
        opt.zero_grad()
        loss.backward()
        train.clip_gradients(params, cfg.clip_grad)
        opt.step()
        train.ema_update(ours.student, ours.teacher, sched["momentum"])
        print(f"step {it}: loss official {loss_off.item():.6f} ours {loss.item():.6f}")

    def diff(a, b):
        a, b = a.state_dict(), b.state_dict()
        return max((a[k] - b[k]).abs().max().item() for k in b)
    d = {"student": diff(ours.student, student), "teacher": diff(ours.teacher, teacher),
         "center": (ours.center - loss_fn.center).abs().max().item()}
    print("max |ours - official|:", d)
    tdist.destroy_process_group()
    return 0 if max(d.values()) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))
