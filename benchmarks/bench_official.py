"""Ours against the official code: the same training step, side by side, on the same inputs.

    python benchmarks/bench_official.py --official DIR                 # every method whose checkout is in DIR
    python benchmarks/bench_official.py --official DIR --method dino --steps 20
    python benchmarks/bench_official.py --official DIR --precision fp32 bf16   # our side in each of these

DIR holds checkouts kept outside this repository (never committed): DIR/dino
(facebookresearch/dino) and DIR/SimDINO (RobinWu218/SimDINO). Configuration (CPU): ViT-tiny/4,
batch 64, 2×32² + 6×16² crops, 2 threads, each method's official defaults otherwise (head,
out_dim, drop path, clipping); the last layer is not frozen (a step past epoch 0). The official
side runs fp32, its only CPU mode; ours runs each --precision given (default: fp32 and auto,
train.py's default, which is bf16 where the CPU multiplies bf16 natively), one row each.

A step is what each training loop does per batch once the crops exist: teacher and student
forward, loss, backward, clipping, AdamW, EMA (with the official loop's own code on its side:
its MultiCropWrapper, loss, utils.clip_gradients, optimizer and EMA). Augmentation is left out of
both: the same precomputed crops go to both sides. Both sides start from the same weights.

Each method runs in its own subprocess (the official repositories share module names: utils,
vision_transformer). In it, official and ours (one copy per precision, from the same weights)
take turns step by step after warm-up, the order rotating every step; the ratio is
ours/official per pair of neighbouring steps, with its min / median / max. Peak
memory is each side alone in a fresh subprocess (process max RSS, torch import included).
"""
import argparse
import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
CHECKOUTS = {"dino": "dino", "simdino": "SimDINO"}
CPU_CONFIG = ["--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "32", "--local_crops_size", "16",
              "--local_crops_number", "6", "--batch_size_per_gpu", "64",
              "--freeze_last_layer", "0", "--data", "synthetic"]


def ours_step_fn(method, cfg, precision):
    """The train.py loop body for one step (schedules at a fixed step, no logging)."""
    import train
    train.speed_up(method, cfg)
    precision = train.resolve_precision(precision, torch.device("cpu"))[0]
    groups = method.param_groups()
    opt = train.adamw(groups, torch.device("cpu"))
    params = [p for g in groups for p in g["params"]]
    sched = train.schedules(cfg, 100, 1000)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = sched["lr"] * g["lr_mult"], sched["wd"] * g["wd_mult"]

    def step(crops, it):
        with train.autocast(torch.device("cpu"), precision):
            loss, _ = method(crops, 100 + it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        train.clip_gradients([p for p in params if p.grad is not None], cfg.clip_grad)
        opt.step()
        train.ema_update(method.student, method.teacher, sched["momentum"])
        return loss.detach()
    return step


def official_step_fn(name, official_dir, method, cfg):
    """The official train_one_epoch body on the official modules, from our method's weights."""
    sys.path.insert(0, official_dir)
    if name == "simdino":
        sys.modules.setdefault("wandb", types.ModuleType("wandb"))   # imported at module level, logging only
    import main_dino as OM
    import utils as OU
    import vision_transformer as OV
    dim, depth, heads = {"vit_tiny": (192, 12, 3)}[cfg.arch]
    vit = lambda dpr: OV.VisionTransformer(img_size=[cfg.global_crops_size], patch_size=cfg.patch_size,
                                           embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                           norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), drop_path_rate=dpr)
    if name == "dino":
        head = lambda: OV.DINOHead(dim, cfg.out_dim, use_bn=False, norm_last_layer=cfg.norm_last_layer,
                                   hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
        loss_fn = OM.DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                              cfg.warmup_teacher_temp_epochs, cfg.epochs)
        loss_of = lambda s, t: loss_fn(s, t, 1)
        make_opt = lambda groups: torch.optim.AdamW(groups)                 # official main_dino.py
    else:
        head = lambda: OV.DINOHead(dim, 0, use_bn=False, hidden_dim=cfg.head_hidden_dim,
                                   bottleneck_dim=cfg.head_bottleneck_dim)
        loss_fn = OM.MCRLoss(cfg.local_crops_number + 2, cfg.reduce_cov, cfg.expa_type, cfg.eps, cfg.coeff)
        loss_of = lambda s, t: loss_fn(s, t)[0]
        make_opt = lambda groups: torch.optim.AdamW(groups, fused=True)     # official simdino main_dino.py
    student = OU.MultiCropWrapper(vit(cfg.drop_path_rate), head())
    teacher = OU.MultiCropWrapper(vit(0.0), head())
    student.load_state_dict(method.student.state_dict(), strict=True)
    teacher.load_state_dict(method.teacher.state_dict(), strict=True)
    teacher.requires_grad_(False)
    opt = make_opt(OU.get_params_groups(student))
    import train
    sched = train.schedules(cfg, 100, 1000)
    for i, g in enumerate(opt.param_groups):
        g["lr"] = sched["lr"]
        if i == 0:
            g["weight_decay"] = sched["wd"]

    def step(crops, it):
        teacher_output = teacher(crops[:2])
        student_output = student(crops)
        loss = loss_of(student_output, teacher_output)
        opt.zero_grad()
        loss.backward()
        OU.clip_gradients(student, cfg.clip_grad)
        OU.cancel_gradients_last_layer(1, student, cfg.freeze_last_layer)
        opt.step()
        m = sched["momentum"]
        with torch.no_grad():
            if name == "dino":      # main_dino.py's loop
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            else:                   # simdino main_dino.py's loop
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), weight=1. - m)
        return loss.detach()
    return step


