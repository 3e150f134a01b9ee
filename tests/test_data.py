"""Data: the synthetic set, the batched augmentations against torchvision's, crop boxes,
loaders, dataset readers and their errors."""
import gzip
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import data


def test_synthetic_is_deterministic_and_balanced():
    a, ya = data.make_synthetic(400, seed=0)
    b, yb = data.make_synthetic(400, seed=0)
    c, _ = data.make_synthetic(400, seed=1)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert a.shape == (400, 3, 32, 32) and a.dtype == torch.uint8
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() > 20 and set(ya.tolist()) == set(range(10))


def test_synthetic_cache_returns_the_drawn_data_and_survives_a_bad_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANODINO_CACHE", str(tmp_path))
    fresh = data.make_synthetic(60, seed=0)
    first = data._synthetic.__wrapped__(60)                  # draws and writes the cache
    (cached,) = list(tmp_path.glob("synthetic-60-*.pt"))
    monkeypatch.setattr(data, "make_synthetic", lambda *a, **k: pytest.fail("redrawn"))
    second = data._synthetic.__wrapped__(60)                 # reads it back, draws nothing
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fresh, first, second))
    cached.write_bytes(b"not a checkpoint")                  # a broken file is redrawn, with a note
    monkeypatch.undo()
    monkeypatch.setenv("NANODINO_CACHE", str(tmp_path))
    third = data._synthetic.__wrapped__(60)
    assert all(torch.equal(a, b) for a, b in zip(fresh, third)) and "redrawing" in capsys.readouterr().err
    assert torch.equal(torch.load(cached, weights_only=True)["images"], fresh[0])


def test_synthetic_class_is_not_in_brightness_or_position():
    x, y = data.make_synthetic(3000, seed=0)
    x = x[:, 0].float() / 255
    mean = x.mean((1, 2))
    per_class = torch.stack([mean[y == c].mean() for c in range(10)])
    assert per_class.std() < 0.03  # image brightness says nothing about the class
    # nor does the position of the shape: the centre of mass of |x - background| per class
    dev = (x - x.median(dim=2).values.median(dim=1).values[:, None, None]).abs()
    ys = torch.arange(32.0)
    cy = (dev.sum(2) * ys).sum(1) / dev.sum((1, 2))
    per_class_cy = torch.stack([cy[y == c].mean() for c in range(10)])
    assert (per_class_cy - 15.5).abs().max() < 1.0


def test_random_resized_crop_boxes():
    g = torch.Generator().manual_seed(0)
    boxes = data.random_resized_crop_boxes(5000, 32, 40, (0.05, 0.4), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    area = (h * w).float() / (32 * 40)
    assert area.min() > 0.03 and area.max() < 0.45  # the scale range, up to rounding
    ratio = w.float() / h.float()
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    assert left.float().mean() > 5  # spread over the image, not stuck at the corner


def test_resized_crop_identity_and_flip():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0, 0, 8, 8]] * 2)
    same = data.resized_crops(x, full, torch.tensor([False, True]), 8)
    assert torch.allclose(same[0], x[0], atol=1e-5)
    assert torch.allclose(same[1], x[1].flip(-1), atol=1e-5)
    # a 4x4 crop at (2, 4), kept at its size: the same pixels
    part = data.resized_crops(x, torch.tensor([[2, 4, 4, 4]] * 2), torch.tensor([False, False]), 4)
    assert torch.allclose(part, x[:, :, 2:6, 4:8], atol=1e-5)


def test_color_ops_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=g)
    shifts = torch.tensor([0.1, -0.1, 0.05, 0.0, -0.03, 0.09])
    ref = torch.stack([TF.adjust_hue(x[i], float(s)) for i, s in enumerate(shifts)])
    assert torch.allclose(data.adjust_hue(x, shifts), ref, atol=1e-5)
    # PIL's weights (0.299) vs torchvision's tensor weights (0.2989): equal to 1e-4
    assert torch.allclose(data.grey(x), TF.rgb_to_grayscale(x), atol=1e-4)


