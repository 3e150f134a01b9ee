"""Our SimDINOv2 step against the official one (RobinWu218/SimDINO, package simdinov2/): same weights,
crops and masks.

    python tests/official_simdinov2.py /path/to/RobinWu218/SimDINO [steps] [--matched]

The official package is imported at run time from that checkout (kept outside this repository,
never copied here) and runs in one CPU process: SimSSLMetaArch.forward_backward (its
DinoVisionTransformer, DINOHead without prototypes, MCRLoss on the CLS, CosinePatchLoss on the
masked patches), collate_data_and_cast with MaskingGenerator, get_params_groups_with_decay and
fuse_params_groups, train.py's build_schedulers and apply_optim_scheduler and do_train's order of
the step, on configs/ssl_default_config.yaml merged with configs/simdino_config.yaml (the README's
command). Stand-ins, as in official_dinov2.py: a Gloo group of one process; clip_grad_norm_ of
each student submodule by torch.nn.utils.clip_grad_norm_; update_teacher's lerp on each submodule's
parameters; timm's create_optimizer_v2("adamw") is torch.optim.AdamW with the config's kwargs;
the student's blocks "memeff" instead of "nested" (the nested path needs xFormers; the official
forward_backward then runs the global and local crops one after the other: the same computation);
no torch.compile; placeholders for timm, iopath, termcolor, einops and omegaconf where not installed.

Both sides: ViT-pico/8 (width 96, 4 blocks, 3 heads, 4 registers as official) on 32-pixel global
and 16-pixel local crops, batch 16, 2 epochs of 10 steps (an epoch is a pass over the data on both
sides: OFFICIAL_EPOCH_LENGTH -1); everything else is our default against the two config files.
As official_dinov2.py: the official step changed where ours still differs (MATCHED) must equal
ours to float32 noise (exit 1 otherwise); then (unless --matched) each known difference runs
alone, and the initial distributions of the parameters are compared."""
import copy
import functools
import os
import sys
import types
import warnings

import torch
import torch.distributed as tdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import simdinov2  # noqa: E402
import train  # noqa: E402
from official_dinov2 import (OmegaConfReader, batches, clip_each_parameter, fmt, hide_ours, init_differences,  # noqa: E402
                             merged, one_process_group, our_steps, print_table, stub_missing, worst)
from vit import ARCHS  # noqa: E402

DIFFERENCES = {
    "lr_warmup": "the lr warm-up np.linspace(0, lr) as DINO's and DINOv2's, not simdinov2's CosineScheduler "
                 "min_lr + (lr - min_lr)·it/warmup",
    "clip": "each parameter's gradient clipped alone (DINO), not clip_grad_norm_ of each student submodule",
    "interpolation": "position embeddings resized with interpolate_offset 0.1, no antialiasing (DINOv2's), "
                     "not 0 and antialiasing",
    "cls_token": "the CLS token drawn trunc-normal with std 0.02 (DINO), not normal with std 1e-6",
}
MATCHED = set()
SIZE = ["--arch", "vit_pico", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--batch_size_per_gpu", "16", "--head_hidden_dim", "256",
        "--head_bottleneck_dim", "64", "--drop_path_rate", "0", "--epochs", "2", "--warmup_epochs", "1",
        "--data", "synthetic"]
STEPS_PER_PASS = 10
# float32 noise after 20 AdamW steps: the weights to 1e-4; the loss to 1e-3, as the coding rate's
# log-determinant (ours on the n×n side, the official on the d×d side) magnifies the weights' noise
# (about 4e-5 after 20 steps here).
TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-3


