"""Details a careful reviewer checks, each against a transcription of the paper or the official
code on small hand-made inputs: the multi-crop recipe per crop (data.MultiCrop's `record`), the
ViT's position-embedding resize and token layout, the last-layer freeze of the loop, k-NN
scoring, Sinkhorn–Knopp, KoLeo, iBOT weights, block masks, and the global-batch counts (γ, α,
centres) under several processes. tests/mutations.py lists the wrong one-line variants each test
was checked against."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import data
import dino
import dinov2
import eval as eval_lib
import simdino
import train
from kernels import distributed as dist
from kernels.coding_rate import coding_rate
from vit import build_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Multi-crop: which crop gets which operation, with which probability and strength.
#
# Official facebookresearch/dino main_dino.py, DataAugmentationDINO:
#   every crop   RandomResizedCrop (global scale / local scale, bicubic), RandomHorizontalFlip(0.5),
#                RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2)
#   global 1     GaussianBlur(1.0)
#   global 2     GaussianBlur(0.1), Solarization(0.2)
#   local        GaussianBlur(p=0.5)
# utils.GaussianBlur: radius ~ U(0.1, 2.0); utils.Solarization: ImageOps.solarize (threshold 128).
# DINOv2 intends the same blur probabilities (its GaussianBlur passes 1 − p to RandomApply, a
# bug data.py declines to copy): the test below is the claim data.py makes for both methods.

OFFICIAL_P = [dict(jitter=0.8, grey=0.2, blur=1.0, solarize=0.0, flip=0.5),   # global crop 1
              dict(jitter=0.8, grey=0.2, blur=0.1, solarize=0.2, flip=0.5)]   # global crop 2
LOCAL_P = dict(jitter=0.8, grey=0.2, blur=0.5, solarize=0.0, flip=0.5)


@pytest.fixture(scope="module")
def many_crops():
    """6,000 images through MultiCrop with 2 local crops, and what it recorded per crop."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6000, 3, 24, 24), dtype=torch.uint8, generator=g)
    mc = data.MultiCrop(4, 2, (0.4, 1.0), (0.05, 0.4), local_number=2)   # tiny crops: the draws are the point
    record = []
    crops = mc(images, torch.Generator().manual_seed(1), record=record)
    return mc, images, crops, record


def test_each_crop_gets_the_official_probabilities(many_crops):
    """Recorded probabilities are the official ones, and the drawn frequencies match them over
    6,000 images (±0.02, more than 3 σ at p = 0.5, while the probabilities to tell apart differ
    by 0.1 or more: 0.1 vs 0.2, 0.5 vs 1.0, 0.8 vs 1.0)."""
    _, _, crops, record = many_crops
    assert len(record) == len(crops) == 4
    for i, rec in enumerate(record):
        expected = OFFICIAL_P[i] if i < 2 else LOCAL_P
        assert rec["p"] == {k: v for k, v in expected.items() if k != "flip"}, (i, rec["p"])
        for op, p in expected.items():
            drawn = rec[op].float().mean().item()
            assert abs(drawn - p) < 0.02, (i, op, drawn, p)


def test_each_crop_gets_the_official_strengths(many_crops):
    """Blur σ ~ U(0.1, 2.0) pixels at 224 (scaled with the global crop size); colour-jitter
    factors brightness and contrast ~ U(0.6, 1.4), saturation ~ U(0.8, 1.2), hue ~ U(−0.1, 0.1);
    crop areas within the global / local scale; each range filled to within 2 % of its ends."""
    mc, images, _, record = many_crops
    H, W = images.shape[-2:]
    lo_s, hi_s = 0.1 * 4 / 224, 2.0 * 4 / 224
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1),
              "sigma": (lo_s, hi_s)}
    for i, rec in enumerate(record):
        for name, (lo, hi) in ranges.items():
            v, slack = rec[name], 1e-6 + 0.02 * (hi - lo)
            assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, (i, name, v.min(), v.max())
            assert v.min() < lo + slack and v.max() > hi - slack, (i, name, v.min(), v.max())
        assert sorted(rec["order"][0].tolist()) == [0, 1, 2, 3]
        area = (rec["box"][:, 2] * rec["box"][:, 3]).float() / (H * W)
        lo, hi = (0.4, 1.0) if i < 2 else (0.05, 0.4)
        assert area.min() > lo - 0.03 and area.max() < hi + 0.03, (i, area.min(), area.max())
        assert area.min() < lo + 0.03 and area.max() > hi - 0.05, (i, area.min(), area.max())


