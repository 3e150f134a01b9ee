"""Datasets, DINO's multi-crop augmentation, and the batch loader shared by the four methods.

Datasets (`--data`): `synthetic` (embedded, procedural, no download), `fashion-mnist`, `cifar10`,
`cifar100`, `stl10` (all held in memory as uint8 tensors) and `imagefolder` (any root/class/img
tree, decoded by DataLoader workers). Each has a train split for pretraining and k-NN's memory
bank, and a held-out split for evaluation.

Multi-crop (DINO, Caron et al. 2021, arXiv 2104.14294, §3.1 and the official
`DataAugmentationDINO`): 2 global crops + N local crops, each random-resized-cropped and flipped,
colour-jittered (p 0.8), greyscaled (p 0.2), blurred (p 1.0 / 0.1 / 0.5 for global 1 / global 2 /
local) and, on the second global crop only, solarised (p 0.2). The operations are the official
ones, written as batched tensor ops so that they cost little on 2 CPU cores and run on the GPU:
each crop gets its own random parameters, drawn from a generator seeded by (seed, step, rank), so
a run is reproducible and resumes exactly. The parameters are drawn on the CPU first and reach
the device in one copy (`to_device`): the host never waits for a GPU within a step.
"""
import functools
import gzip
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the official code normalises every dataset with these
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder", "list")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


class DataError(Exception):
    """Bad data or data path: reported to the user as one line."""


# ----------------------------------------------------------------------------------------------
# The synthetic dataset: class = shape, everything else varies.

SHAPES = ("disk", "triangle", "square", "plus", "star", "ring", "crescent", "ell", "tee", "bar")