def load_official(folder):
    """The official modules (simdinov2/ of a RobinWu218/SimDINO checkout), with ViT-pico added."""
    os.environ["XFORMERS_DISABLED"] = "1"
    hide_ours("simdinov2", folder)
    stub_missing({"omegaconf": {"OmegaConf": OmegaConfReader}, "timm.optim": {}, "timm.data": {"create_transform": None},
                  "iopath.common.file_io": {"HTTPURLHandler": None, "PathManager": None},
                  "termcolor": {"colored": None}, "einops": {"rearrange": None}})
    torch.Tensor.cuda = lambda self, *args, **kwargs: self   # the official step moves its batch to the GPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import simdinov2.configs as configs
        import simdinov2.data.collate as collate
        import simdinov2.data.masking as masking
        import simdinov2.models.vision_transformer as vits
        import simdinov2.train.train as otrain
        import simdinov2.utils.config as oconfig
        from simdinov2.train.ssl_meta_arch_sim import SimSSLMetaArch
    D, depth, heads = ARCHS["vit_pico"]
    vits.vit_pico = lambda patch_size=16, num_register_tokens=0, block="nested", **kw: vits.DinoVisionTransformer(
        patch_size=patch_size, embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=4,
        block_fn=vits.get_block_fn(block), num_register_tokens=num_register_tokens, **kw)
    default = merged(configs.load_config("ssl_default_config"), configs.load_config("simdino_config"))
    return types.SimpleNamespace(default=default, train=otrain, config=oconfig, SimSSLMetaArch=SimSSLMetaArch,
                                 data=types.SimpleNamespace(collate_data_and_cast=collate.collate_data_and_cast,
                                                            MaskingGenerator=masking.MaskingGenerator))