def reference_crop(image, box, flip, size, rec, j, radius):
    """One crop rebuilt from what was recorded for image j, with torchvision's functional ops in
    the official order: crop + resize + flip, ColorJitter's four operations in the drawn order,
    greyscale, Gaussian blur (the batch's kernel radius), solarise, normalise."""
    x = data.resized_crops(image[None].float() / 255, box[None], flip[None], size)[0]
    if rec["jitter"][j]:
        ops = {0: lambda x: TF.adjust_brightness(x, float(rec["brightness"][j])),
               1: lambda x: TF.adjust_contrast(x, float(rec["contrast"][j])),
               2: lambda x: TF.adjust_saturation(x, float(rec["saturation"][j])),
               3: lambda x: TF.adjust_hue(x, float(rec["hue"][j]))}
        for op in rec["order"][j].tolist():
            x = ops[op](x)
    if rec["grey"][j]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if rec["blur"][j] and radius > 0:
        x = TF.gaussian_blur(x, [2 * radius + 1] * 2, [float(rec["sigma"][j])] * 2)
    if rec["solarize"][j]:
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return TF.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)


def test_recorded_operations_are_the_ones_applied():
    """Every crop equals the one rebuilt from its record (so the record cannot say blur where
    the image was not blurred). Tolerance 3e-3 in normalised units: torchvision's grey weights
    (0.2989) against PIL's (0.299)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8, generator=g)
    mc = data.MultiCrop(16, 8, (0.4, 1.0), (0.05, 0.4), local_number=2, blur_sigma=(1.0, 20.0))  # visible blur
    record = []
    crops = mc(images, torch.Generator().manual_seed(3), record=record)
    seen = {op: 0 for op in ("jitter", "grey", "blur", "solarize")}
    for i, (crop, rec) in enumerate(zip(crops, record)):
        group = record[2:] if i >= 2 else [rec]                      # the locals are blurred as one batch
        size = crop.shape[-1]
        radius = min(math.ceil(3 * float(torch.cat([r["sigma"] for r in group]).max())), (size - 1) // 2)
        for j in range(len(images)):
            ref = reference_crop(images[j], rec["box"][j], rec["flip"][j], size, rec, j, radius)
            assert (crop[j] - ref).abs().max() < 3e-3, (i, j, {k: bool(rec[k][j]) for k in seen})
        for op in seen:
            seen[op] += int(rec[op].sum())
    assert min(seen.values()) >= 3, seen    # each operation was exercised


def test_recording_changes_no_draw_and_no_output():
    images = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    mc = data.MultiCrop(16, 8, (0.4, 1.0), (0.05, 0.4), local_number=3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain, recorded = mc(images, g1), mc(images, g2, record=[])
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert torch.equal(g1.get_state(), g2.get_state())
    folder = [images[:, :, :16, :16]] * 2 + [images[:, :, :8, :8]] * 3   # the workers' crops (image folders)
    record = []
    assert all(torch.equal(a, b) for a, b in zip(mc(folder, torch.Generator().manual_seed(6)),
                                                  mc(folder, torch.Generator().manual_seed(6), record=record)))
    assert len(record) == 5 and "box" not in record[0] and record[1]["p"]["solarize"] == 0.2


def test_solarize_inverts_at_or_above_128():
    """PIL's ImageOps.solarize(threshold=128): pixel values v >= 128 become 255 − v. Images the
    record shows untouched by jitter and greyscale (blur off) are solarised exactly as PIL does."""
    from PIL import Image, ImageOps
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(100, 3, 16, 16)
    mc = data.MultiCrop(16, 8)
    rec = {}
    out = mc.photometric(values.float() / 255, torch.Generator().manual_seed(7), blur_p=0.0, solarize_p=1.0, record=rec)
    out = out * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    plain = ~rec["jitter"] & ~rec["grey"]
    assert rec["solarize"].all() and plain.sum() > 5
    pil = ImageOps.solarize(Image.fromarray(values[0].permute(1, 2, 0).numpy()), threshold=128)
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (out[plain] * 255 - expected).abs().max() < 1e-3


# ----------------------------------------------------------------------------------------------
# ViT: position-embedding resize and token layout.

def official_dino_interpolate(pos_embed, rows, cols, patch=1):
    """facebookresearch/dino vision_transformer.py, VisionTransformer.interpolate_pos_encoding
    (x: (B, nc, w, h) images: its "w" is the rows)."""
    N = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = rows // patch, cols // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_dinov2_interpolate(pos_embed, w0, h0, interpolate_offset, interpolate_antialias):
    """facebookresearch/dinov2 models/vision_transformer.py, interpolate_pos_encoding."""
    N = pos_embed.shape[1] - 1
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    M = int(math.sqrt(N))
    kwargs = {}
    if interpolate_offset:
        kwargs["scale_factor"] = (float(w0 + interpolate_offset) / M, float(h0 + interpolate_offset) / M)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=interpolate_antialias, **kwargs)
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


GRIDS = [(6, 6), (2, 2), (3, 5), (7, 4), (12, 12)]


def test_pos_embed_resize_is_the_official_one():
    """DINO's resize (offset 0.1 in the scale factor, bicubic, no antialias) is the default; the
    DINOv2 options give DINOv2's. Non-square grids pin which axis is which."""
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, img_size=32)
    with torch.no_grad():
        model.pos_embed.normal_()
    pos = model.pos_embed.detach()
    for rows, cols in GRIDS:
        ours = model.interpolate_pos_encoding(rows, cols)
        torch.testing.assert_close(ours, official_dino_interpolate(pos, rows, cols), rtol=0, atol=1e-6)
    for offset, antialias in ((0.0, False), (0.0, True), (0.1, True)):
        v2 = build_vit("vit_pico", 8, img_size=32, interpolate_offset=offset, interpolate_antialias=antialias)
        v2.load_state_dict(model.state_dict())
        for rows, cols in GRIDS:
            torch.testing.assert_close(v2.interpolate_pos_encoding(rows, cols),
                                       official_dinov2_interpolate(pos, rows, cols, offset, antialias), rtol=0, atol=1e-6)
    # the test can tell the offset from the exact size: they differ at 4 -> 6
    a, b = (official_dinov2_interpolate(pos, 6, 6, off, False) for off in (0.1, 0.0))
    assert (a - b).abs().max() > 1e-2