def test_color_jitter_single_operations_match_torchvision():
    x = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    # brightness only: contrast, saturation, hue ranges set to identity
    g = torch.Generator().manual_seed(3)
    out = data.color_jitter(x, g, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    g = torch.Generator().manual_seed(3)
    b = torch.empty(4).uniform_(0.6, 1.4, generator=g)
    ref = torch.stack([TF.adjust_brightness(x[i], float(b[i])) for i in range(4)])
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    out = data.color_jitter(x, g, brightness=0.0, contrast=0.4, saturation=0.0, hue=0.0)
    g = torch.Generator().manual_seed(3)
    torch.empty(4).uniform_(1, 1, generator=g)
    c = torch.empty(4).uniform_(0.6, 1.4, generator=g)
    ref = torch.stack([TF.adjust_contrast(x[i], float(c[i])) for i in range(4)])
    assert torch.allclose(out, ref, atol=2e-4)  # PIL's grey weights vs torchvision's: 1e-4 apart
    g = torch.Generator().manual_seed(3)
    out = data.color_jitter(x, g, brightness=0.0, contrast=0.0, saturation=0.2, hue=0.0)
    g = torch.Generator().manual_seed(3)
    torch.empty(8).uniform_(1, 1, generator=g)
    s = torch.empty(4).uniform_(0.8, 1.2, generator=g)
    ref = torch.stack([TF.adjust_saturation(x[i], float(s[i])) for i in range(4)])
    assert torch.allclose(out, ref, atol=2e-4)


def test_gaussian_blur_matches_torchvision():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 1.5])
    out = data.gaussian_blur(x, sigma)
    r = math.ceil(3 * 1.5)
    ref = torch.stack([TF.gaussian_blur(x[i], [2 * r + 1] * 2, [float(sigma[i])] * 2) for i in range(3)])
    assert torch.allclose(out, ref, atol=1e-5)


def test_multicrop_output():
    x, _ = data.make_synthetic(8)
    mc = data.MultiCrop(32, 16, (0.4, 1.0), (0.05, 0.4), local_number=3)
    crops = mc(x, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    again = mc(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))  # reproducible from the seed
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    lo, hi = (-mean / std).min(), ((1 - mean) / std).max()
    assert all(c.min() >= lo - 1e-4 and c.max() <= hi + 1e-4 for c in crops)
    assert not torch.allclose(crops[0], crops[1])


def test_loader_order_shards_and_resumes():
    ds = data.TensorImages(torch.zeros(50, 3, 4, 4, dtype=torch.uint8), torch.arange(50), 50)
    full = [y for _, y in data.Loader(ds, 4, seed=1).epoch(3)]
    assert len(full) == 12 and len(torch.cat(full).unique()) == 48
    assert all(torch.equal(a, b) for a, b in zip(full[5:], [y for _, y in data.Loader(ds, 4, seed=1).epoch(3, 5)]))
    r0 = [y for _, y in data.Loader(ds, 2, seed=1, rank=0, world_size=2).epoch(3)]
    r1 = [y for _, y in data.Loader(ds, 2, seed=1, rank=1, world_size=2).epoch(3)]
    assert len(r0) == 12 and torch.equal(torch.cat(r0 + r1).sort().values, torch.cat(full).sort().values)
    other_epoch = torch.cat([y for _, y in data.Loader(ds, 4, seed=1).epoch(4)])
    assert not torch.equal(other_epoch, torch.cat(full))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    train, test = data.load_dataset("fashion-mnist", str(tmp_path))
    assert train.images.shape == (12, 3, 28, 28) and test.images.shape == (5, 3, 28, 28)
    assert train.labels.dtype == torch.int64


def _image_tree(root, n_per_class=10):
    from PIL import Image
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (40 + i, 30), (i * 20, 0, 0)).save(root / c / f"{i}.png")


def test_image_folder_split_crops_and_eval_view(tmp_path):
    _image_tree(tmp_path)
    train, held = data.load_dataset("imagefolder", str(tmp_path), eval_size=32)
    assert len(train) == 18 and len(held) == 2 and train.classes == 2
    image, label = held[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    mc = data.MultiCrop(32, 16, (0.4, 1.0), (0.05, 0.4), local_number=2)
    train.crops = mc.crop_plan()
    crops, _ = train[(0, 123)]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(crops, train[(0, 123)][0]))  # seeded per sample
    batch = next(data.Loader(train, 4, num_workers=0).epoch(0))[0]
    out = mc(batch, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="is not a directory"):
        data.load_dataset("imagefolder", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no images found"):
        data.load_dataset("imagefolder", str(tmp_path / "empty"))
    _image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "cat" / "0.png").write_bytes(b"not a png")
    train, _ = data.load_dataset("imagefolder", str(tmp_path / "tree"))
    with pytest.raises(data.DataError, match="cannot read image .*0.png"):
        train[0]
    with pytest.raises(data.DataError, match="unknown --data"):
        data.load_dataset("mnist-3d")
