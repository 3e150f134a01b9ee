"""The attention backends on a CPU, forward + backward, fp32 and bf16: why `sdpa` in bf16 / fp16
on a CPU runs the written-out product (kernels/attention.py) instead of PyTorch's flash kernel.

    python benchmarks/attention_cpu.py               # 2 threads, median ms of 10 runs per cell
    python benchmarks/attention_cpu.py --threads 1

Shapes are the crops of this project's configs: (B, H, N, d) with B = images x crops of a size.
q, k, v are strided views of one qkv tensor (as in vit.py); the gradient is taken w.r.t. it.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from kernels.attention import math_attention  # noqa: E402

SHAPES = [  # (name, B, H, N, d)
    ("ViT-pico/8 32² (default)", 256, 3, 17, 32),
    ("ViT-pico/8 16² (default)", 512, 3, 5, 32),
    ("ViT-tiny/4 32² (bench_official)", 128, 3, 65, 64),
    ("ViT-tiny/4 16² (bench_official)", 384, 3, 17, 64),
    ("ViT-S/16 224², batch 32", 64, 6, 197, 64),
]


def median_ms(fn, reps=10):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[reps // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backends = {"flash (F.sdpa)": F.scaled_dot_product_attention, "written out": math_attention}
    print(f"CPU, {args.threads} threads; forward + backward, median ms")
    print(f"{'shape':34s} {'dtype':9s} " + " ".join(f"{b:>15s}" for b in backends) + "  flash / written out")
    for name, B, H, N, d in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(B, N, 3, H, d, dtype=dtype, requires_grad=True)
            do = torch.randn(B, H, N, d, dtype=dtype)

            def run(fn):
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                return torch.autograd.grad(fn(q, k, v), qkv, do)
            ms = [median_ms(lambda: run(fn)) for fn in backends.values()]
            print(f"{name:34s} {str(dtype)[6:]:9s} " + " ".join(f"{m:15.1f}" for m in ms) + f"  {ms[0] / ms[1]:8.1f}x")


if __name__ == "__main__":
    main()
