"""Data loading for image folders: images/s of one DataLoader worker (decode + multi-crop
geometry, the part done in the workers), and so how many workers a GPU needs.

    python benchmarks/loader.py                       # 200 JPEGs of 500x375, ImageNet's median size
    python benchmarks/loader.py --workers 1 2 --local_crops_number 10 --gpu_images_per_s 1500

A worker decodes each image and cuts its crops (DINOv2: 2x224 + 8x96; DINO: 2x224 + 10x96,
bicubic resized, flipped); the colour augmentations run batched on the device. The images are
photo-like JPEGs (smooth gradients and shapes, quality 90) written to a temporary folder.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data as data_lib  # noqa: E402


def make_folder(root, n, width=500, height=375, seed=0):
    """n JPEGs in root/c0, root/c1: a smooth colour gradient with a few filled ellipses each."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, f"c{i % 2}")
        os.makedirs(folder, exist_ok=True)
        u, v = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        base = np.stack([a * u + b * v + c for a, b, c in rng.uniform(-0.5, 1, (3, 3))], -1)
        im = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(5):
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = rng.integers(20, 120)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        im.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--local_crops_number", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--gpu_images_per_s", type=float, default=0,
                   help="a GPU's training step in images/s (bench.py --device cuda): prints the workers it needs")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        make_folder(root, args.images)
        train_set, _ = data_lib.load_dataset("imagefolder", root, eval_size=224)
        train_set.crops = data_lib.MultiCrop(224, 96, local_number=args.local_crops_number).crop_plan()
        print(f"{len(train_set)} JPEGs 500x375, crops 2x224 + {args.local_crops_number}x96, batch {args.batch_size}")
        for workers in args.workers:
            loader = data_lib.Loader(train_set, args.batch_size, num_workers=workers)
            it = loader.epoch(0)
            next(it)  # workers started, first batch out
            t, n = time.perf_counter(), 0
            for images, _ in it:
                n += len(images[0])
            rate = n / (time.perf_counter() - t)
            line = f"{workers} worker(s): {rate:.0f} images/s, {rate / workers:.0f} per worker"
            if args.gpu_images_per_s:
                line += f"; a GPU at {args.gpu_images_per_s:.0f} images/s needs {args.gpu_images_per_s / (rate / workers):.0f} workers"
            print(line, flush=True)


if __name__ == "__main__":
    main()
