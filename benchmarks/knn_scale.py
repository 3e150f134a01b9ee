"""k-NN at scale: peak host memory and time of the sharded k-NN (eval.knn_classify: each rank keeps
its shard of the memory bank; per chunk of queries, each rank's top-k are gathered and merged)
against the earlier one (every rank gathers the whole bank, then 1024 x N similarity chunks), on a
random bank split over ranks as eval.extract_features(..., gather=False) leaves it.

    python benchmarks/knn_scale.py                        # 300k x 384 bank, 10k queries, 2 ranks, 3 runs
    python benchmarks/knn_scale.py --train 1281167 --test 50000 --ranks 8   # ImageNet's sizes

Each run of each variant is a fresh `torchrun --nproc_per_node=RANKS` launch of this file (Gloo,
CPU), so that getrusage's ru_maxrss is that variant's own peak. Printed: medians over the runs of
the largest rank's peak RSS, of that peak above the RSS before the bank was made (torch and the
process group), and of the k-NN's wall time; and the top-1 of both, which must be equal.
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
import torch.nn.functional as F  # noqa: E402

import eval as eval_lib  # noqa: E402
from kernels import distributed as dist  # noqa: E402


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@torch.no_grad()
def gather_everything_knn(train_features, train_labels, test_features, test_labels, num_classes, k=20, T=0.07,
                          chunk=1024):
    """The k-NN as it was: the whole bank gathered on every rank, each rank computing every chunk."""
    train_features = F.normalize(dist.all_gather_cat(train_features), dim=1)     # (N, D) on every rank
    train_labels = dist.all_gather_cat(train_labels)
    test_features = F.normalize(test_features, dim=1)
    top1 = 0
    for i in range(0, len(test_features), chunk):
        q, y = test_features[i:i + chunk], test_labels[i:i + chunk]
        sim, idx = (q @ train_features.T).topk(k, dim=1)                         # from (b, N)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_labels[idx], (sim / T).exp())
        top1 += (votes.argmax(1) == y).sum().item()
    return 100.0 * top1 / len(test_features)


def worker(args):
    dist.setup("cpu")
    r, w = dist.rank(), dist.world_size()
    start = rss_mb()
    g = torch.Generator().manual_seed(r)
    n = args.train * (r + 1) // w - args.train * r // w
    bank, labels = torch.randn(n, args.dim, generator=g), torch.randint(0, args.classes, (n,), generator=g)
    g = torch.Generator().manual_seed(1000)   # the same queries on every rank, as extract_features gathers them
    queries, qlabels = torch.randn(args.test, args.dim, generator=g), torch.randint(0, args.classes, (args.test,), generator=g)
    t0 = time.perf_counter()
    if args.worker == "sharded":
        top1 = eval_lib.knn_classify(bank, labels, queries, qlabels, args.classes)[0]
    else:
        top1 = gather_everything_knn(bank, labels, queries, qlabels, args.classes)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    every = dist.all_gather_object((peak, peak - start, seconds))
    if dist.is_main():
        print(json.dumps({"peak_mb": max(e[0] for e in every), "above_start_mb": max(e[1] for e in every),
                          "seconds": max(e[2] for e in every), "top1": top1}), flush=True)
    dist.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=300_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--worker", choices=["gather", "sharded"])
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.ranks))))
    print(f"bank {args.train} x {args.dim} fp32 ({args.train * args.dim * 4 / 2**20:.0f} MB), {args.test} queries, "
          f"{args.ranks} ranks, median of {args.runs} runs per variant (fresh torchrun launches, alternating)")
    results = {"gather": [], "sharded": []}
    for _ in range(args.runs):
        for variant in results:
            cmd = [torchrun, "--standalone", f"--nproc_per_node={args.ranks}", __file__, "--worker", variant,
                   *[f"--{k}={getattr(args, k)}" for k in ("train", "test", "dim", "classes")]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    for variant, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("peak_mb", "above_start_mb", "seconds")}
        print(f"{variant:8s} peak RSS of the largest rank {med['peak_mb']:7.0f} MB ({med['above_start_mb']:7.0f} MB "
              f"above start-up), k-NN {med['seconds']:6.1f} s, top-1 {runs[0]['top1']:.2f}")
    assert len({r["top1"] for runs in results.values() for r in runs}) == 1, "the two variants differ"


if __name__ == "__main__":
    main()
