"""Our SimDINO step against the official one (RobinWu218/SimDINO, folder simdino/): same weights, same crops.

    python tests/official_simdino.py /path/to/RobinWu218/SimDINO [steps]

The official simdino/main_dino.py (MCRLoss, train_one_epoch's step), utils.py (MultiCropWrapper,
get_params_groups, cosine_scheduler, clip_gradients, cancel_gradients_last_layer) and
vision_transformer.py (VisionTransformer, its DINOHead without prototypes) are imported at run
time from that checkout (kept outside this repository, never copied here), in one CPU process:
a Gloo group of one process, no torch.compile (official --compile true only compiles), wandb a
placeholder where not installed. Both sides start from the same ViT-pico/8 + head weights and take
`steps` AdamW steps on the same multi-crop batches (32-pixel global, 16-pixel local crops, batch
16, 2 epochs of 10 steps: every schedule from its warm-up to its end); everything else is our
default against the official main_dino.py defaults. Prints the losses per step and the largest
differences of loss, student and teacher; exits 1 above float32 noise."""
import functools
import os
import sys
import warnings

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import data  # noqa: E402
import simdino  # noqa: E402
import train  # noqa: E402
from official_dinov2 import fmt, one_process_group, our_steps, print_table, stub_missing, worst  # noqa: E402
from vit import ARCHS  # noqa: E402

SIZE = ["--arch", "vit_pico", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--batch_size_per_gpu", "16", "--head_hidden_dim", "256",
        "--head_bottleneck_dim", "64", "--drop_path_rate", "0", "--epochs", "2", "--warmup_epochs", "1",
        "--data", "synthetic"]
STEPS_PER_EPOCH = 10
TOLERANCE = 1e-4


def load_official(folder):
    """main_dino, utils and vision_transformer of the checkout's simdino/ folder."""
    sys.path.insert(1, os.path.join(folder, "simdino"))
    stub_missing({"wandb": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import main_dino as OM
        import utils as OU
        import vision_transformer as OV
    if not OM.__file__.startswith(os.path.abspath(folder)):
        raise RuntimeError(f"main_dino was not imported from {folder}")
    return OM, OU, OV


def main(official_dir, steps=20):
    one_process_group(29535)
    OM, OU, OV = load_official(official_dir)
    cfg = train.config_cli(simdino.SimDINOConfig, simdino.PRESETS, ["--preset", "official", *SIZE])
    B, spe = cfg.batch_size_per_gpu, STEPS_PER_EPOCH
    torch.manual_seed(0)
    ours = simdino.SimDINO(cfg, spe)
    dim, depth, heads = ARCHS[cfg.arch]
    vit = lambda: OV.VisionTransformer(img_size=[cfg.global_crops_size], patch_size=cfg.patch_size, embed_dim=dim,
                                       depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                       norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    head = lambda: OV.DINOHead(dim, cfg.head_bottleneck_dim, use_bn=False, hidden_dim=cfg.head_hidden_dim,
                               bottleneck_dim=cfg.head_bottleneck_dim)
    student, teacher = OU.MultiCropWrapper(vit(), head()), OU.MultiCropWrapper(vit(), head())
    student.load_state_dict(ours.student.state_dict(), strict=True)
    teacher.load_state_dict(ours.teacher.state_dict(), strict=True)
    teacher.requires_grad_(False)
    loss_fn = OM.MCRLoss(cfg.local_crops_number + 2, cfg.reduce_cov, cfg.expa_type, cfg.eps, cfg.coeff)
    try:
        optimizer = torch.optim.AdamW(OU.get_params_groups(student), fused=True)   # as official
    except RuntimeError:   # a torch without fused AdamW on CPU
        optimizer = torch.optim.AdamW(OU.get_params_groups(student))
    lr = OU.cosine_scheduler(cfg.lr * B / 256, cfg.min_lr, cfg.epochs, spe, cfg.warmup_epochs)
    wd = OU.cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, spe)
    mom = OU.cosine_scheduler(cfg.momentum_teacher, 1, cfg.epochs, spe)

    images, _ = data.make_synthetic(B * steps, seed=5)
    augment = data.MultiCrop(cfg.global_crops_size, cfg.local_crops_size, cfg.global_crops_scale,
                             cfg.local_crops_scale, cfg.local_crops_number)
    all_crops = [augment(images[it * B:(it + 1) * B], torch.Generator().manual_seed(it)) for it in range(steps)]
    official = []
    for it, crops in enumerate(all_crops):   # the official step (main_dino.py train_one_epoch)
        epoch = it // spe
        for i, g in enumerate(optimizer.param_groups):
            g["lr"] = lr[it]
            if i == 0:  # only the first group is regularized
                g["weight_decay"] = wd[it]
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss, comp, expa = loss_fn(student_output, teacher_output)
        optimizer.zero_grad()
        loss.backward()
        OU.clip_gradients(student, cfg.clip_grad)
        OU.cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), weight=1. - mom[it])
        official.append((loss.item(), {"comp": comp.item(), "expa": expa.item()}))
    losses = our_steps(ours, cfg, [(c, None) for c in all_crops], spe,
                       lambda logs: {"comp": logs["comp_loss"], "expa": logs["expa_loss"]})

    print_table("SimDINO: the official step against ours",
                [(f[0], o[0], {t: (f[1][t], o[1][t]) for t in o[1]}) for f, o in zip(official, losses)])
    d = {"loss": max(abs(f[0] - o[0]) for f, o in zip(official, losses)),
         "student": worst(ours.student.state_dict(), student.state_dict()),
         "teacher": worst(ours.teacher.state_dict(), teacher.state_dict())}
    ok = max(d.values()) < TOLERANCE
    print(f"max |ours - official| after {steps} steps: {fmt(d)} -> {'float32 noise' if ok else 'DIFFERENT'}")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))
