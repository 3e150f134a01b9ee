"""Sequence packing (--pack_crops) against one backbone forward per crop size: median ms.

    python benchmarks/packing.py                    # CPU, 2 threads: the default config and ViT-S/16
    python benchmarks/packing.py --device cuda      # GPU: FlexAttention compiled, forward + backward

The student's backbone pass of a DINOv2 step: global crops with iBOT masks (mask token), then
the local crops, through vit.forward_features_list, with packing off (one forward per crop size)
and on (one pass under a block-diagonal FlexAttention mask). Timed: forward + backward of a
fixed functional of the outputs, and the forward alone under no_grad. On CPU FlexAttention has
no backward (torch raises), so a packed forward + backward runs SDPA with the block mask's
mask_mod made dense; FlexAttention itself is timed on the no_grad forward, eager (its unfused
reference) and, when a C++ compiler is found, compiled. Rows alternate within each repetition
(the machine may be shared): medians of the wall time and of the process's CPU time (all
threads; on a busy machine the steadier of the two). Numbers are printed, never asserted.
"""
import argparse
import os
import shutil
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch

from kernels import attention as attn_lib
from vit import build_vit

CONFIGS = {  # name: (arch, patch, global size, local size, local crops, batch)
    "default": ("vit_pico", 8, 32, 16, 4, 128),   # train.SYNTHETIC
    "vits": ("vit_small", 16, 224, 96, 8, 8),     # ViT-S/16, DINOv2's 2 x 224 + 8 x 96
}


def inputs(cfg, device):
    arch, patch, gs, ls, n_local, B = cfg
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2 * B, 3, gs, gs, generator=g), torch.randn(n_local * B, 3, ls, ls, generator=g)]
    masks = torch.rand(2 * B, (gs // patch) ** 2, generator=g) < 0.3
    return [x.to(device) for x in xs], [masks.to(device), None]


def timed(fn, sync):
    """(wall ms, CPU ms of this process): on a shared CPU the wall time also counts the others'
    work, the CPU time (all threads) only this run's."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return 1e3 * (time.perf_counter() - t), 1e3 * (time.process_time() - c)


def bench(name, device, reps, compiled):
    cfg = CONFIGS[name]
    arch, patch, gs, ls, n_local, B = cfg
    model = build_vit(arch, patch, img_size=gs, use_mask_token=True, layerscale=1e-5).to(device)
    xs, masks = inputs(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd_bwd(pack):
        model.pack_crops = pack
        outs = model.forward_features_list(xs, masks)
        sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].square().mean() for o in outs).backward()

    def fwd(pack, compile_cpu=False):
        model.pack_crops, attn_lib.COMPILE_FLEX_ON_CPU = pack, compile_cpu
        with torch.no_grad():
            model.forward_features_list(xs, masks)

    cpu = device.type == "cpu"
    rows = {"fwd+bwd per size": lambda: fwd_bwd(False),
            f"fwd+bwd packed{', SDPA + mask' if cpu else ''}": lambda: fwd_bwd(True),
            "fwd per size": lambda: fwd(False),
            f"fwd packed, flex {'eager' if cpu else 'compiled'}": lambda: fwd(True)}
    if cpu and compiled:
        rows["fwd packed, flex compiled"] = lambda: fwd(True, compile_cpu=True)
    times = {k: [] for k in rows}
    for k, fn in rows.items():  # warm-up; the first compiled call compiles
        print(f"  warm-up {k}: {timed(fn, sync)[0] / 1e3:.1f} s", flush=True)
    for _ in range(reps):
        for k, fn in rows.items():
            times[k].append(timed(fn, sync))
    attn_lib.COMPILE_FLEX_ON_CPU = False
    T = [1 + (gs // patch) ** 2, 1 + (ls // patch) ** 2]
    print(f"{name}: {arch}/{patch}, 2x{gs}² + {n_local}x{ls}², batch {B} (tokens per crop {T[0]}, {T[1]}), "
          f"{device}, {torch.get_num_threads()} threads, median of {reps}")
    print(f"  {'':28} {'wall ms':>9} {'(min':>7} {'max)':>7} {'CPU ms':>9}")
    for k, t in times.items():
        wall, cpu_ms = [w for w, _ in t], [c for _, c in t]
        print(f"  {k:28} {statistics.median(wall):9.1f} {min(wall):7.1f} {max(wall):7.1f} "
              f"{statistics.median(cpu_ms):9.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", choices=["all", *CONFIGS], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled FlexAttention row on CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # the eager row is on purpose
    torch.manual_seed(0)
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")
    compiled = not args.no_compile and compiler is not None
    print(f"torch {torch.__version__}; C++ compiler: {compiler or 'none'}"
          f"{'' if compiled else ' (no compiled FlexAttention row)'}")
    for name in CONFIGS if args.config == "all" else [args.config]:
        bench(name, torch.device(args.device), args.reps, compiled)


if __name__ == "__main__":
    main()