def official_prepare_tokens(model, x, masks=None):
    """dinov2 vision_transformer.py prepare_tokens_with_masks: mask token, CLS, + position, then
    the registers (no position) between CLS and patches."""
    B, nc, w, h = x.shape
    npatch = (w // model.patch_size) * (h // model.patch_size)
    x = model.patch_embed(x)
    if masks is not None:
        x = torch.where(masks.unsqueeze(-1), model.mask_token.to(x.dtype).unsqueeze(0), x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if npatch == model.pos_embed.shape[1] - 1 and w == h:   # the official early return
        x = x + model.pos_embed
    else:
        x = x + official_dinov2_interpolate(model.pos_embed, w // model.patch_size, h // model.patch_size,
                                            model.interpolate_offset, model.interpolate_antialias)
    if model.register_tokens is not None:
        x = torch.cat((x[:, :1], model.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    return x


def test_token_layout_is_dinov2s():
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, img_size=32, num_register_tokens=3, use_mask_token=True)
    with torch.no_grad():
        for p in (model.register_tokens, model.mask_token, model.cls_token, model.pos_embed):
            p.normal_()
    for size in ((32, 32), (24, 40), (48, 48)):
        x = torch.randn(2, 3, *size)
        masks = torch.rand(2, (size[0] // 8) * (size[1] // 8), generator=torch.Generator().manual_seed(1)) < 0.4
        for m in (None, masks):
            torch.testing.assert_close(model.prepare_tokens(x, m), official_prepare_tokens(model, x, m), rtol=0, atol=1e-6)
    tokens = model.prepare_tokens(torch.randn(2, 3, 32, 32))
    assert torch.equal(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))   # registers: no position


def test_token_init():
    """Official DINO init of the CLS token and the position embedding (trunc normal, std 0.02),
    DINOv2's registers (normal, std 1e-6), the mask token at zero."""
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, img_size=64, num_register_tokens=4, use_mask_token=True)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and model.pos_embed.abs().max() < 2
    assert 0.012 < model.cls_token.std().item() < 0.028
    assert 0.5e-6 < model.register_tokens.std().item() < 2e-6
    assert torch.equal(model.mask_token, torch.zeros_like(model.mask_token))


def test_layer_norms_have_the_official_eps():
    """Official DINO and DINOv2 build every LayerNorm as partial(nn.LayerNorm, eps=1e-6)."""
    model = build_vit("vit_pico", 8, img_size=32, layerscale=0.1, num_register_tokens=2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * len(model.blocks) + 1 and all(m.eps == 1e-6 for m in norms)


# ----------------------------------------------------------------------------------------------
# The loop's last-layer freeze (official utils.cancel_gradients_last_layer: during the first
# --freeze_last_layer epochs the gradients of every parameter named *last_layer* are dropped).

def _tiny_folder(root):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):   # 9 train + 1 held out per class: 18 train images, 2 steps of 8
            pixels = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_last_layer_is_frozen_for_the_first_epochs_only(tmp_path):
    """2 steps per epoch, --freeze_last_layer 1: the prototypes (weight_v, and weight_g with
    --norm_last_layer false) do not move in epoch 0, while the rest of the head does; they move
    in the first step of epoch 1 (the run resumed). Frozen, the student's prototypes stay equal
    to the teacher's (their EMA); moved, they differ."""
    _tiny_folder(tmp_path / "img")
    flags = ["--data", "imagefolder", "--data_path", str(tmp_path / "img"), "--batch_size_per_gpu", "8",
             "--out_dim", "32", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--local_crops_number", "1",
             "--global_crops_size", "16", "--local_crops_size", "8", "--eval_every", "0", "--device", "cpu",
             "--norm_last_layer", "false", "--warmup_epochs", "0", "--lr", "0.01", "--output_dir", str(tmp_path / "run")]
    last = lambda net: [p.detach().clone() for p in net.head.last_layer.parameters()]
    m2 = train.train(train.config_cli(dino.DINOConfig, dino.PRESETS, flags + ["--max_steps", "2"]), dino.DINO)
    assert all(torch.equal(s, t) for s, t in zip(last(m2.student), last(m2.teacher)))
    assert not torch.equal(m2.student.head.mlp[0].weight, m2.teacher.head.mlp[0].weight)   # the rest learnt
    m3 = train.train(train.config_cli(dino.DINOConfig, dino.PRESETS, flags + ["--max_steps", "3"]), dino.DINO)
    for s, t in zip(last(m3.student), last(m3.teacher)):
        assert not torch.equal(s, t)
    moved = [not torch.equal(a, b) for a, b in zip(last(m2.student), last(m3.student))]
    assert moved == [True, True]   # weight_v and weight_g


# ----------------------------------------------------------------------------------------------
# k-NN (official eval_knn.py knn_classifier, features L2-normalised in extract_features).

def official_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    train_features = F.normalize(train_features, dim=1, p=2).t()
    test_features = F.normalize(test_features, dim=1, p=2)
    top1, top5, total = 0.0, 0.0, 0
    num_test_images, num_chunks = test_labels.shape[0], 10
    imgs_per_chunk = max(1, num_test_images // num_chunks)
    retrieval_one_hot = torch.zeros(k, num_classes)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total


def at_cosines(query, cosines, norms, start):
    """Vectors with the given cosine to the unit vector `query` (each along its own extra axis
    e_start, e_start+1, ...) and the given norms."""
    out = torch.zeros(len(cosines), query.shape[0], dtype=torch.float64)
    for i, (c, n) in enumerate(zip(cosines, norms)):
        out[i] = n * (c * query + math.sqrt(1 - c * c) * torch.eye(query.shape[0], dtype=torch.float64)[start + i])
    return out


def test_knn_votes_are_exp_of_cosine_over_T():
    """Hand-made neighbourhoods of one query (k = 5, T = 0.07), each telling one scoring apart:
    weights exp(cos/T), not 1 (majority), cos (linear), exp(cos) (no T); cosine, not the raw dot
    product (norms 1-9); the 5 nearest only."""
    q = torch.zeros(20, dtype=torch.float64)
    q[0] = 1.0
    cases = [  # (cosines, norms, labels, expected class)
        ([0.5, 0.5, 0.5, 0.9, 0.9], [1] * 5, [0, 0, 0, 1, 1], 1),                 # majority / no-T would say 0
        ([0.8, 0.8, 0.8, 0.8, 0.95], [1] * 5, [0, 0, 0, 0, 1], 1),                # linear weights would say 0
        ([0.6, 0.6, 0.3, 0.3, 0.3], [1, 1, 9, 9, 9], [0, 0, 1, 1, 1], 0),        # raw dot products would say 1
        ([0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.2], [1] * 5 + [9, 9], [0] * 5 + [1] * 2, 0),  # the 2 far ones: not among k
    ]
    for cos, norms, labels, expected in cases:
        train_x = at_cosines(q, cos, norms, 1).float()
        train_y = torch.tensor(labels)
        for y in range(3):   # top-1 is 100 % for the expected class, 0 otherwise
            top1, _ = eval_lib.knn_classify(train_x, train_y, q[None].float() * 3, torch.tensor([y]), k=5, T=0.07,
                                            num_classes=3)
            assert top1 == (100.0 if y == expected else 0.0), (cos, labels, y, top1)
    # top-5: the true class ranked 2nd of 3 counts, top-1 does not
    train_x = at_cosines(q, [0.9, 0.8, 0.1], [1, 1, 1], 1).float()
    assert eval_lib.knn_classify(train_x, torch.tensor([0, 1, 2]), q[None].float(), torch.tensor([1]), k=3,
                                 num_classes=3) == (0.0, 100.0)


def test_knn_equals_the_official_classifier():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 12, generator=g)
    ytr, yte = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (120,), generator=g)
    ftr = (centres[ytr] + 1.5 * torch.randn(300, 12, generator=g)) * torch.rand(300, 1, generator=g) * 5
    fte = (centres[yte] + 1.5 * torch.randn(120, 12, generator=g)) * torch.rand(120, 1, generator=g) * 5
    for k, T in ((20, 0.07), (7, 0.5), (1, 0.07)):
        ours = eval_lib.knn_classify(ftr, ytr, fte, yte, k=k, T=T, num_classes=6, chunk=50)
        ref = official_knn_classifier(ftr, ytr, fte, yte, k, T, 6)
        assert ours[0] == pytest.approx(ref[0]), (k, T, ours, ref)
        assert 20 < ours[0] < 95   # a case where scoring matters: neither chance nor perfect
        # top-5 where no class without votes enters the top 5 (whose order among such ties is
        # arbitrary, ours and the official differ there): queries with >= 5 classes among their 20
        near = F.normalize(fte, dim=1) @ F.normalize(ftr, dim=1).T
        keep = torch.tensor([len(ytr[i].unique()) >= 5 for i in near.topk(k, dim=1).indices])
        if k == 20:
            assert keep.sum() > 20
            ours = eval_lib.knn_classify(ftr, ytr, fte[keep], yte[keep], k=k, T=T, num_classes=6)
            assert ours == pytest.approx(official_knn_classifier(ftr, ytr, fte[keep], yte[keep], k, T, 6))


# ----------------------------------------------------------------------------------------------
# DINOv2's loss details.

def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """dinov2/loss/dino_clstoken_loss.py DINOLoss.sinkhorn_knopp_teacher, one process."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_knopp_is_the_official_three_iterations():
    logits = torch.randn(24, 10, generator=torch.Generator().manual_seed(0)) * 2
    logits[:, 0] += 3   # a prototype every sample prefers: each iteration changes Q visibly
    ref = official_sinkhorn_knopp(logits, 0.3)
    torch.testing.assert_close(dinov2.sinkhorn_knopp(logits, 0.3), ref, rtol=1e-5, atol=1e-7)
    for n in (1, 2, 4, 10):
        torch.testing.assert_close(dinov2.sinkhorn_knopp(logits, 0.3, n_iterations=n),
                                   official_sinkhorn_knopp(logits, 0.3, n), rtol=1e-5, atol=1e-7)
        assert (official_sinkhorn_knopp(logits, 0.3, n) - ref).abs().max() > 1e-3   # 3 is visible


def official_koleo(student_output, eps=1e-8):
    """dinov2/loss/koleo_loss.py KoLeoLoss.forward (nn.PairwiseDistance(2, eps=1e-8): ‖a − b + eps‖)."""
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, I = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(student_output, student_output[I])
    return -torch.log(distances + eps).mean()


def test_koleo_on_duplicated_points_is_the_officials():
    """Two equal points are each other's neighbour at distance ‖0 + eps‖ = eps·√D: the loss is
    large and finite, −log(eps·√D + eps), exactly as the official KoLeoLoss."""
    D = 4
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    expected = -math.log(1e-8 * math.sqrt(D) + 1e-8)
    assert dinov2.koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(12, 8, generator=g)
    y[5], y[9] = y[2], y[2] * 4          # three equal directions among nine others
    for z in (x, y, torch.randn(16, 3, generator=g)):
        torch.testing.assert_close(dinov2.koleo_loss(z), official_koleo(z), rtol=1e-6, atol=1e-6)


def test_koleo_in_fp32_under_autocast():
    """The official KoLeoLoss runs with autocast off: with bf16 dot products, two candidate
    neighbours at 0.05 and 0.06 rad (cosines 0.99875 and 0.9982, one bf16 value) tie and the
    farther one, first in order, would be taken."""
    angle = lambda a, axis: torch.tensor([math.cos(a), math.sin(a) * (axis == 1), math.sin(a) * (axis == 2)])
    x = torch.stack([angle(0.0, 1), angle(0.06, 1), angle(0.05, 2), angle(2.0, 1)])
    fp32 = dinov2.koleo_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dinov2.koleo_loss(x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, rtol=0, atol=1e-6)
    torch.testing.assert_close(fp32, official_koleo(x), rtol=0, atol=1e-6)


def test_ibot_weights_are_one_over_the_masked_count_of_each_image():
    """dinov2/data/collate.py: masks_weight = (1 / M.sum(-1).clamp(min=1)).unsqueeze(-1)
    .expand_as(M)[M], one weight per masked patch, in the order of M's masked entries."""
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    w = dinov2.ibot_weights(masks)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 1.0, 1 / 3, 1 / 3, 1 / 3]))
    # the iBOT term with these weights: per image the mean of its patches' cross-entropies
    M, K = int(masks.sum()), 6
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(M, K, generator=g), torch.randn(M, K, generator=g).softmax(-1)
    ce = -(t * (s / 0.1).log_softmax(-1)).sum(-1)
    expected = (ce[:2].mean() + ce[2] + ce[3:].mean()) / 4
    torch.testing.assert_close(dinov2.ibot_loss(s, t, w, 4, 0.1), expected)


