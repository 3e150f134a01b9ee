"""The four methods side by side: same data, arch, crops, epochs, batch and seed (each method's
`synthetic` preset, which all share dino.py's recipe), the same k-NN protocol, the two baselines.

    python tools/compare.py                                   # synthetic data, 10 epochs each
    python tools/compare.py --data fashion-mnist --global_crops_size 28 --local_crops_size 14 --patch_size 7
    python tools/compare.py --epochs 30 --output_dir runs/compare30

Each method trains into OUTPUT_DIR/<method> (a finished run is resumed, so it is not trained
again); then OUTPUT_DIR/compare.md holds the table (k-NN top-1 / top-5 per method and baseline,
minutes) and OUTPUT_DIR/curves.png the k-NN and loss curves. Extra flags go to every method.
"""
import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch

import data as data_lib
import eval as eval_lib
import train

METHODS = ("dino", "dinov2", "simdino", "simdinov2")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/compare")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args, flags = p.parse_known_args()
    rows, logs = [], [os.path.join(args.output_dir, name) for name in args.methods]
    for name, out in zip(args.methods, logs):
        recipe = importlib.import_module(name).RECIPE
        cfg = train.config_cli(recipe.Config, recipe.presets, flags + ["--output_dir", out])
        print(f"=== {name} -> {out}", flush=True)
        t0 = time.time()
        try:
            train.train(cfg, recipe.Method)
        except (train.ConfigError, data_lib.DataError, FloatingPointError) as e:
            sys.exit(f"error: {name}: {e}")
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        knn = [r for r in records if "knn_top1" in r]
        rows.append((name, knn[-1]["knn_top1"], knn[-1]["knn_top5"], records[-1]["time"] / 60))
        print(f"=== {name}: k-NN top-1 {knn[-1]['knn_top1']:.2f} ({(time.time() - t0) / 60:.1f} min this call)", flush=True)
    train_set, eval_set = data_lib.load_dataset(cfg.data, cfg.data_path, eval_size=cfg.global_crops_size)
    base = train.cached_baselines(cfg, train_set, eval_set, torch.device("cpu"))
    lines = [f"k-NN on `{cfg.data}` ({cfg.arch}/{cfg.patch_size}, {cfg.epochs} epochs, batch "
             f"{cfg.batch_size_per_gpu}, seed {cfg.seed}; `python tools/compare.py {' '.join(flags)}`)", "",
             "| features | k-NN top-1 | top-5 | training minutes |", "|---|---|---|---|"]
    lines += [f"| raw pixels | {base['raw_pixels'][0]:.2f} | {base['raw_pixels'][1]:.2f} | |",
              f"| random ViT | {base['random_vit'][0]:.2f} | {base['random_vit'][1]:.2f} | |"]
    lines += [f"| {n} | {t1:.2f} | {t5:.2f} | {m:.1f} |" for n, t1, t5, m in rows]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    eval_lib.curves_picture(logs, os.path.join(args.output_dir, "curves.png"))
    print("\n".join(lines))
    print(f"table: {args.output_dir}/compare.md, plot: {args.output_dir}/curves.png")


if __name__ == "__main__":
    main()