def shape_mask(name, u, v):
    """True where the point (u, v), in the shape's own frame (about the unit disk), is inside."""
    rho, theta = np.hypot(u, v), np.arctan2(v, u)

    def regular_polygon(n, r):  # inside the n-gon with circumradius r
        a = np.mod(theta, 2 * np.pi / n) - np.pi / n
        return rho * np.cos(a) < r * np.cos(np.pi / n)

    def rect(cx, cy, half_w, half_h):
        return (np.abs(u - cx) < half_w) & (np.abs(v - cy) < half_h)

    def star():  # five points: radius 1 at a tip, 0.45 between tips
        a = np.abs(np.mod(theta, 2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)
        return rho < 1.0 - 0.55 * a

    inside = {  # each computed only when asked for; an unknown name raises KeyError
        "disk": lambda: rho < 0.75,
        "triangle": lambda: regular_polygon(3, 1.0),
        "square": lambda: regular_polygon(4, 0.85),
        "plus": lambda: rect(0, 0, 0.95, 0.3) | rect(0, 0, 0.3, 0.95),
        "star": star,
        "ring": lambda: (rho < 0.95) & (rho > 0.55),
        "crescent": lambda: (rho < 0.9) & (np.hypot(u - 0.45, v) > 0.7),
        "ell": lambda: rect(-0.55, 0, 0.3, 0.9) | rect(0, -0.6, 0.85, 0.3),
        "tee": lambda: rect(0, 0.6, 0.9, 0.28) | rect(0, -0.15, 0.28, 0.75),
        "bar": lambda: rect(0, 0, 0.95, 0.3),
    }
    return inside[name]()


def make_synthetic(n, size=32, seed=0, copies=2, supersample=3):
    """n grey images (n, 3, size, size) uint8 and labels (n,): `copies` instances of one shape on
    a dark background, each at its own position, radius, rotation, mirror and light grey level,
    drawn antialiased without overlap, plus pixel noise. Only the shape tells the class.

    Why several copies: a nuisance shared by every crop of an image (one orientation, one size,
    one grey level) is what self-distillation learns first instead of shape; with two instances
    that differ in all of them, crops of one image agree only on the shape. It also keeps raw
    pixels and a random ViT weak (about 27 % and 26 % k-NN, chance 10 %)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        background, placed = rng.uniform(0.0, 0.35), []
        shapes = [(SHAPES[labels[i]], *_place(rng, size, placed, (0.12, 0.2)), rng.uniform(0, 2 * np.pi),
                   rng.choice([-1.0, 1.0]), rng.uniform(0.65, 1.0)) for _ in range(copies)]
        images[i] = _render(background, shapes, size, supersample)[0]
    return _to_uint8(images, rng), torch.from_numpy(labels)


def _place(rng, size, placed, radius):
    """Centre and radius of a new instance that overlaps none of `placed` (100 tries)."""
    for _attempt in range(100):
        r = rng.uniform(*radius) * size
        cx, cy = size / 2 + rng.uniform(-1, 1, 2) * (size / 2 - 0.8 * r)
        if all(np.hypot(cx - x, cy - y) > r + q for x, y, q in placed):
            break
    placed.append((cx, cy, r))
    return cx, cy, r


def _render(background, objects, size, supersample):
    """One grey frame (size, size) float32, antialiased by drawing it `supersample` times larger,
    and its instance map (size, size) uint8 sampled at the pixel centres (0 background, k for the
    k-th object, a later object in front). objects: (shape, x, y, radius, angle, mirror, level)."""
    grid = (np.arange(size * supersample) + 0.5) / supersample
    X, Y = grid[None, :], grid[:, None]  # the subpixel centres, broadcast to (size·supersample)²
    image, ids = np.full((len(grid),) * 2, background, np.float32), np.zeros((len(grid),) * 2, np.uint8)
    for k, (shape, cx, cy, r, angle, mirror, level) in enumerate(objects):
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = (X - cx) / r, (Y - cy) / r
        inside = shape_mask(shape, c * dx + s * dy, (c * dy - s * dx) * mirror)  # in the shape's frame
        image[inside], ids[inside] = level, k + 1
    mid = supersample // 2
    return image.reshape(size, supersample, size, supersample).mean((1, 3)), ids[mid::supersample, mid::supersample]


def _to_uint8(images, rng):
    """Float grey images (..., H, W) in [0, 1] + pixel noise -> uint8 (..., 3, H, W)."""
    images = images + rng.normal(0, 0.04, images.shape).astype(np.float32)
    images = torch.from_numpy(np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8)).unsqueeze(-3)
    return images.expand(*images.shape[:-3], 3, -1, -1).contiguous()


def make_scenes(n, frames=1, size=64, objects=3, seed=0, supersample=3):
    """Scenes for the dense evaluations: n clips of `frames` grey frames (n, frames, 3, size, size)
    uint8, their instance maps (n, frames, size, size) uint8 (0 background, k for object k, the
    later object in front) and the objects' classes (n, objects). Each object is a shape of its own
    class, position, radius (6-10 px at 64 px: the apparent sizes of the training crops), rotation,
    mirror and grey level; in a clip it moves at up to 1.5 px and turns up to 0.1 rad per frame,
    bouncing off the borders, so objects can pass in front of each other."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(SHAPES), (n, objects))
    images = np.empty((n, frames, size, size), np.float32)
    ids = np.empty((n, frames, size, size), np.uint8)
    for i in range(n):
        placed, background = [], rng.uniform(0.0, 0.35)
        moves = [(*_place(rng, size, placed, (0.1, 0.16)), rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0]),
                  rng.uniform(0.65, 1.0), *rng.uniform(-1.5, 1.5, 2), rng.uniform(-0.1, 0.1)) for _ in range(objects)]
        for t in range(frames):
            at_t = [(SHAPES[classes[i, k]], _bounce(cx + t * vx, r, size - r), _bounce(cy + t * vy, r, size - r),
                     r, angle + t * spin, mirror, level)
                    for k, (cx, cy, r, angle, mirror, level, vx, vy, spin) in enumerate(moves)]
            images[i, t], ids[i, t] = _render(background, at_t, size, supersample)
    return _to_uint8(images, rng), torch.from_numpy(ids), torch.from_numpy(classes)


def _bounce(x, lo, hi):
    """x moved into [lo, hi] by reflecting off its ends (a triangle wave)."""
    span = hi - lo
    return lo + span - abs((x - lo) % (2 * span) - span)


# ----------------------------------------------------------------------------------------------
# Datasets: in-memory uint8 tensors, or an image folder read by workers.

class TensorImages:
    """A dataset held in memory: images (N, 3, H, W) uint8, labels (N,) int64 (-1: unlabelled)."""

    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.images)