def setup(name, official_dir, sides, compile_blocks=False):
    """Our method and config for `name`, the crops, and the step functions of the wanted sides."""
    import data
    import train
    recipe = __import__(name).RECIPE
    cfg = train.config_cli(recipe.Config, recipe.presets, ["--preset", "official", "--compile", str(compile_blocks)]
                           + CPU_CONFIG)
    torch.manual_seed(0)
    method = recipe.Method(cfg, steps_per_epoch=1000)
    method.train()
    images, _ = data.make_synthetic(cfg.batch_size_per_gpu, seed=1)
    augment = data.MultiCrop(cfg.global_crops_size, cfg.local_crops_size, cfg.global_crops_scale,
                             cfg.local_crops_scale, cfg.local_crops_number)
    crops = augment(images, torch.Generator().manual_seed(0))
    steps = {}
    if "official" in sides:
        one_process_group()
        steps["official"] = official_step_fn(name, official_dir, method, cfg)
    for side in sides:
        if side.startswith("ours"):  # "ours fp32", "ours auto", ...: each its own copy of the weights
            steps[side] = ours_step_fn(copy.deepcopy(method), cfg, side.split()[1])
    return cfg, crops, steps


def one_process_group():
    """The official losses all-reduce: a one-process Gloo group, as torchrun would give."""
    import torch.distributed as tdist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    tdist.init_process_group("gloo", rank=0, world_size=1)


def worker(name, official_dir, sides, steps, warmup, compile_blocks=False):
    """Runs in a subprocess: alternate the sides, print one JSON line of per-step times."""
    cfg, crops, fns = setup(name, official_dir, sides, compile_blocks)
    times = {s: [] for s in sides}
    for it in range(warmup + steps):
        order = sides[it % len(sides):] + sides[:it % len(sides)]
        for side in order:
            t = time.perf_counter()
            fns[side](crops, it)
            if it >= warmup:
                times[side].append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "max_rss": rss, "batch": cfg.batch_size_per_gpu,
                      "profile": {side: profile_step(fns[side], crops) for side in sides if len(sides) > 1}}))


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
         "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_step(fn, crops):
    """One more step, profiled: the seconds spent in matrix products (mm, addmm, bmm, CPU flash
    attention), the same products at the same shapes on both sides, and the step's seconds."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn(crops, 1)
        seconds = time.perf_counter() - t
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMMS) / 1e6
    return {"gemm_s": gemm, "step_s": seconds}


def run_worker(name, official_dir, sides, steps, warmup, threads, compile_blocks=False):
    code = (f"import torch, benchmarks.bench_official as b; torch.set_num_threads({threads}); "
            f"b.worker({name!r}, {official_dir!r}, {sides!r}, {steps}, {warmup}, {compile_blocks})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} ({'/'.join(sides)}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="folder with the official checkouts (dino/, SimDINO/)")
    p.add_argument("--method", nargs="+", default=list(CHECKOUTS), choices=list(CHECKOUTS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="ours with --compile true (compiled in warm-up)")
    p.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=("fp32", "bf16", "auto"),
                   help="our side's precision, a row each (the official side runs fp32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import train
    for pr in args.precision:
        print(f"ours at {pr}: {train.resolve_precision(pr, torch.device('cpu'))}")
    print(f"CPU, {args.threads} threads: ViT-tiny/4, batch 64, 2x32² + 6x16² crops, official fp32; "
          f"{args.steps} timed steps per side, taking turns; median seconds per step")
    print(f"{'method':9s} {'ours at':>7s} {'official s':>10s} {'ours s':>8s} {'ratio (min/med/max)':>22s} "
          f"{'official img/s':>14s} {'ours img/s':>10s} {'official MiB':>12s} {'ours MiB':>9s} {'mem ratio':>9s}")
    for name in args.method:
        official_dir = os.path.join(os.path.abspath(args.official), CHECKOUTS[name])
        if name == "simdino":
            official_dir = os.path.join(official_dir, "simdino")
        if not os.path.isfile(os.path.join(official_dir, "main_dino.py")):
            print(f"{name:9s} skipped: no main_dino.py in {official_dir}")
            continue
        ours = [f"ours {pr}" for pr in args.precision]
        r = run_worker(name, official_dir, ["official", *ours], args.steps, args.warmup, args.threads, args.compile)
        mem = {side: run_worker(name, official_dir, [side], 2, 1, args.threads, args.compile)["max_rss"] / 2 ** 20
               for side in ("official", *ours)}
        off, mo = r["times"]["official"], statistics.median(r["times"]["official"])
        for side in ours:
            mine = r["times"][side]
            ratios = sorted(o / f for o, f in zip(mine, off))
            mu = statistics.median(mine)
            print(f"{name:9s} {side.split()[1]:>7s} {mo:10.3f} {mu:8.3f} {ratios[0]:6.2f} /{statistics.median(ratios):5.2f}"
                  f" /{ratios[-1]:5.2f} {r['batch'] / mo:14.1f} {r['batch'] / mu:10.1f} {mem['official']:12.0f}"
                  f" {mem[side]:9.0f} {mem[side] / mem['official']:9.2f}", flush=True)
        for side in ("official", *ours):
            prof = r["profile"][side]
            print(f"{'':9s} {side:10s} matrix products {prof['gemm_s']:.2f} s of a profiled {prof['step_s']:.2f} s "
                  f"step ({100 * prof['gemm_s'] / prof['step_s']:.0f} %)")
    print("A side can be no faster than its matrix products: ours/official >= ours' matrix-product seconds "
          "/ official's step.")


if __name__ == "__main__":
    main()
