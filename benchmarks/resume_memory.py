"""Peak host memory of a resume: a DINO training checkpoint of a large ViT (random weights, an AdamW
state in every moment) read as train.py resumes it, with the memory-mapped read (eval.read_checkpoint,
torch.load(mmap=True)) against reading the whole file into memory (mmap=False, the earlier read).

    python benchmarks/resume_memory.py                   # vit_base/16, DINO's official head, 3 runs
    python benchmarks/resume_memory.py --arch vit_large  # a 5 GB checkpoint: ~8 GB of memory

Each run is a fresh process (so that getrusage's ru_maxrss is that read's own peak) that builds the
method and AdamW, reads the checkpoint, restores it (train.restore) and, keeping the checkpoint
alive as train() does, takes one AdamW step (which writes every moment). Printed: medians over the
runs, after the restore and after the step, of the peak RSS (mapped file pages included: shared
between the ranks of a node, and reclaimable), of the private (anonymous) memory, what each rank
holds for itself, and of the read + restore time. The file is read once before the runs, so that
each run finds it in the page cache.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import dino  # noqa: E402
import eval as eval_lib  # noqa: E402
import train  # noqa: E402


def memory_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def build(arch):
    """DINO's method (official recipe: head 2048-256-65536) and AdamW, as train() builds them."""
    cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, ["--preset", "official", "--arch", arch, "--device", "cpu"])
    method = dino.DINO(cfg, 1000)
    return cfg, method, train.adamw(method.param_groups(), torch.device("cpu"))


def make_checkpoint(path, arch):
    """A training checkpoint as train.py writes it, AdamW's moments filled with random numbers."""
    cfg, method, optimizer = build(arch)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p),
                                  "exp_avg_sq": torch.rand_like(p)}
    state = {**train.split_state(method.state_dict()), "optimizer": optimizer.state_dict(),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "step": 10, "epoch": 0,
             "config": json.loads(json.dumps(cfg.__dict__))}
    train.save_checkpoint(path, state)


def worker(args):
    _, method, optimizer = build(args.arch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = memory_mb("VmRSS")
    t0 = time.perf_counter()
    if args.worker == "mmap":
        state = eval_lib.read_checkpoint(args.path)
    else:
        state = torch.load(args.path, map_location="cpu", weights_only=True)
    train.restore(state, method, optimizer, scaler)
    out = {"seconds": time.perf_counter() - t0, "built_mb": before}
    for when in ("restore", "step"):
        if when == "step":
            for p in method.student.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
        out[f"peak_{when}_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out[f"anon_{when}_mb"] = memory_mb("RssAnon")
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--path", default="/tmp/nanodino_resume_memory.pth")
    p.add_argument("--worker", choices=["whole", "mmap"])
    args = p.parse_args()
    if args.worker:
        return worker(args)
    make_checkpoint(args.path, args.arch)
    with open(args.path, "rb") as f:
        while f.read(2 ** 26):   # into the page cache, for both variants alike
            pass
    print(f"{args.arch}/16 DINO training checkpoint (official head): {os.path.getsize(args.path) / 2**20:.0f} MB; "
          f"median of {args.runs} fresh processes per read, alternating")
    results = {"whole": [], "mmap": []}
    for _ in range(args.runs):
        for variant in results:
            cmd = [sys.executable, __file__, "--worker", variant, "--arch", args.arch, "--path", args.path]
            results[variant].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    print(f"before the read (method and AdamW built): {statistics.median(r['built_mb'] for r in results['whole']):.0f} MB")
    for variant, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{variant:6s} after the restore: peak RSS {m['peak_restore_mb']:6.0f} MB, private {m['anon_restore_mb']:6.0f} MB;"
              f" after one step: peak RSS {m['peak_step_mb']:6.0f} MB, private {m['anon_step_mb']:6.0f} MB; "
              f"read + restore {m['seconds']:4.1f} s")
    os.remove(args.path)


if __name__ == "__main__":
    main()