def read_rgb(path):
    """An image file as 8-bit RGB: grey, palette and alpha images converted (alpha dropped), 16-bit
    and 32-bit integer or float images scaled from their full range to 0-255, not clipped."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(im, dtype=np.float64)
            if im.mode == "F":
                top = 1.0 if a.max() <= 1 else 255.0
            else:
                top = 65535.0 if a.max() <= 65535 else float(a.max())
            im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
        elif im.mode == "P":
            im = im.convert("RGBA")
        return im.convert("RGB")


class FolderImages(torch.utils.data.Dataset):
    """root/class/image files. __getitem__((index, seed)) returns the multi-crop geometry of one
    image (random-resized crops + flips, done in the worker on the full-resolution image, as the
    official pipeline) when `crops` is set, else the evaluation view (resize, centre crop)."""

    def __init__(self, files, labels, classes, eval_size=224, skip_bad=False):
        self.files, self.labels, self.classes = files, torch.tensor(labels), classes
        self.crops, self.eval_size = None, eval_size
        self.skip_bad = skip_bad  # --skip_bad_images: an unreadable image is replaced by the next one

    def __len__(self):
        return len(self.files)

    def load(self, index):
        for offset in range(len(self.files) if self.skip_bad else 1):
            path = self.files[(index + offset) % len(self.files)]
            try:
                return read_rgb(path)
            except Exception as e:
                if not self.skip_bad:
                    raise DataError(f"cannot read image {path}: {e} (--skip_bad_images true skips such "
                                    f"files)") from None
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr, flush=True)
        raise DataError("no readable image in the dataset")

    def __getitem__(self, item):
        from torchvision.transforms import functional as TF
        index, seed = item if isinstance(item, tuple) else (item, 0)
        im = self.load(index)
        if self.crops is None:  # evaluation: resize to 256/224 of the size, centre crop
            im = TF.resize(im, int(self.eval_size * 256 / 224), TF.InterpolationMode.BICUBIC)
            return TF.pil_to_tensor(TF.center_crop(im, self.eval_size)), self.labels[index]
        g = torch.Generator().manual_seed(seed)
        out = []
        for size, scale, count in self.crops:
            boxes = random_resized_crop_boxes(count, im.height, im.width, scale, g)
            flips = torch.rand(count, generator=g) < 0.5
            for (i, j, h, w), flip in zip(boxes.tolist(), flips.tolist()):
                c = TF.resized_crop(im, i, j, h, w, [size, size], TF.InterpolationMode.BICUBIC)
                out.append(TF.pil_to_tensor(TF.hflip(c) if flip else c))
        return out, self.labels[index]


def _read_idx_gz(path):
    """An MNIST-format idx file (gzipped) as a uint8 tensor."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def _fashion_mnist(data_path, train):
    """The idx files in data_path, its FashionMNIST/raw or Debian's package, else torchvision's download."""
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    roots = [Path(data_path), Path(data_path) / "FashionMNIST" / "raw"] if data_path else []
    roots.append(Path("/usr/share/datasets/fashion-mnist"))  # Debian's dataset-fashion-mnist
    found = [root for root in roots if all((root / n).is_file() for n in names)]
    if found:
        x, y = (_read_idx_gz(found[0] / n) for n in names)
    else:
        import torchvision
        try:
            ds = torchvision.datasets.FashionMNIST(data_path or "data", train=train, download=True)
        except Exception as e:
            raise DataError(f"fashion-mnist not found under {data_path!r} nor in "
                            f"/usr/share/datasets/fashion-mnist, and the download failed: {e}") from None
        x, y = ds.data, ds.targets
    return TensorImages(x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), y.long(), 10)  # grey -> RGB


def _torchvision_dataset(name, data_path, train):
    import torchvision
    root = data_path or "data"
    try:
        if name == "stl10":
            ds = torchvision.datasets.STL10(root, split="train+unlabeled" if train else "test", download=True)
            return TensorImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), 10)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=train, download=True)
    except Exception as e:
        raise DataError(f"{name}: could not load or download it into {root!r}: {e}") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    return TensorImages(x, torch.tensor(ds.targets), len(ds.classes))