def official_config(O, cfg, changes):
    """ssl_default_config.yaml + simdino_config.yaml with our run's sizes (the values SIZE sets)."""
    size = {
        "compile": False,
        "compute_precision": {"grad_scaler": False},    # fp32 on both sides
        "student": {"arch": cfg.arch, "patch_size": cfg.patch_size, "drop_path_rate": cfg.drop_path_rate,
                    "block_chunks": 0, "block": "memeff"},
        "crops": {"global_crops_size": cfg.global_crops_size, "local_crops_size": cfg.local_crops_size,
                  "local_crops_number": cfg.local_crops_number},
        # what do_train computes for OFFICIAL_EPOCH_LENGTH -1: the batches in one pass
        "train": {"batch_size_per_gpu": cfg.batch_size_per_gpu, "OFFICIAL_EPOCH_LENGTH": STEPS_PER_PASS},
        "dino": {"head_hidden_dim": cfg.head_hidden_dim, "head_bottleneck_dim": cfg.head_bottleneck_dim},
        "ibot": {"head_hidden_dim": cfg.head_hidden_dim, "head_bottleneck_dim": cfg.head_bottleneck_dim},
        "optim": {"epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs},
    }
    if "interpolation" in changes:
        size["student"].update(interpolate_offset=0.1, interpolate_antialias=False)
    return O.config.apply_scaling_rules_to_cfg(merged(O.default, size))   # lr = base_lr·√(B/1024)


def official_key(key):
    return "dino_" + key if key.startswith("head.") else key


def run_official(O, cfg, init, steps_data, changes):
    """do_train's loop, changed where `changes` (keys of DIFFERENCES) say. -> (losses per step, the model)."""
    c = official_config(O, cfg, changes)
    model = O.SimSSLMetaArch(c)
    for part in ("student", "teacher"):
        mine = {k[len(part) + 1:]: v for k, v in init.items() if k.startswith(part + ".")}
        getattr(model, part).load_state_dict({official_key(k): v for k, v in mine.items()}, strict=True)
    if "cls_token" in changes:
        with torch.no_grad():
            cls = torch.nn.init.trunc_normal_(torch.empty_like(model.student.backbone.cls_token), std=0.02,
                                              generator=torch.Generator().manual_seed(0))
            model.student.backbone.cls_token.copy_(cls)
            model.teacher.backbone.cls_token.copy_(cls)
    model.need_to_synchronize_fsdp_streams = False   # CUDA streams of FSDP
    model.train()
    optimizer = torch.optim.AdamW(model.get_params_groups(True), **c.optim.kwargs)   # timm's "adamw"
    (lr_s, wd_s, mom_s, temp_s, last_lr_s, coeff_s, eps_s, ibot_s, clip_s) = O.train.build_schedulers(c)
    steps_per_epoch = STEPS_PER_PASS
    losses = []
    for it, (_, batch) in enumerate(steps_data):
        lr = train.schedules(cfg, it, steps_per_epoch)["lr"] if "lr_warmup" in changes else lr_s[it]
        O.train.apply_optim_scheduler(optimizer, lr, wd_s[it], last_lr_s[it])
        model.dino_loss.coeff, model.dino_loss.eps = coeff_s[it], eps_s[it]
        optimizer.zero_grad(set_to_none=True)
        parts = model.forward_backward(batch, teacher_temp=temp_s[it])
        for v in model.student.values():
            if "clip" in changes:
                clip_each_parameter(v.parameters(), clip_s[it])
            else:
                torch.nn.utils.clip_grad_norm_(v.parameters(), clip_s[it])
        optimizer.step()
        with torch.no_grad():   # update_teacher, on each submodule's parameters
            for k in model.student.keys():
                torch._foreach_lerp_(list(model.teacher[k].parameters()), list(model.student[k].parameters()),
                                     weight=1. - mom_s[it])
        losses.append((parts["total_loss"].item(), {"comp": parts["dino_mcr_comp_loss"].item(),
                                                    "expa": parts["dino_mcr_expa_loss"].item(),
                                                    "patch": parts["ibot_comp_loss"].item()}))
    return losses, model


def run_ours(cfg, init, steps_data):
    ours = simdinov2.SimDINOv2(cfg, STEPS_PER_PASS)
    ours.load_state_dict(init)
    losses = our_steps(ours, cfg, steps_data, STEPS_PER_PASS,
                       lambda logs: {"comp": logs["comp_loss"], "expa": logs["expa_loss"], "patch": logs["patch_loss"]})
    return losses, ours


def compare(ours_run, official_run):
    (ol, ours), (fl, model) = ours_run, official_run
    return {"loss": max(abs(a[0] - b[0]) for a, b in zip(fl, ol)),
            "student": worst(ours.student.state_dict(), model.student.state_dict(), official_key),
            "teacher": worst(ours.teacher.state_dict(), model.teacher.state_dict(), official_key)}


def main(official_dir, steps=20, differences=True):
    one_process_group(29536)
    O = load_official(official_dir)
    cfg = train.config_cli(simdinov2.SimDINOv2Config, simdinov2.PRESETS, ["--preset", "official", *SIZE])
    torch.manual_seed(0)
    init = copy.deepcopy(simdinov2.SimDINOv2(cfg, STEPS_PER_PASS).state_dict())
    steps_data = batches(O, official_config(O, cfg, set()), steps)
    ours = run_ours(cfg, init, steps_data)
    matched = run_official(O, cfg, init, steps_data, MATCHED)
    rows = [(f[0], o[0], {t: (f[1][t], o[1][t]) for t in o[1]}) for f, o in zip(matched[0], ours[0])]
    print_table(f"SimDINOv2: the official step{' changed by ' + ', '.join(sorted(MATCHED)) if MATCHED else ''}"
                f" against ours", rows)
    d = compare(ours, matched)
    ok = d["loss"] < LOSS_TOLERANCE and max(d["student"], d["teacher"]) < TOLERANCE
    print(f"max |ours - official| after {steps} steps: {fmt(d)} -> {'float32 noise' if ok else 'DIFFERENT'}")
    if differences:
        for change, what in DIFFERENCES.items():
            run = run_official(O, cfg, init, steps_data, MATCHED ^ {change})
            print(f"  official {'without' if change in MATCHED else 'with'} {change} ({what}): "
                  f"{fmt(compare(ours, run))}")
        torch.manual_seed(0)
        theirs = O.SimSSLMetaArch(official_config(O, cfg, set())).student.state_dict()
        mine = simdinov2.SimDINOv2(cfg, STEPS_PER_PASS).student.state_dict()
        lines = init_differences([(k, theirs[official_key(k)], v) for k, v in mine.items()])
        print("\ninitialisation, official against ours:" + ("\n" + "\n".join(lines) if lines else " the same distributions"))
    tdist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--matched"]
    sys.exit(main(args[0], int(args[1]) if len(args) > 1 else 20, differences="--matched" not in sys.argv))