class OfficialMaskingGenerator:
    """dinov2/data/masking.py MaskingGenerator, its random.uniform / random.randint replaced by
    draws from a torch generator in the same order (so both place the same blocks)."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, g=None):
        self.height, self.width = input_size
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.g = g
        self.blocks = []   # (h, w) of every block placed

    def uniform(self, a, b):
        return a + (b - a) * torch.rand((), generator=self.g).item()

    def randint(self, a, b):   # inclusive, as random.randint
        return int(torch.randint(a, b + 1, (), generator=self.g))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.randint(0, self.height - h)
                left = self.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                    self.blocks.append((h, w))
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def test_block_masks_are_the_official_generator():
    """The same masks as the official MaskingGenerator on the same draws, over grids, targets and
    block caps (a small cap places many blocks); the official blocks themselves respect the
    aspect bounds [0.3, 1/0.3] up to rounding (a block can be smaller than 4 patches when less
    than 4 remain to be masked)."""
    cases = [(14, 14, 60, 98), (14, 14, 60, 8), (4, 4, 8, 8), (16, 10, 70, 12), (6, 6, 30, 18)]
    blocks = 0
    for h, w, n_mask, cap in cases:
        for seed in range(12):
            ours = data.block_mask(h, w, n_mask, torch.Generator().manual_seed(seed), max_patches=cap)
            gen = OfficialMaskingGenerator((h, w), max_num_patches=cap, g=torch.Generator().manual_seed(seed))
            assert torch.equal(ours, gen(n_mask)), (h, w, n_mask, cap, seed)
            for bh, bw in gen.blocks:
                assert 0.3 / 1.5 <= bh / bw <= 1.5 / 0.3
            blocks += len(gen.blocks)
    assert blocks > 300   # many blocks per mask were placed


def official_collate_masks(n, h, w, mask_ratio_tuple, mask_probability, g):
    """dinov2/data/collate.py collate_data_and_aug's masks (MaskingGenerator with
    max_num_patches = 0.5·N), random.uniform / random.shuffle replaced by draws from g."""
    N = h * w
    gen = OfficialMaskingGenerator((h, w), max_num_patches=int(0.5 * N), g=g)
    n_samples_masked = int(n * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1).tolist()
    masks_list = []
    for i in range(n_samples_masked):
        ratio = gen.uniform(probs[i], probs[i + 1])
        masks_list.append(gen(int(N * ratio)))
    for _ in range(n_samples_masked, n):
        masks_list.append(gen(0))
    order = torch.randperm(n, generator=g)
    return torch.stack(masks_list).flatten(1)[order]


def test_sample_masks_are_the_official_collate():
    """Including ratios above 0.5, where the cap of half the patches per block shows."""
    for n, grid, ratios, p in ((8, 4, (0.1, 0.5), 0.5), (10, 14, (0.1, 0.5), 0.5), (6, 6, (0.2, 0.4), 1.0),
                               (6, 8, (0.5, 0.9), 1.0)):
        for seed in range(4):
            ours = data.sample_masks(n, grid, grid, ratios, p, torch.Generator().manual_seed(seed))
            ref = official_collate_masks(n, grid, grid, ratios, p, torch.Generator().manual_seed(seed))
            assert torch.equal(ours, ref), (n, grid, ratios, p, seed)


# ----------------------------------------------------------------------------------------------
# The global batch: n = world_size·B in γ, α, the centres and Sinkhorn–Knopp. One process
# stands for W ranks holding the same data (world_size → W, all_reduce_sum → ×W): the exact
# code path of the collectives, whose result is then that of one process on the W-fold batch.

@pytest.fixture
def two_identical_ranks(monkeypatch):
    W = 2
    monkeypatch.setattr(dist, "world_size", lambda: W)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda x: x.mul_(W))
    return W


def official_mcr_expansion(feat_list, eps, N):
    """RobinWu218/SimDINO simdino/main_dino.py MCRLoss.calc_expansion, with the world size N
    passed in (its covariances local, reduce_cov 0)."""
    num_views = len(feat_list)
    m, p = feat_list[0].shape
    cov_list = torch.stack([W.T.matmul(W) for W in feat_list])
    scalar = p / (m * N * eps)
    I = torch.eye(p, dtype=cov_list.dtype)
    loss = 0
    for i in range(num_views):
        loss += torch.linalg.cholesky_ex(I + scalar * cov_list[i])[0].diagonal().log().sum()
    loss /= num_views
    loss *= (p + N * m) / (p * N * m)
    return loss


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_simdino_gamma_and_alpha_count_the_global_batch(monkeypatch):
    """World size 4 (reduce_cov 0, local Gram matrices): γ = (d + n)/(d·n) and α = d/(n·ε²)
    with n = 4·B, as the official MCRLoss."""
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    B, d, eps = 6, 8, 0.3
    s, t = _unit(4 * B, d, seed=0), _unit(2 * B, d, seed=1)
    for expa_type in (0, 1):
        expa, R = simdino.expansion(s, t, eps, expa_type)
        z = s[:2 * B].view(2, B, d)
        z = (z + t.view(2, B, d)) / 2 if expa_type else z
        torch.testing.assert_close(expa, official_mcr_expansion(z, eps, N=4), rtol=1e-10, atol=0)
        gamma = (d + 4 * B) / (d * 4 * B)
        torch.testing.assert_close(expa / R, torch.tensor(gamma, dtype=expa.dtype), rtol=1e-12, atol=0)


def test_global_batch_counts_with_identical_ranks(two_identical_ranks):
    """Two ranks holding the same batch = one process on the batch twice over: SimDINO's γ·R with
    reduced covariances, DINO's centre, DINOv2's Sinkhorn–Knopp and patch centre."""
    W, B, d = two_identical_ranks, 5, 8
    s, t = _unit(4 * B, d, seed=2), _unit(2 * B, d, seed=3)
    expa, R = simdino.expansion(s, t, 0.3, 1, reduce_cov=True)
    z = ((s[:2 * B] + t) / 2).view(2, B, d)
    zz = torch.cat([z, z], dim=1)                                       # the global batch (2, W·B, d)
    R_global = coding_rate(zz, 0.3, n_global=W * B, reduce_cov=False).mean()
    torch.testing.assert_close(R, R_global, rtol=1e-10, atol=0)
    torch.testing.assert_close(expa, (d + W * B) / (d * W * B) * R_global, rtol=1e-10, atol=0)
    out = torch.randn(2 * B, 7, generator=torch.Generator().manual_seed(4))
    centre = torch.randn(1, 7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(dino.update_center(centre, out, 0.9), 0.9 * centre + 0.1 * out.mean(0, keepdim=True))
    torch.testing.assert_close(dinov2.mean_over_ranks(out), out.mean(0, keepdim=True))
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(6)) * 2
    logits[:, 0] += 3
    torch.testing.assert_close(dinov2.sinkhorn_knopp(logits.clone(), 0.3),
                               official_sinkhorn_knopp(torch.cat([logits, logits]), 0.3)[:6], rtol=1e-5, atol=1e-7)


TORCHRUN_SCRIPT = """
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from kernels import distributed as dist
from kernels.coding_rate import coding_rate
import simdino
dist.setup("cpu")
r, W, B, d, eps = dist.rank(), dist.world_size(), 6, 8, 0.3
g = torch.Generator().manual_seed(0)
s = F.normalize(torch.randn(W, 4 * B, d, generator=g, dtype=torch.float64), dim=-1)   # all ranks' batches
t = F.normalize(torch.randn(W, 2 * B, d, generator=g, dtype=torch.float64), dim=-1)
gamma = (d + W * B) / (d * W * B)                       # n = W·B
local = ((s[r, :2 * B] + t[r]) / 2).view(2, B, d)
expa, R = simdino.expansion(s[r], t[r], eps, 1, reduce_cov=False)
ref = coding_rate(local, eps, n_global=W * B).mean()     # the local Gram, the global α
assert torch.allclose(R, ref, rtol=1e-10) and torch.allclose(expa, gamma * ref, rtol=1e-10), (expa, R, ref)
expa, R = simdino.expansion(s[r], t[r], eps, 1, reduce_cov=True)
z = torch.cat([((s[k, :2 * B] + t[k]) / 2).view(2, B, d) for k in range(W)], dim=1)   # (2, W·B, d)
ref = coding_rate(z, eps, n_global=W * B).mean()         # one process on the global batch
assert torch.allclose(R, ref, rtol=1e-10) and torch.allclose(expa, gamma * ref, rtol=1e-10), (expa, R, ref)
dist.cleanup()
if r == 0:
    print("OK")
"""


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_simdino_expansion_under_torchrun(tmp_path):
    """Two real Gloo ranks with different data: γ uses n = 2·B; R of the local Gram with the
    global α (reduce_cov 0), or of the global batch (reduce_cov 1)."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = tmp_path / "expansion.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(root=ROOT)))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-2000:], r.stderr[-5000:])