def _image_folder(root, eval_size):
    """(train, held-out): root/train and root/val when both exist (ImageNet's layout), else root
    itself with every 10th image of each class held out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_path {str(root)!r} is not a directory")

    def scan(folder):  # {class: its image files}, classes in sorted order
        files = {c: [str(p) for p in sorted((folder / c).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
                 for c in sorted(d.name for d in folder.iterdir() if d.is_dir())}
        if not any(files.values()):
            raise DataError(f"no images found in {str(folder)!r} (expected {folder}/<class>/<image>)")
        return files

    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = scan(root / "train"), scan(root / "val")
        val = [val.get(c, []) for c in train]  # in train's classes
        return _folder_images(list(train.values()), eval_size), _folder_images(val, eval_size)
    return _hold_out_every_10th(list(scan(root).values()), eval_size)


def _image_list(path, eval_size):
    """A text file of image paths, one per line (relative to the file's folder, or absolute), each
    optionally followed by a tab and its class name, else its folder's name (tools/curate.py writes
    one); every 10th image of each class is held out."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the image list {path!r}: {e}") from None
    if not lines:
        raise DataError(f"the image list {path!r} names no image")
    per_class = {}
    for line in lines:
        file, label = line.split("\t", 1) if "\t" in line else (line, Path(line).parent.name)
        per_class.setdefault(label, []).append(str(Path(path).parent / file))  # absolute paths stay as they are
    return _hold_out_every_10th([per_class[c] for c in sorted(per_class)], eval_size)


def _hold_out_every_10th(per_class, eval_size):
    train = [[f for i, f in enumerate(fs) if i % 10 != 9] for fs in per_class]
    return _folder_images(train, eval_size), _folder_images([fs[9::10] for fs in per_class], eval_size)


def _folder_images(per_class, eval_size):
    files = [f for fs in per_class for f in fs]
    labels = [c for c, fs in enumerate(per_class) for _ in fs]
    return FolderImages(files, labels, len(per_class), eval_size)


def subset(dataset, indices):
    """The images at `indices` of a dataset, as a dataset of the same kind."""
    idx = list(indices)
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[idx], dataset.labels[idx], dataset.classes)
    return FolderImages([dataset.files[i] for i in idx], dataset.labels[idx].tolist(), dataset.classes,
                        dataset.eval_size, dataset.skip_bad)


def cache_dir():
    """Where generated data is kept between runs: $NANODINO_CACHE, else ~/.cache/nanodino."""
    return os.environ.get("NANODINO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanodino")


@functools.lru_cache(maxsize=1)
def _synthetic_version():
    import hashlib
    import inspect
    source = "".join(inspect.getsource(f) for f in (make_synthetic, _place, _render, _to_uint8, shape_mask))
    source += repr(SHAPES) + np.__version__
    return hashlib.sha256(source.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=2)
def _synthetic(n):
    """make_synthetic(n, seed=0): the same data in every run. Drawing 22,000 images takes 10-20 s
    on 2 cores, so the result is kept in cache_dir(); the file name holds a hash of the generator's
    source and numpy's version, so a changed generator draws anew. An unreadable cache file is
    redrawn (with a note); a cache that cannot be written only costs the time."""
    path = os.path.join(cache_dir(), f"synthetic-{n}-{_synthetic_version()}.pt")
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            return cached["images"], cached["labels"]
        except Exception as e:  # truncated or foreign file: draw again and replace it
            print(f"note: redrawing the synthetic data, cannot read {path}: {e}", file=sys.stderr)
    images, labels = make_synthetic(n, seed=0)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, path)  # atomic: concurrent runs (torchrun ranks) never read half a file
    except OSError as e:
        print(f"note: cannot cache the synthetic data in {cache_dir()}: {e}", file=sys.stderr)
    return images, labels


def load_dataset(name, data_path="", eval_size=224, synthetic_size=(20000, 2000)):
    """(train, held_out) for `--data name`."""
    if name == "synthetic":
        n_train, n_test = synthetic_size
        x, y = _synthetic(n_train + n_test)
        return (TensorImages(x[:n_train], y[:n_train], 10), TensorImages(x[n_train:], y[n_train:], 10))
    if name == "fashion-mnist":
        return _fashion_mnist(data_path, True), _fashion_mnist(data_path, False)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision_dataset(name, data_path, True), _torchvision_dataset(name, data_path, False)
    if name == "imagefolder":
        if not data_path:
            raise DataError("--data imagefolder needs --data_path ROOT (ROOT/<class>/<image>)")
        return _image_folder(data_path, eval_size)
    if name == "list":
        if not data_path or not os.path.isfile(data_path):
            raise DataError(f"--data list needs --data_path FILE, a text file of image paths; got {data_path!r}")
        return _image_list(data_path, eval_size)
    raise DataError(f"unknown --data {name!r}; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Multi-crop augmentation, batched.

def random_resized_crop_boxes(n, height, width, scale, g, ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop.get_params for n crops at once -> (n, 4) (top, left, h, w).
    Area fraction ~ U(scale), log aspect ~ U(log ratio); the first of 10 tries that fits wins,
    else torchvision's fallback: the centre crop with the aspect clamped to `ratio`."""
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=g)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    w = torch.sqrt(area * log_r.exp()).round()
    h = torch.sqrt(area / log_r.exp()).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1)  # index of the first try that fits (0 when none does)
    fw = width if width / height <= ratio[1] else round(height * ratio[1])    # too wide: narrower
    fh = height if width / height >= ratio[0] else round(width / ratio[0])    # too tall: shorter
    found = fits.any(1)
    w = torch.where(found, w[torch.arange(n), first], torch.tensor(float(fw)))
    h = torch.where(found, h[torch.arange(n), first], torch.tensor(float(fh)))
    top = (torch.rand(n, generator=g) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=g) * (width - w + 1)).floor()
    top = torch.where(found, top, torch.tensor(float((height - fh) // 2)))
    left = torch.where(found, left, torch.tensor(float((width - fw) // 2)))
    return torch.stack([top, left, h, w], 1).long()


def resized_crops(images, boxes, flips, size):
    """Crop boxes (n, 4) of images (n, C, H, W) float, resized bicubically to size x size and
    flipped where `flips`, with one grid_sample call."""
    n, _, H, W = images.shape
    top, left, h, w = boxes.to(images.device, images.dtype).unbind(1)
    sign = 1.0 - 2.0 * flips.to(images.device, images.dtype)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = w / W * sign                # output x in [-1, 1] -> input x (normalised)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def grey(x):
    """ITU-R 601-2 luma, as PIL's convert('L'): (n, 3, h, w) -> (n, 1, h, w)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_hue(x, shift):
    """Rotate hue by `shift` (n,) turns: RGB -> HSV, h += shift, HSV -> RGB."""
    r, g_, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    v, delta = maxc, maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    h = torch.where(maxc == r, (g_ - b) / d, torch.where(maxc == g_, 2 + (b - r) / d, 4 + (r - g_) / d))
    h = torch.where(delta > 0, h / 6 % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6  # 5, 3, 1
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def to_device(tensors, device):
    """The CPU tensors of a dict on `device` in one copy: their bytes packed into one pinned
    buffer, copied without blocking the host, and cut back into tensors; other values as they are."""
    if device.type == "cpu":
        return tensors
    tensors, other = ({k: v for k, v in tensors.items() if torch.is_tensor(v) == keep} for keep in (True, False))
    chunks = [t.contiguous().view(-1).view(torch.uint8) for t in tensors.values()]
    pad = [-len(c) % 8 for c in chunks]  # every tensor starts 8-byte aligned in the buffer
    buffer = torch.cat([torch.cat([c, c.new_zeros(p)]) for c, p in zip(chunks, pad)])
    buffer = buffer.pin_memory() if device.type == "cuda" else buffer
    buffer = buffer.to(device, non_blocking=True)
    out, start = other, 0
    for (key, t), c, p in zip(tensors.items(), chunks, pad):
        out[key] = buffer[start:start + len(c)].view(t.dtype).view(t.shape)
        start += len(c) + p
    return out


def jitter_draws(n, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision's ColorJitter draws for n images, on the CPU: the factors (n,), uniform, and
    an order (n, 4) of the four operations per image (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    b, c, s = (torch.empty(n).uniform_(1 - f, 1 + f, generator=g) for f in (brightness, contrast, saturation))
    h = torch.empty(n).uniform_(-hue, hue, generator=g)
    order = torch.rand(n, 4, generator=g).argsort(1)  # a random permutation per image
    return {"brightness": b, "contrast": c, "saturation": s, "hue": h, "order": order}


def color_jitter(x, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, record=None, drawn=None):
    """torchvision's ColorJitter per image: factors drawn uniformly, the four operations applied
    in an order drawn at random for each image (as torchvision does). `drawn`: the jitter_draws
    (on x's device) to use instead of drawing from g; `record`, a dict, receives them."""
    drawn = drawn or to_device(jitter_draws(x.shape[0], g, brightness, contrast, saturation, hue), x.device)
    if record is not None:
        record.update(drawn)
    b, c, s = (drawn[k].view(-1, 1, 1, 1) for k in ("brightness", "contrast", "saturation"))
    h, order = drawn["hue"], drawn["order"]
    for position in range(4):
        op = order[:, position].view(-1, 1, 1, 1)
        x = torch.where(op == 0, (x * b).clamp(0, 1), x)
        x = torch.where(op == 1, (c * x + (1 - c) * grey(x).mean((2, 3), keepdim=True)).clamp(0, 1), x)
        x = torch.where(op == 2, (s * x + (1 - s) * grey(x)).clamp(0, 1), x)
        x = torch.where(op == 3, adjust_hue(x, h), x)
    return x


def gaussian_blur(x, sigma, max_radius=None, sigma_max=None):
    """Blur each image with its own σ (n,) in pixels: a separable Gaussian, reflect padding, taps
    out to ⌈3σ⌉ (PIL's blur, DINO) or at most max_radius (torchvision's fixed kernel, DINOv2).
    sigma_max: the largest σ, when known on the host (else read from sigma)."""
    n, C, H, W = x.shape
    sigma_max = float(sigma.max()) if sigma_max is None else sigma_max
    radius = min(int(math.ceil(3 * sigma_max)), max_radius or H, (min(H, W) - 1) // 2)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.to(x.device, x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n*C, 2r+1)
    y = F.pad(x.reshape(1, n * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)
    y = F.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C)
    return y.view(n, C, H, W)


class MultiCrop:
    """DINO's DataAugmentationDINO as batched tensor ops.

    __call__(images, g) takes a batch of uint8 images (B, 3, H, W) (or, for image folders, the
    already cropped and flipped uint8 crops from the workers) and returns the list of 2 + N
    normalised crops: [global 1 (B, 3, G, G), global 2, local 1 (B, 3, L, L), ...]."""

    def __init__(self, global_size=224, local_size=96, global_scale=(0.4, 1.0),
                 local_scale=(0.05, 0.4), local_number=8, blur_sigma=(0.1, 2.0), blur_kernel_size=0):
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale, self.local_number = global_scale, local_scale, local_number
        # The official blur radius is U(0.1, 2.0) pixels at 224-pixel global crops; we keep the
        # same blur relative to the image by scaling σ with the global crop size (equal at 224).
        self.blur_sigma = tuple(s * global_size / 224 for s in blur_sigma)
        # DINOv2's blur has 9 taps (radius 4) at 224 pixels: scaled the same way; 0: ⌈3σ⌉ (DINO)
        self.blur_radius = max(1, round(blur_kernel_size // 2 * global_size / 224)) if blur_kernel_size else None

    def crop_plan(self):
        """(size, scale range, count) of each crop group, in output order."""
        return [(self.global_size, self.global_scale, 1), (self.global_size, self.global_scale, 1),
                (self.local_size, self.local_scale, self.local_number)]

    def photometric_draws(self, n, g, blur_p, solarize_p):
        """The draws of `photometric` for n images, on the CPU, in the official order: which
        images get each operation (n,) bool, the jitter draws, the blur σ (n,)."""
        drawn = {}

        def coin(op, p):  # which images get operation `op` (no draw when p is 0)
            drawn[op] = torch.rand(n, generator=g) < p if p > 0 else torch.zeros(n, dtype=torch.bool)
        coin("jitter", 0.8)
        drawn.update(jitter_draws(n, g))
        coin("grey", 0.2)
        drawn["sigma"] = torch.empty(n).uniform_(*self.blur_sigma, generator=g)
        drawn["sigma_max"] = float(drawn["sigma"].max())  # the blur's radius, known on the host
        coin("blur", blur_p)
        coin("solarize", solarize_p)
        return drawn

    def photometric(self, x, g, blur_p, solarize_p, record=None, drawn=None):
        """Colour jitter (p 0.8), greyscale (p 0.2), blur (p blur_p), solarise (p solarize_p),
        normalise. x: (n, 3, h, w) in [0, 1]. `drawn`: its photometric_draws on x's device
        (else drawn from g); `record`, a dict, receives the probabilities (`p`) and the draws."""
        if drawn is None:
            drawn = to_device(self.photometric_draws(x.shape[0], g, blur_p, solarize_p), x.device)
        if record is not None:
            record.update({k: v for k, v in drawn.items() if torch.is_tensor(v)},
                          p={"jitter": 0.8, "grey": 0.2, "blur": blur_p, "solarize": solarize_p})
        coin = lambda op: drawn[op].view(-1, 1, 1, 1)
        x = torch.where(coin("jitter"), color_jitter(x, None, drawn=drawn), x)
        x = torch.where(coin("grey"), grey(x).expand(-1, 3, -1, -1), x)
        sigma, most = drawn["sigma"], drawn["sigma_max"]
        x = torch.where(coin("blur"), gaussian_blur(x, sigma, self.blur_radius, most), x) if blur_p > 0 else x
        if solarize_p > 0:  # PIL's ImageOps.solarize: invert pixels at or above 128
            x = torch.where(coin("solarize"), torch.where(x >= 128 / 255, 1 - x, x), x)
        return normalize(x)

    def __call__(self, images, g, record=None):
        """`record`, a list, receives one dict per crop, in output order: what `photometric`
        records, per image (B,), and for in-memory images the crop boxes (B, 4) (top, left, h, w)
        and flips (B,). Recording changes no draw and no output."""
        B = images[0].shape[0] if isinstance(images, (list, tuple)) else images.shape[0]
        blur_solarize = [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]  # per group (global 1, global 2, locals)
        # Blur p 1.0 / 0.1 / 0.5 is DINO's, and what DINOv2 intends: its GaussianBlur hands 1 − p to
        # RandomApply, so its code blurs global crop 1 never, global crop 2 with p 0.9 and locals
        # with 0.5 (a known bug). We use the intended values for both methods.
        drawn = [{}, {}, {}]  # per group: every draw of the step, on the CPU, in the official order
        if not isinstance(images, (list, tuple)):  # the geometry: boxes and flips (folders: done by workers)
            for (size, scale, count), geometry in zip(self.crop_plan(), drawn):
                geometry.update(box=random_resized_crop_boxes(B * count, *images.shape[-2:], scale, g),
                                flip=torch.rand(B * count, generator=g) < 0.5)
        for (_, _, count), group, (blur_p, solarize_p) in zip(self.crop_plan(), drawn, blur_solarize):
            group.update(self.photometric_draws(B * count, g, blur_p, solarize_p) if count else {})
        device = images[0].device if isinstance(images, (list, tuple)) else images.device
        on_device = to_device({f"{i} {k}": v for i, group in enumerate(drawn) for k, v in group.items()}, device)
        on_device = [{k: on_device[f"{i} {k}"] for k in group} for i, group in enumerate(drawn)]
        if isinstance(images, (list, tuple)):  # crops from FolderImages workers
            groups = [images[0], images[1], torch.cat(images[2:]) if self.local_number else None]
            groups = [x.float() / 255 if x is not None else None for x in groups]
        else:
            x = images.float() / 255
            groups = [resized_crops(x.repeat(count, 1, 1, 1), d["box"], d["flip"], size) if count else None
                      for (size, _, count), d in zip(self.crop_plan(), on_device)]
        records = [{k: d[k] for k in ("box", "flip") if k in d} for d in on_device]
        crops = [self.photometric(groups[i], g, *blur_solarize[i], records[i], on_device[i]) for i in (0, 1)]
        if self.local_number:
            local = self.photometric(groups[2], g, *blur_solarize[2], records[2], on_device[2])
            crops += local.chunk(self.local_number)
        if record is not None:  # one dict per crop: the locals' batch cut as their crops are
            for group, count in zip(records, (1, 1, self.local_number)):
                record += [{key: v if key == "p" else v.chunk(count)[k] for key, v in group.items()}
                           for k in range(count)]
        return crops


# ----------------------------------------------------------------------------------------------
# iBOT / DINOv2 block masking (official dinov2/data/masking.py and collate.py).

def block_mask(h, w, n_mask, g, min_patches=4, max_patches=None, min_aspect=0.3):
    """One (h, w) bool mask with about n_mask patches, made of rectangles (blocks) of at least
    `min_patches` patches, aspect ratio in [min_aspect, 1/min_aspect] (log-uniform), each at most
    `max_patches` and at most what is left to mask; a block that adds nothing is retried 10 times,
    and masking stops when none fits (the official MaskingGenerator)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    max_patches = n_mask if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()
    count = 0
    while count < n_mask:
        room = min(n_mask - count, max_patches)
        for _ in range(10):
            area, aspect = uniform(min_patches, room), math.exp(uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top = int(torch.randint(0, h - bh + 1, (), generator=g))
                left = int(torch.randint(0, w - bw + 1, (), generator=g))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= room:
                    mask[top:top + bh, left:left + bw] = True
                    count += new
                    break
        else:  # no block added in 10 tries
            break
    return mask


def sample_masks(n, h, w, ratio_min_max=(0.1, 0.5), probability=0.5, g=None):
    """Masks for n global crops (n, h·w) bool, as DINOv2's collate: int(n·probability) of them
    masked, their ratios spread over ratio_min_max (the i-th drawn in the i-th of equal slices),
    at most half the patches per block; the rest unmasked; the order shuffled."""
    N, n_masked = h * w, int(n * probability)
    edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1).tolist()
    masks = []
    for i in range(n_masked):
        ratio = edges[i] + (edges[i + 1] - edges[i]) * torch.rand((), generator=g).item()
        masks.append(block_mask(h, w, int(N * ratio), g, max_patches=int(0.5 * N)))
    masks += [torch.zeros(h, w, dtype=torch.bool)] * (n - n_masked)  # the unmasked rest
    order = torch.randperm(n, generator=g)
    return torch.stack(masks).flatten(1)[order]


def eval_view(images, size):
    """uint8 images (B, 3, H, W) -> normalised float (B, 3, size, size) for evaluation
    (in-memory datasets are resized whole; folders were resized and centre-cropped by workers)."""
    x = images.float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return normalize(x)


def normalize(x):
    """Float images in [0, 1] (B, 3, H, W) -> normalised with the ImageNet mean and std."""
    mean, std = _mean_std(x.device)
    return (x - mean) / std


@functools.lru_cache
def _mean_std(device):
    """The ImageNet mean and std (1, 3, 1, 1) on `device`, copied there once."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


# ----------------------------------------------------------------------------------------------
# Batches: a deterministic shuffled order per epoch, sharded over ranks.

class Loader:
    """Yields (images, labels) batches of a dataset for one rank.

    The order of epoch e is a permutation seeded by (seed, e), cut to a whole number of global
    batches and dealt to the ranks, so `epoch(e, start)` can resume at any batch of any epoch.
    In-memory datasets are indexed directly; image folders go through DataLoader workers."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=0,
                 shuffle=True, drop_last=True, pin_memory=False):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.drop_last, self.pin_memory = shuffle, drop_last, pin_memory
        n, global_batch = len(dataset), batch_size * world_size
        self.steps = n // global_batch if drop_last else math.ceil(n / global_batch)

    def __len__(self):
        return self.steps

    def batches(self, epoch):
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        gb = self.batch_size * self.world_size
        out = []
        for s in range(self.steps):
            chunk = order[s * gb:(s + 1) * gb]
            out.append(chunk[self.rank::self.world_size])
        return out

    def epoch(self, epoch, start=0):
        batches = self.batches(epoch)[start:]
        if isinstance(self.dataset, TensorImages):
            for idx in batches:
                x, y = self.dataset.images[idx], self.dataset.labels[idx]
                yield (x.pin_memory(), y) if self.pin_memory else (x, y)
            return
        per_sample_seed = lambda i: (self.seed * 1000003 + epoch) * 10000019 + i  # independent of workers
        sampler = [[(int(i), per_sample_seed(int(i))) for i in idx] for idx in batches]
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False)
