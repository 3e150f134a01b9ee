"""The papers' other evaluations of frozen features, run by eval.py:

    python eval.py seg|video|retrieval|copydetection|discover|depth|action --checkpoint runs/dino/checkpoint.pth

Without --data_path each task draws its own offline data from data.py's shapes: 64 px scenes of
three shapes of different classes with per-pixel masks and boxes (seg, discover), 16-frame clips of
them moving (video), strongly augmented instance copies of the training images (retrieval, copy
detection), shapes standing at random depths on a ground plane (depth), 8-frame clips of a shape whose
motion is the class (action). With --data_path each reads the real dataset's layout (below) and
reports the paper's metric. Features are the backbone's last layer (after its norm): patch tokens for
the dense tasks, the CLS token (and GeM-pooled patches for copy detection) for retrieval.

- seg (DINOv2 §7.4, "linear" setting): a linear head on the frozen patch tokens; mIoU, mAcc.
  ADE20K: ADEChallengeData2016/{images,annotations}/{training,validation}, label 0 ignored; images
  resized whole to a square (the official protocol slides 512 px windows).
- video (DINO §4.2.2, eval_video_segmentation.py): label propagation from the first frame; J&F.
  DAVIS: DAVIS/{JPEGImages,Annotations}/480p/<video>/, ImageSets/2017/val.txt.
- retrieval (DINO §4.2.1, eval_image_retrieval.py): cosine ranking of CLS features; mAP.
  rOxford5k / rParis6k: <dir>/jpg/*.jpg and <dir>/gnd_r*.pkl (Medium and Hard protocols).
- copydetection (DINO §4.2.1, eval_copy_detection.py): CLS + GeM-pooled patches, whitened; mAP of
  the strong copies. Copydays: original/ and strong/ (a copy matches the originals whose names
  share its first 4 characters), distractors/ optional.
- discover (MaskCut, Wang et al. 2023, after TokenCut): normalized cuts of the last block's key
  graph; box AP50 / AP75 / AP. COCO: val2017/ and annotations/instances_val2017.json.
- depth (DINOv2 §7.4, "lin. 1" and "lin. 4"): a linear head on the patch tokens of the last block
  (of four blocks), the CLS token concatenated, depth as the expectation over 256 bins; RMSE, AbsRel,
  δ1. The depth toolbox's split files: NYU-Depth v2 (nyu_train.txt, nyu_test.txt: the Eigen test
  images; 16-bit depth PNGs in mm, capped at 10 m, Eigen crop) and KITTI (kitti_eigen_train.txt,
  kitti_eigen_test.txt, input/ and gt_depth/; depth PNGs in 1/256 m, capped at 80 m, Garg crop).
- action (DINOv2 §7.2): the CLS and mean patch token of 8 frames per clip, averaged (UCF101,
  Kinetics) or concatenated (the offline clips, as DINOv2 for SSv2), a linear classifier; top-1.
  UCF101: classInd.txt, trainlist01.txt, testlist01.txt, frames extracted per video; Kinetics-style:
  train/<class>/<clip>/*.jpg and val/.
"""
import glob
import json
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

import data as data_lib

TASKS = ("seg", "video", "retrieval", "copydetection", "discover", "depth", "action")


# ----------------------------------------------------------------------------------------------
# Features.

@torch.no_grad()
def _per_batch(fn, images, device, size=None, batch_size=64):
    """fn(normalised images (B, 3, S, S)) -> (B, ...) over uint8 images (N, 3, H, W) in batches,
    float32 on CPU; S = size, else the images' own."""
    return torch.cat([fn(data_lib.eval_view(x.to(device), size or x.shape[-1])).float().cpu()
                      for x in images.split(batch_size)])


def patch_features(backbone, images, device):
    """uint8 images (N, 3, H, W) -> last-layer patch tokens (N, H/p, W/p, D)."""
    tokens = _per_batch(lambda x: backbone.forward_features(x)["x_norm_patchtokens"], images, device)
    return tokens.unflatten(1, (images.shape[-2] // backbone.patch_size, -1))


def global_features(backbone, images, device, size, pool=None):
    """uint8 images, resized to size x size -> CLS tokens (N, D); with pool "gem" also the patch tokens
    GeM-pooled with p = 4 after clamping at 1e-6 (N, 2D), as the official copy detection; with "mean" also
    their mean (N, 2D), as DINOv2's linear probes."""
    def cls_and_pooled(x):
        f = backbone.forward_features(x)
        patches = f["x_norm_patchtokens"]
        pooled = {"gem": lambda: patches.clamp(min=1e-6).pow(4).mean(1).pow(0.25), "mean": lambda: patches.mean(1)}
        return torch.cat([f["x_norm_clstoken"], pooled[pool]()], -1) if pool else f["x_norm_clstoken"]
    return _per_batch(cls_and_pooled, images, device, size, batch_size=256)


def block_tokens(backbone, images, device, blocks):
    """The tokens after the given blocks, not normalised (DINOv2's depth heads read get_intermediate_layers
    with norm=False), blocks concatenated along channels -> (CLS (N, L·D), patches (N, h, w, L·D))."""
    def tokens(x):
        t, out = backbone.prepare_tokens(x), []
        for i, blk in enumerate(backbone.blocks):
            t = blk(t)
            out += [t] if i in blocks else []
        t = torch.cat(out, -1)
        return torch.cat([t[:, :1], t[:, 1 + backbone.num_register_tokens:]], 1)   # registers left out
    t = _per_batch(tokens, images, device)
    return t[:, 0], t[:, 1:].unflatten(1, (images.shape[-2] // backbone.patch_size, -1))


def last_keys(backbone, images, device):
    """The keys of the last block's attention for the patches, heads concatenated (N, h, w, D)."""
    def keys(x):
        t = backbone.prepare_tokens(x)
        for blk in backbone.blocks[:-1]:
            t = blk(t)
        _, k, _ = backbone.blocks[-1].attn.qkv_heads(backbone.blocks[-1].norm1(t))  # (B, heads, T, d)
        return k.transpose(1, 2).flatten(2)[:, 1 + backbone.num_register_tokens:]
    return _per_batch(keys, images, device).unflatten(1, (images.shape[-2] // backbone.patch_size, -1))


def _resize(image, size):
    """uint8 (3, H, W) -> (3, *size), bicubic and antialiased."""
    x = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def _resize_short(x, size, step):
    """Images (..., 3, H, W) resized so that the short side is `size` and the long one is floored to a
    multiple of `step`, as the official DAVIS read_frame."""
    H, W = x.shape[-2:]
    th, tw = (size, int(size * W / H) // step * step) if W > H else (int(size * H / W) // step * step, size)
    return torch.stack([_resize(f, (th, tw)) for f in x.reshape(-1, 3, H, W)]).view(*x.shape[:-2], th, tw)


def _resize_labels(labels, size):
    """A label map (H, W) -> (*size), nearest."""
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(labels.dtype)


def _read(path, size=None):
    """An image file -> uint8 (3, H, W), resized whole to size x size when given."""
    x = torch.from_numpy(np.array(data_lib.read_rgb(path))).permute(2, 0, 1).contiguous()
    return x if size is None else _resize(x, (size, size))


def _read_index_png(path):
    """A palette or grey PNG's raw values (DAVIS object ids, ADE20K classes) -> (H, W) int64."""
    from PIL import Image
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im, dtype=np.int64))


def _dataset_root(data_path, name):
    """data_path/name where that folder exists (the archive's own top folder), else data_path."""
    return os.path.join(data_path, name) if os.path.isdir(os.path.join(data_path, name)) else data_path


def _required(path, dataset):
    """path, when the file is there; else the one-line error that --data_path is not a `dataset` folder."""
    if not os.path.isfile(path):
        raise data_lib.DataError(f"{path} not found: --data_path should be a {dataset} folder")
    return path


def _files(folder):
    """The image files of a folder, sorted."""
    if not os.path.isdir(folder):
        raise data_lib.DataError(f"{folder} is not a directory (see `python eval.py --help` for the layouts)")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(data_lib.IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------------------------
# Linear classifiers on frozen features: eval.py's fast linear probe, and action recognition.

def accuracy(logits, labels):
    """(top-1, top-5) in % of logits (N, C) against labels (N,)."""
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (pred[:, 0] == labels).float().mean().item()
    top5 = (pred == labels[:, None]).any(1).float().mean().item()
    return 100.0 * top1, 100.0 * top5


def fit_logistic(ftr, ytr, num_classes, weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), iters=200):
    """Logistic regression on standardised features by full-batch L-BFGS, its L2 weight picked on 10 %
    of the train split and refitted on all of it (as DINOv2's log_regression.py sweeps its C)
    -> (logits of new features, the weight decay)."""
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr = (ftr - mean) / std

    def fit(x, y, wd):
        W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
        b = torch.zeros(num_classes, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, max_eval=iters, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ W + b, y) + 0.5 * wd * W.square().sum()
            loss.backward()
            return loss
        opt.step(closure)
        return lambda z: (z @ W + b).detach()

    order = torch.randperm(len(ftr), generator=torch.Generator().manual_seed(0)).to(ftr.device)
    val, fit_idx = order[:len(ftr) // 10], order[len(ftr) // 10:]
    scores = {wd: accuracy(fit(ftr[fit_idx], ytr[fit_idx], wd)(ftr[val]), ytr[val])[0] for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (scores[wd], wd))  # ties: the stronger regulariser
    predict = fit(ftr, ytr, best)
    return lambda z: predict((z - mean) / std), best


def logistic_regression(ftr, ytr, fte, yte, num_classes, **kw):
    """eval.py's fast linear probe: fit_logistic -> ((top-1, top-5) on the held-out split, the weight decay)."""
    predict, wd = fit_logistic(ftr, ytr, num_classes, **kw)
    return accuracy(predict(fte), yte), wd


# ----------------------------------------------------------------------------------------------
# Linear semantic segmentation.

def segmentation_data(data_path, size, max_images=0):
    """(train images, train labels, eval images, eval labels, class names): uint8 (N, 3, S, S) and
    int64 (N, S, S) labels, -1 where ignored; synthetic: 1000 + 300 scenes, 11 classes (background
    and the 10 shapes)."""
    if not data_path:
        images, ids, classes = data_lib.make_scenes(1300, size=size, seed=1)
        ids = ids[:, 0].long()                                                  # (N, S, S): object 1..3, 0
        labels = F.pad(classes + 1, (1, 0)).gather(1, ids.flatten(1)).view_as(ids)  # object k -> its class + 1
        return images[:1000, 0], labels[:1000], images[1000:, 0], labels[1000:], ("background",) + data_lib.SHAPES
    root = _dataset_root(data_path, "ADEChallengeData2016")
    splits = []
    for split in ("training", "validation"):
        files = _files(os.path.join(root, "images", split))[:max_images or None]
        labels = [os.path.join(root, "annotations", split, os.path.splitext(os.path.basename(f))[0] + ".png")
                  for f in files]
        x = torch.stack([_read(f, size) for f in files])
        y = torch.stack([_resize_labels(_read_index_png(f), (size, size)) for f in labels])
        splits += [x, y - 1]  # ADE20K: 0 is "other", ignored; classes 1..150 -> 0..149
    return (*splits, tuple(f"class {i}" for i in range(150)))


def segmentation_metrics(pred, target, num_classes):
    """mIoU and mAcc as mmsegmentation counts them, from one confusion matrix of all pixels (target
    -1 ignored): IoU = TP / (TP + FP + FN) averaged over the classes in the prediction or the
    target, accuracy = TP / (TP + FN) over those in the target."""
    keep = target >= 0
    cm = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2)
    cm = cm.view(num_classes, num_classes).double()
    tp, in_target, in_pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = in_target + in_pred - tp
    return (tp / union)[union > 0].mean().item(), (tp / in_target)[in_target > 0].mean().item()


def _train_head(head, loss, n, steps, batch_size, lr, seed):
    """AdamW (weight decay 1e-4), its lr on a cosine over `steps` batches drawn at random from the n
    training examples; loss(indices of a batch) -> its loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        batch_loss = loss(torch.randint(n, (min(batch_size, n),), generator=g))
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        opt.step()
        sched.step()


def linear_segmentation(ftr, ytr, fte, num_classes, steps=500, batch_size=16, lr=1e-3, seed=0):
    """A linear head on frozen patch features ftr (N, h, w, D), standardised per channel with their
    statistics (the frozen BatchNorm of DINOv2's linear head), its logits upsampled bilinearly to
    the pixel labels ytr (N, S, S); returns the predicted labels of fte (M, S, S)."""
    mean, std = ftr.mean((0, 1, 2)), ftr.std((0, 1, 2)) + 1e-6
    head = torch.nn.Linear(ftr.shape[-1], num_classes)
    logits = lambda f: F.interpolate(head((f - mean) / std).permute(0, 3, 1, 2), size=ytr.shape[-2:],
                                     mode="bilinear", align_corners=False)
    _train_head(head, lambda i: F.cross_entropy(logits(ftr[i]), ytr[i], ignore_index=-1), len(ftr), steps,
                batch_size, lr, seed)
    with torch.no_grad():
        return torch.cat([logits(f).argmax(1) for f in fte.split(64)])


# ----------------------------------------------------------------------------------------------
# Monocular depth: DINOv2's linear probe (§7.4; dinov2/hub/depthers.py and eval/depth).

# Real data: split file, depth PNG units per metre, depth cap (m), evaluation crop (top, bottom,
# left, right as fractions of the ground truth), as the depth toolbox DINOv2 evaluates with.
DEPTH_SETS = {"NYU-Depth v2": ("nyu_train.txt", "nyu_test.txt", 1000.0, 10.0, (45 / 480, 471 / 480, 41 / 640, 601 / 640)),
              "KITTI": ("kitti_eigen_train.txt", "kitti_eigen_test.txt", 256.0, 80.0,
                        (0.40810811, 0.99189189, 0.03594771, 0.96405229))}   # NYU: Eigen crop; KITTI: Garg crop


def depth_scenes(n, size=64, objects=3, seed=0, max_depth=10.0):
    """Scenes with a depth map in metres: a camera 1 m over a ground plane, its horizon at 20-40 % of the
    image height, the ground at depth f·h / (row − horizon) (capped at max_depth), the sky without
    depth (0, as where NYU and KITTI have none), and `objects` of data.py's shapes standing on the ground
    at depths z in [1.5, 8] m (uniform in 1 / z): radius f·0.3 m / z and base on the ground row of z
    (size and height in the image follow depth), each flat and facing the camera (its pixels at z),
    drawn far to near by data.py's renderer, so a nearer shape covers a farther one. -> images uint8
    (n, 3, S, S), depth float32 (n, S, S), instance ids uint8 (n, S, S) (0 sky, 1 ground, 2.. the
    objects far to near), depths (n, objects) in that order."""
    rng = np.random.default_rng(seed)
    horizons, f = rng.uniform(0.2, 0.4, n) * size, 0.7 * size
    rows = np.arange(size) + 0.5
    ground = np.minimum(max_depth, f / np.clip(rows - horizons[:, None], 1e-6, None))   # (n, S) depth per row
    zs = np.sort(1 / rng.uniform(1 / 8, 1 / 1.5, (n, objects)), axis=1)[:, ::-1].copy()  # far to near
    images, ids = np.empty((n, size, size), np.float32), np.empty((n, size, size), np.uint8)
    for i, horizon in enumerate(horizons):
        # the ground: data.py's square turned by 45° (half side 0.6 radius), its top edge on the horizon
        scene = [("square", size / 2, horizon + 0.6 * 2 * size, 2 * size, np.pi / 4, 1.0, rng.uniform(0.25, 0.45))]
        for z in zs[i]:
            r = f * 0.3 / z
            scene.append((data_lib.SHAPES[rng.integers(len(data_lib.SHAPES))], rng.uniform(r, size - r),
                          horizon + f / z - r, r, rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0]), rng.uniform(0.65, 1.0)))
        images[i], ids[i] = data_lib._render(rng.uniform(0.0, 0.2), scene, size, 3)
    depth = np.concatenate([np.zeros((n, 2)), zs], 1)[np.arange(n)[:, None, None], ids]
    depth = np.where(ids == 1, ground[:, :, None], depth).astype(np.float32)
    return data_lib._to_uint8(images, rng), torch.from_numpy(depth), torch.from_numpy(ids), torch.from_numpy(zs)


def depth_data(data_path, size, patch_size, max_images=0):
    """(train images, train depth at their size, test images, test depth at full resolution, cap,
    crop); synthetic: 1000 + 300 scenes of depth_scenes, no crop. Real (DEPTH_SETS): the split file's
    "<image> <depth PNG> [focal]" lines (NYU under data_path, KITTI under input/ and gt_depth/, "None"
    depths skipped), KITTI's images and depths cropped to the bottom-centre 352 x 1216 first (the
    toolbox's KB crop); images resized to short side `size` (the official runs at full resolution)."""
    if not data_path:
        images, depth, _, _ = depth_scenes(1300, size, seed=6)
        return images[:1000], depth[:1000], images[1000:], depth[1000:], 10.0, None
    name = next((k for k, v in DEPTH_SETS.items() if os.path.isfile(os.path.join(data_path, v[0]))), None)
    if name is None:
        raise data_lib.DataError(f"{data_path} holds neither nyu_train.txt (NYU-Depth v2) nor kitti_eigen_train.txt "
                                 f"(KITTI Eigen split)")
    train_list, test_list, scale, cap, crop = DEPTH_SETS[name]
    image_dir, depth_dir = ("input", "gt_depth") if name == "KITTI" else ("", "")
    splits = []
    for listing in (train_list, test_list):
        pairs = [line.split()[:2] for line in open(_required(os.path.join(data_path, listing), name)) if line.strip()]
        pairs = [(os.path.join(data_path, image_dir, a.lstrip("/")), os.path.join(data_path, depth_dir, b.lstrip("/")))
                 for a, b in pairs if b != "None"][:max_images or None]
        kb = lambda x: x[..., max(0, x.shape[-2] - 352):, max(0, (x.shape[-1] - 1216) // 2):][..., :352, :1216] \
            if name == "KITTI" else x
        x = _resize_short(torch.stack([kb(_read(a)) for a, _ in pairs]), size, patch_size)
        y = torch.stack([kb(_read_index_png(_required(b, name)).float() / scale) for _, b in pairs])
        splits += [x, y if splits else torch.stack([_resize_labels(d, x.shape[-2:]) for d in y])]
    return (*splits, cap, crop)


def depth_from_bins(logits, min_depth, max_depth):
    """DINOv2's depth as classification (its released linear heads: 256 bins spaced uniformly from
    min_depth to max_depth, "linear" normalisation after AdaBins, not a softmax): per pixel, weights
    relu(logit) + 0.1 normalised to sum 1, depth = Σ weight_k · bin_k. logits (B, K, h, w) -> (B, h, w)."""
    bins = torch.linspace(min_depth, max_depth, logits.shape[1])
    num, den = torch.einsum("bkhw,kc->cbhw", logits.relu(), torch.stack([bins, torch.ones_like(bins)], 1))
    return (num + 0.1 * bins.sum()) / (den + 0.1 * len(bins))    # Σ (relu + 0.1)·bin / Σ (relu + 0.1)


def sigloss(pred, target):
    """DINOv2's training loss (AdaBins' scale-invariant log loss) over pixels of known depth (target > 0):
    g = log(pred + 1e-3) − log(target + 1e-3), √(Var g + 0.15·(mean g)²)."""
    g = (pred + 1e-3).log()[target > 0] - (target + 1e-3).log()[target > 0]
    return (g.var() + 0.15 * g.mean() ** 2).sqrt()


def linear_depth(ctr, ptr, ytr, cte, pte, out_size, max_depth, bins=256, steps=500, batch_size=8, lr=1e-3, seed=0):
    """DINOv2's linear depth head on frozen tokens: each patch token with the CLS token concatenated, a
    linear map to `bins` logits (computed as W_p·patch + W_c·CLS), upsampled 4x bilinearly (the official
    upsamples the tokens; a linear map commutes with it), depth_from_bins (1e-3 to max_depth) resized
    bilinearly to the labels ytr (N, H, W); trained with sigloss. Tokens standardised per channel as
    linear_segmentation's (the official head's BatchNorm is commented out; a linear map absorbs the affine
    change, it only conditions AdamW). -> the predicted depth of the test tokens (M, *out_size)."""
    (cm, cs), (pm, ps) = ((t.mean(0), t.std(0) + 1e-6) for t in (ctr, ptr.flatten(0, 2)))
    C, (h, w) = ctr.shape[-1], ptr.shape[1:3]
    head = torch.nn.Linear(2 * C, bins)
    # bilinear 4x upsampling (align_corners=False) as matrices (4h, h) and (4w, w): the same, 5x faster on CPU
    Uh, Uw = (F.interpolate(torch.eye(n)[:, None, :, None], size=(4 * n, 1), mode="bilinear")[:, 0, :, 0].T for n in (h, w))

    def depth(c, p, size):
        logits = (p - pm) / ps @ head.weight[:, :C].T + head.bias + ((c - cm) / cs @ head.weight[:, C:].T)[:, None, None]
        d = depth_from_bins(Uh @ logits.permute(0, 3, 1, 2) @ Uw.T, 1e-3, max_depth)[:, None]
        return F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0]
    _train_head(head, lambda i: sigloss(depth(ctr[i], ptr[i], ytr.shape[-2:]), ytr[i]), len(ptr), steps, batch_size,
                lr, seed)
    with torch.no_grad():
        return torch.cat([depth(c, p, out_size) for c, p in zip(cte.split(16), pte.split(16))])


def depth_metrics(pred, gt, max_depth, crop=None, min_depth=1e-3):
    """The depth toolbox's metrics, per image over its pixels with min_depth < gt < max_depth (and inside
    `crop`: top, bottom, left, right as fractions), then averaged over the images: RMSE = √mean((gt −
    pred)²) in metres, AbsRel = mean(|gt − pred| / gt), δ1 = the share with max(gt/pred, pred/gt) < 1.25."""
    keep = (gt > min_depth) & (gt < max_depth)
    if crop is not None:
        H, W = gt.shape[-2:]
        box = torch.zeros_like(keep)
        box[..., int(crop[0] * H):int(crop[1] * H), int(crop[2] * W):int(crop[3] * W)] = True
        keep &= box
    rmse, absrel, d1 = zip(*[(((g - p) ** 2).mean().sqrt(), ((g - p).abs() / g).mean(),
                              (torch.maximum(g / p, p / g) < 1.25).float().mean())
                             for p, g in ((p[k], g[k]) for p, g, k in zip(pred, gt, keep)) if len(g)])
    return {"RMSE": torch.stack(rmse).mean().item(), "AbsRel": torch.stack(absrel).mean().item(),
            "delta1": torch.stack(d1).mean().item()}


# ----------------------------------------------------------------------------------------------
# Video object segmentation by label propagation.

def propagate_labels(feats, first, n_last_frames=7, neighbourhood=12, topk=5, temperature=0.1):
    """DINO's label propagation. feats (T, h, w, D) patch features of a clip, first (C, h, w) the
    first frame's one-hot labels at patch resolution -> soft labels (T, C, h, w). Frame t's labels
    are the affinity-weighted labels of its context (the first frame and the n previous frames'
    propagated labels): for each patch, affinities exp(cos / temperature) to context patches within
    `neighbourhood` patches, all but the topk largest set to 0, normalised to sum 1."""
    T, h, w, _ = feats.shape
    f = F.normalize(feats.flatten(1, 2).float(), dim=-1)                       # (T, hw, D)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = ((yy[:, None] - yy[None]).abs() <= neighbourhood) & ((xx[:, None] - xx[None]).abs() <= neighbourhood)
    labels, queue = [first.flatten(1).float()], []                             # (C, hw) per frame
    for t in range(1, T):
        context = [0] + queue
        aff = torch.exp(f[t] @ f[context].transpose(1, 2) / temperature) * near  # (n, hw query, hw source)
        aff = aff.permute(0, 2, 1).reshape(-1, h * w)                          # (n·hw sources, hw queries)
        kth = aff.topk(min(topk, len(aff)), dim=0).values[-1]
        aff = torch.where(aff >= kth, aff, 0)
        labels.append(torch.cat([labels[c] for c in context], 1) @ (aff / aff.sum(0)))
        queue = (queue + [t])[-n_last_frames:]
    return torch.stack(labels).view(T, -1, h, w)


def labels_to_pixels(soft, patch_size, size=None):
    """Soft patch labels (T, C, h, w) -> label maps (T, H, W), each channel rescaled to [0, 1] as the
    official norm_mask; resized to `size` (the original frame size) when given."""
    up = F.interpolate(soft, scale_factor=patch_size, mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    up = torch.where(hi > 0, (up - lo) / (hi - lo).clamp(min=1e-12), up)
    out = up.argmax(1)
    return out if size is None else F.interpolate(out[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def _boundary(mask):
    """Pixels of masks (N, H, W) bool with one of their 8 neighbours outside the mask."""
    eroded = -F.max_pool2d(-mask.float()[:, None], 3, 1, 1)[:, 0]
    return mask & (eroded < 1)


def _dilate(mask, radius):
    """Dilation of masks (N, H, W) bool by a disk of `radius` pixels."""
    r = torch.arange(-radius, radius + 1)
    disk = ((r[:, None] ** 2 + r[None] ** 2) <= radius ** 2).float()[None, None]
    return F.conv2d(mask.float()[:, None], disk, padding=radius)[:, 0] > 0


def j_and_f(pred, gt, objects, bound_th=0.008):
    """DAVIS-2017's J&F for one clip: pred and gt label maps (T, H, W), objects = ids 1..K.
    J: the IoU of each object's masks (1 when both are empty); F: the F-measure of their boundaries,
    a boundary pixel matching when the other boundary is within ceil(0.008 · image diagonal) pixels.
    Per object averaged over frames 1..T-2 (DAVIS leaves out the first and the last). -> (J, F) (K,)."""
    pred, gt = pred[1:-1], gt[1:-1]
    radius = max(1, math.ceil(bound_th * math.hypot(*gt.shape[-2:])))
    js, fs = [], []
    for k in objects:
        p, g = pred == k, gt == k
        inter, union = (p & g).sum((1, 2)).double(), (p | g).sum((1, 2)).double()
        js.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean())
        bp, bg = _boundary(p), _boundary(g)
        n_p, n_g = bp.sum((1, 2)).double(), bg.sum((1, 2)).double()
        precision = torch.where(n_p > 0, (bp & _dilate(bg, radius)).sum((1, 2)) / n_p.clamp(min=1), 1.0 * (n_g == 0))
        recall = torch.where(n_g > 0, (bg & _dilate(bp, radius)).sum((1, 2)) / n_g.clamp(min=1), 1.0 * (n_p == 0))
        fs.append(torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                              0.0).mean())
    return torch.stack(js), torch.stack(fs)


def video_data(data_path, size=64, patch_size=8):
    """Clips as (name, frames uint8 (T, 3, H, W), labels (T, H, W) int64 (-1 where not annotated),
    original size or None); synthetic: 20 clips of 16 frames. DAVIS frames are resized as the
    official read_frame: short side `size` (480), long side floored to a multiple of 64 (of the
    patch size where 64 is not one)."""
    if not data_path:
        frames, ids, _ = data_lib.make_scenes(20, frames=16, size=size, seed=2)
        return [(f"clip{i}", frames[i], ids[i].long(), None) for i in range(len(frames))]
    root = _dataset_root(data_path, "DAVIS")
    listing = _required(os.path.join(root, "ImageSets", "2017", "val.txt"), "DAVIS-2017")
    clips = []
    for name in open(listing).read().split():
        files = _files(os.path.join(root, "JPEGImages", "480p", name))
        raw = torch.stack([_read(f) for f in files])
        H, W = raw.shape[-2:]
        labels = [os.path.join(root, "Annotations", "480p", name, os.path.basename(f)[:-4] + ".png") for f in files]
        labels = torch.stack([_read_index_png(p) if os.path.isfile(p) else torch.full((H, W), -1) for p in labels])
        clips.append((name, _resize_short(raw, size, 64 if 64 % patch_size == 0 else patch_size), labels, (H, W)))
    return clips


# ----------------------------------------------------------------------------------------------
# Action recognition: DINOv2's video classification (§7.2).

MOTIONS = ("left", "right", "up", "down", "clockwise", "anticlockwise", "grow", "shrink")
_STEPS = [(-1, 0, 0, 0), (1, 0, 0, 0), (0, -1, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, -1, 0), (0, 0, 0, 1),
          (0, 0, 0, -1)]   # per motion, steps of (x, y, angle, log radius); y and angle grow downwards / clockwise


def action_clips(n, frames=8, size=64, seed=0):
    """n clips (n, frames, 3, S, S) uint8 of one shape each, moving, and their classes (n,), the motion
    (MOTIONS: 0.03·S px, 0.15 rad or x1.06 per frame). Shape (any of data.py's but the disk and the ring,
    which do not show a turn), position, radius, angle, mirror and grey levels are drawn independently of
    the class, and frame t shows the state at the clip's middle moved (t − (frames − 1) / 2) steps: the
    middle frames look alike whatever the motion, so a single frame tells next to nothing of the class."""
    rng = np.random.default_rng(seed)
    labels, shapes = rng.integers(0, len(MOTIONS), n), [s for s in data_lib.SHAPES if s not in ("disk", "ring")]
    images, half = np.empty((n, frames, size, size), np.float32), (frames - 1) / 2
    for i in range(n):
        shape, r = shapes[rng.integers(len(shapes))], rng.uniform(0.08, 0.12) * size
        margin = r * 1.06 ** half + 0.03 * size * half          # room for every motion to stay in the image
        cx, cy = rng.uniform(margin, size - margin, 2)
        angle, mirror, level, background = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0]), *rng.uniform(
            (0.65, 0.0), (1.0, 0.35))
        dx, dy, da, ds = _STEPS[labels[i]]
        for t in range(frames):
            u = t - half
            obj = (shape, cx + u * dx * 0.03 * size, cy + u * dy * 0.03 * size, r * 1.06 ** (u * ds),
                   angle + u * da * 0.15, mirror, level)
            images[i, t] = data_lib._render(background, [obj], size, 3)[0]
    return data_lib._to_uint8(images, rng), torch.from_numpy(labels)


def action_data(data_path, max_images=0, frames=8):
    """(train clips, test clips, class names, pooling): clips as [(frames uint8 (T, 3, H, W) or T frame
    files, label)]; synthetic: 400 + 160 action_clips, whose class is the motion, so the frames'
    features are concatenated (as DINOv2 does for SSv2); real: `frames` evenly spaced frames (the
    centres of equal segments) of each clip, their features averaged (as DINOv2 for UCF101 and K-400).
    UCF101: classInd.txt, trainlist01.txt, testlist01.txt (in data_path or ucfTrainTestlist/), each
    video's frames extracted into a folder named as the video without its extension (in data_path or
    UCF-101/). Kinetics-style: train/<class>/<clip>/*.jpg and val/ (or test/)."""
    if not data_path:
        clips, labels = action_clips(560, frames, seed=7)
        return list(zip(clips[:400], labels[:400])), list(zip(clips[400:], labels[400:])), MOTIONS, "concat"
    lists = next((d for d in (data_path, os.path.join(data_path, "ucfTrainTestlist"))
                  if os.path.isfile(os.path.join(d, "classInd.txt"))), None)
    if lists:
        names = [line.split()[1] for line in open(os.path.join(lists, "classInd.txt")) if line.strip()]
        root = _dataset_root(data_path, "UCF-101")
        splits = []
        for listing in ("trainlist01.txt", "testlist01.txt"):
            videos = [line.split()[0] for line in open(_required(os.path.join(lists, listing), "UCF101")) if line.strip()]
            splits.append([(os.path.join(root, os.path.splitext(v)[0]), names.index(v.split("/")[0])) for v in videos])
    elif os.path.isdir(os.path.join(data_path, "train")):
        names = sorted(os.listdir(os.path.join(data_path, "train")))
        test = "val" if os.path.isdir(os.path.join(data_path, "val")) else "test"
        splits = [[(os.path.join(data_path, split, c, clip), k) for k, c in enumerate(names)
                   for clip in sorted(os.listdir(os.path.join(data_path, split, c)))] for split in ("train", test)]
    else:
        raise data_lib.DataError(f"{data_path} holds neither UCF101's classInd.txt nor a Kinetics-style "
                                 f"train/<class>/<clip>/ folder of frames")
    out = []
    for split in splits:
        split = split[::max(1, len(split) // max_images)][:max_images] if max_images else split  # all classes
        for folder, _ in split:
            if not os.path.isdir(folder):
                video = next(iter(glob.glob(glob.escape(folder) + ".*")), None)
                raise data_lib.DataError(f"{video} is a video: extract its frames into {folder}/ (reading videos needs "
                                         f"PyAV)" if video else f"{folder} not found (a folder of the clip's frames)")
        out.append([(_evenly(_files(folder), frames), label) for folder, label in split])
    return (*out, tuple(names), "mean")


def _evenly(items, k):
    """k items at the centres of k equal segments of the list (repeated when it is shorter)."""
    if not items:
        raise data_lib.DataError("a clip folder holds no frames")
    return [items[(2 * i + 1) * len(items) // (2 * k)] for i in range(k)]


def clip_features(backbone, clips, device, size, batch=8):
    """Each clip's frames (uint8 tensors or files, read resized whole to size x size) -> CLS and mean patch
    token of each frame, DINOv2's linear-probe features (N, T, 2D); `batch` clips per forward."""
    out = []
    for i in range(0, len(clips), batch):
        frames = [f if torch.is_tensor(f) else torch.stack([_read(p, size) for p in f]) for f, _ in clips[i:i + batch]]
        out.append(global_features(backbone, torch.cat(frames), device, size, "mean").unflatten(0, (len(frames), -1)))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Retrieval and copy detection.

def average_precision(ranks, n_positives):
    """The Holidays / revisited Oxford AP of one query: `ranks` the 0-based ranks of its positives
    in the ranking (junk removed), sorted; the precision-recall curve integrated by trapezoids."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    j = torch.arange(len(ranks), dtype=torch.float64)
    p0 = torch.where(ranks > 0, j / ranks.clamp(min=1), 1.0)
    return ((p0 + (j + 1) / (ranks + 1)) / 2).sum().item() / n_positives


def mean_average_precision(similarity, positives, junk=None):
    """similarity (Q, N) query x database; positives[q] (and junk[q], ignored in the ranking) lists of
    database indices -> mAP over the queries that have positives."""
    order = similarity.argsort(1, descending=True)
    aps = []
    for q, pos in enumerate(positives):
        if len(pos) == 0:
            continue
        ranked = order[q]
        if junk is not None and len(junk[q]):
            ranked = ranked[~torch.isin(ranked, torch.as_tensor(junk[q]))]
        ranks = torch.nonzero(torch.isin(ranked, torch.as_tensor(pos))).flatten()
        aps.append(average_precision(ranks, len(pos)))
    return sum(aps) / len(aps)


def make_copies(images, g, strong):
    """Augmented copies of uint8 images (N, 3, S, S). Mild (retrieval's other views of an instance):
    a crop of 70-100 % of the area, flip, colour jitter. Strong (copy detection, as Copydays'
    "strong" block): a crop of 50-100 %, flip, colour jitter, blur (σ 0.1-1 px) and an overlay, a
    rectangle of random grey over 5-10 % of the copy. Milder than their names suggest: the images
    are 32 pixels of shapes and noise, and smaller crops leave nothing to retrieve by."""
    n, _, S, _ = images.shape
    x = images.float() / 255
    boxes = data_lib.random_resized_crop_boxes(n, S, S, (0.5, 1.0) if strong else (0.7, 1.0), g)
    x = data_lib.resized_crops(x, boxes, torch.rand(n, generator=g) < 0.5, S).clamp(0, 1)
    x = data_lib.color_jitter(x, g).clamp(0, 1)
    if strong:
        x = data_lib.gaussian_blur(x, torch.empty(n).uniform_(0.1, 1.0, generator=g))
        side = (torch.empty(n, 2).uniform_(0.05, 0.1, generator=g).sqrt() * S).long().clamp(min=1)
        corner = (torch.rand(n, 2, generator=g) * (S - side)).long()
        for i in range(n):
            (h, w), (t, l) = side[i].tolist(), corner[i].tolist()
            x[i, :, t:t + h, l:l + w] = torch.rand(1, generator=g)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def retrieval_data(data_path, size, g):
    """(database uint8, queries uint8, positives, junk, ground truth); synthetic: 500 new images of
    the training distribution (seed 3), 3 mild views of each in the database, one more view of the
    first 200 as queries, a query's positives the views of its image (no junk, no ground truth).
    Real: revisited Oxford / Paris, Medium protocol (easy + hard positive, junk ignored); the
    ground truth gives Hard too."""
    if not data_path:
        base, _ = data_lib.make_synthetic(500, seed=3)
        database = torch.cat([make_copies(base, g, strong=False) for _ in range(3)])  # view v of i at v·500 + i
        positives = [[i, 500 + i, 1000 + i] for i in range(200)]
        return database, make_copies(base[:200], g, strong=False), positives, None, None
    gnd_files = sorted(glob.glob(os.path.join(glob.escape(data_path), "gnd_r*.pkl")))
    if not gnd_files:
        raise data_lib.DataError(f"{data_path} holds no gnd_roxford5k.pkl / gnd_rparis6k.pkl (revisited Oxford / Paris)")
    try:
        with open(gnd_files[0], "rb") as f:
            cfg = _NumpyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise data_lib.DataError(f"cannot read {os.path.basename(gnd_files[0])}: {e}") from None
    jpg = lambda name: os.path.join(data_path, "jpg", name + ".jpg")
    database = torch.stack([_read(jpg(n), size) for n in cfg["imlist"]])
    queries = []
    for name, q in zip(cfg["qimlist"], cfg["gnd"]):  # queries are cropped to their box, as the official
        x0, y0, x1, y1 = (int(round(v)) for v in q["bbx"])
        queries.append(_resize(_read(jpg(name))[:, y0:y1, x0:x1], (size, size)))
    medium = [list(np.concatenate([q["easy"], q["hard"]])) for q in cfg["gnd"]]
    return database, torch.stack(queries), medium, [list(q["junk"]) for q in cfg["gnd"]], cfg["gnd"]


class _NumpyUnpickler(pickle.Unpickler):
    """The revisited Oxford / Paris ground truth: dicts, lists and numpy arrays; any other class
    in the pickle is refused (loading it could run code)."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: {module}.{name}")


def whiten(features, *others):
    """The official copy detection's whitening: centre with the mean of `features`, project on the
    eigenvectors of their (uncentred, as the official code) second-moment matrix, divided by the
    square root of the eigenvalues (clamped at 1e-5 of the largest)."""
    mean = features.mean(0)
    d, v = torch.linalg.eigh(features.double().T @ features.double() / len(features))
    P = v / d.clamp(min=d.max() * 1e-5).sqrt()
    return [((x - mean).double() @ P).float() for x in others]


def copy_detection_data(data_path, size, g):
    """(database, queries, positives, whitening images); synthetic: 2000 originals (new images of
    the training distribution, seed 4), strong copies of the first 300 as queries, 2000 other
    images to learn the whitening. Copydays: original/ and strong/ (distractors/ both in the database and for
    whitening when present, else the originals whiten)."""
    if not data_path:
        base, _ = data_lib.make_synthetic(4000, seed=4)
        return base[:2000], make_copies(base[:300], g, strong=True), [[i] for i in range(300)], base[2000:]
    originals, strong = _files(os.path.join(data_path, "original")), _files(os.path.join(data_path, "strong"))
    distractors = _files(os.path.join(data_path, "distractors")) if os.path.isdir(
        os.path.join(data_path, "distractors")) else []
    load = lambda files: torch.stack([_read(f, size) for f in files])
    positives = [[i for i, o in enumerate(originals) if os.path.basename(o)[:4] == os.path.basename(s)[:4]]
                 for s in strong]
    database = load(originals + distractors)
    return database, load(strong), positives, database[len(originals):] if distractors else database


# ----------------------------------------------------------------------------------------------
# Object discovery by normalized cuts.

def _component(mask, seed):
    """The 4-connected component of a bool grid (h, w) holding the flat index `seed`."""
    h, w = mask.shape
    out, todo = torch.zeros_like(mask), [divmod(int(seed), w)]
    while todo:
        i, j = todo.pop()
        if 0 <= i < h and 0 <= j < w and mask[i, j] and not out[i, j]:
            out[i, j] = True
            todo += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
    return out


def normalized_cuts(feats, n_masks=3, tau=0.2, eps=1e-5):
    """MaskCut on one image's patch features (h, w, D) -> [(mask (h, w) bool, score)]. Each round:
    the graph A = 1 where cos > tau else eps, the second-smallest eigenvector x of
    (D − A) x = λ D x, split at its mean; the side with x's largest |value| (the seed) is the
    foreground, unless 3 or 4 image corners are in it; the object is the seed's connected
    component, less the patches of earlier objects. Its features are zeroed for the next round; a
    mask overlapping the previous one (IoU > 0.5) or covering ≤ 1 % of the image is dropped.
    Score: 1 − λ₂."""
    h, w, _ = feats.shape
    f = F.normalize(feats.flatten(0, 1).double(), dim=-1)
    taken, out, previous = torch.zeros(h * w, dtype=torch.bool), [], None
    for _ in range(n_masks):
        g = f * (~taken)[:, None]
        A = torch.where(g @ g.T > tau, 1.0, eps).double()
        d = A.sum(1)
        # (D − A) x = λ D x  <=>  D^-1/2 (D − A) D^-1/2 u = λ u  with  x = D^-1/2 u
        lam, U = torch.linalg.eigh(torch.eye(h * w, dtype=torch.float64) - A / d.sqrt()[:, None] / d.sqrt()[None])
        x = U[:, 1] / d.sqrt()
        fg = x > x.mean()
        corners = fg.view(h, w)[[0, 0, -1, -1], [0, -1, 0, -1]].sum()
        if corners >= 3 or not fg[x.abs().argmax()]:
            fg, x = ~fg, -x
        mask = _component(fg.view(h, w), x.argmax()) & ~taken.view(h, w)  # earlier objects' patches taken out
        if previous is not None and ((mask & previous).sum() / (mask | previous).sum() > 0.5
                                     or mask.float().mean() <= 0.01):
            mask = torch.zeros_like(mask)
        previous, taken = mask, taken | mask.flatten()
        if mask.any():
            out.append((mask, 1 - lam[1].item()))
    return out


def mask_box(mask, scale=1.0):
    """The box (x0, y0, x1, y1) of a bool mask (h, w), scaled (patch grid -> pixels)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [v * scale for v in (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)]


def box_iou(a, b):
    """IoU of boxes a (N, 4) and b (M, 4), (x0, y0, x1, y1) -> (N, M)."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def box_ap(detections, ground_truth, iou_threshold):
    """COCO's class-agnostic box AP at one IoU threshold. detections[i] = (boxes (n, 4), scores (n,))
    and ground_truth[i] = boxes (m, 4) per image. Detections of all images by descending score, each
    matched to the unmatched ground-truth box of highest IoU ≥ threshold; precision made monotone,
    read at the 101 recalls 0, 0.01, ..., 1 (0 beyond the last), averaged."""
    records, n_gt = [], sum(len(g) for g in ground_truth)
    for (boxes, scores), gt in zip(detections, ground_truth):
        order = scores.argsort(descending=True)
        iou = box_iou(boxes[order], gt) if len(gt) and len(boxes) else torch.zeros(len(boxes), len(gt))
        used = torch.zeros(len(gt), dtype=torch.bool)
        for k, s in enumerate(scores[order].tolist()):
            cand = torch.where(used | (iou[k] < iou_threshold), -1.0, iou[k])
            hit = len(gt) > 0 and cand.max() >= 0
            if hit:
                used[cand.argmax()] = True
            records.append((s, hit))
    if n_gt == 0:
        return float("nan")
    records.sort(key=lambda r: -r[0])
    tp = torch.tensor([float(h) for _, h in records]).cumsum(0)
    precision = tp / torch.arange(1, len(records) + 1)
    recall = tp / n_gt
    precision = precision.flip(0).cummax(0).values.flip(0)  # the best precision at this recall or beyond
    at = torch.searchsorted(recall, torch.linspace(0, 1, 101), right=False)
    return torch.where(at < len(precision), precision[at.clamp(max=len(precision) - 1)], 0.0).mean().item()


def discovery_data(data_path, size, max_images=0):
    """(images uint8 (N, 3, S, S), ground-truth boxes per image in pixels of S); synthetic: 300
    scenes of three shapes. COCO: val2017 with its instance boxes (crowds left out)."""
    if not data_path:
        images, ids, _ = data_lib.make_scenes(300, size=size, seed=5)
        boxes = [torch.tensor([mask_box(m[0] == k) for k in range(1, 4) if (m[0] == k).any()]) for m in ids]
        return images[:, 0], boxes
    coco = json.load(open(_required(os.path.join(data_path, "annotations", "instances_val2017.json"), "COCO")))
    boxes = {}
    for a in coco["annotations"]:
        if not a.get("iscrowd"):
            x, y, w, h = a["bbox"]
            boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    images, gts = [], []
    for im in coco["images"][:max_images or None]:
        x = _read(os.path.join(data_path, "val2017", im["file_name"]))
        images.append(_resize(x, (size, size)))
        gt = torch.tensor(boxes.get(im["id"], []), dtype=torch.float32).view(-1, 4)   # in pixels of x
        gts.append(gt * torch.tensor([size / x.shape[-1], size / x.shape[-2]] * 2))     # in pixels of S
    return torch.stack(images), gts


# ----------------------------------------------------------------------------------------------
# The subcommands: one task on a backbone -> (results, picture).

def run(task, backbone, device, data_path="", global_size=32, dense_size=64, picture="task.png", max_images=0,
        seed=0):
    """Run `task`, draw its picture into the file `picture` and return its results (a dict);
    global_size is the resolution of whole-image features (retrieval, copy detection), dense_size
    that of the dense tasks' images."""
    torch.manual_seed(seed)
    g, p = torch.Generator().manual_seed(seed), backbone.patch_size
    if task == "seg":
        xtr, ytr, xte, yte, names = segmentation_data(data_path, dense_size, max_images)
        pred = linear_segmentation(patch_features(backbone, xtr, device), ytr, patch_features(backbone, xte, device),
                                   len(names), seed=seed)
        miou, macc = segmentation_metrics(pred, yte, len(names))
        _label_grid([xte[:6], yte[:6], pred[:6]], ["image", "truth", "linear head"], picture)
        return {"mIoU": 100 * miou, "mAcc": 100 * macc, "images": len(xte)}
    if task == "video":
        scores = []                                                             # (J, F) per clip
        for k, (_, frames, labels, original) in enumerate(video_data(data_path, dense_size, p)):
            first = _resize_labels(labels[0], (frames.shape[-2] // p, frames.shape[-1] // p))
            first = F.one_hot(first.clamp(min=0), int(labels[0].max()) + 1).permute(2, 0, 1)
            pred = labels_to_pixels(propagate_labels(patch_features(backbone, frames, device), first), p, original)
            scores.append(j_and_f(pred, labels, [o for o in labels[0].unique().tolist() if o > 0]))
            if k == 0:
                t = torch.linspace(0, len(frames) - 1, 5).round().long()
                shown = frames[t] if original is None else torch.stack([_resize(x, original) for x in frames[t]])
                _label_grid([shown, labels[t], pred[t]], ["frame", "truth", "propagated"], picture,
                            transpose=True)
        j, f = (torch.cat(per_object).mean().item() for per_object in zip(*scores))
        return {"J&F": 100 * (j + f) / 2, "J": 100 * j, "F": 100 * f, "clips": len(scores)}
    if task == "retrieval":
        database, queries, positives, junk, gnd = retrieval_data(data_path, global_size, g)
        fd, fq = (F.normalize(global_features(backbone, x, device, global_size), dim=-1) for x in (database, queries))
        sim = fq @ fd.T
        out = {"mAP": 100 * mean_average_precision(sim, positives, junk)}
        if gnd is not None:  # revisited protocols: Medium above, Hard here (the easy positives as junk)
            out = {"mAP_medium": out["mAP"], "mAP_hard": 100 * mean_average_precision(
                sim, [list(q["hard"]) for q in gnd], [list(q["junk"]) + list(q["easy"]) for q in gnd])}
        _ranking_picture(queries[:5], database, sim[:5], positives[:5], picture)
        return {**out, "queries": len(queries)}
    if task == "copydetection":
        database, queries, positives, whitening = copy_detection_data(data_path, global_size, g)
        fd, fq, fw = (global_features(backbone, x, device, global_size, "gem") for x in (database, queries, whitening))
        fd, fq = (F.normalize(x, dim=-1) for x in whiten(fw, fd, fq))
        sim = fq @ fd.T
        _ranking_picture(queries[:5], database, sim[:5], positives[:5], picture)
        return {"mAP": 100 * mean_average_precision(sim, positives), "queries": len(queries),
                "database": len(database)}
    if task == "discover":
        images, truth = discovery_data(data_path, dense_size, max_images)
        detections = []
        for keys in last_keys(backbone, images, device):
            cuts = normalized_cuts(keys)
            detections.append((torch.tensor([mask_box(m, p) for m, _ in cuts]).view(-1, 4),
                               torch.tensor([s for _, s in cuts], dtype=torch.float64)))
        aps = [box_ap(detections, truth, t) for t in torch.linspace(0.5, 0.95, 10).tolist()]
        _boxes_picture(images[:6], truth[:6], detections[:6], picture)
        return {"AP50": 100 * aps[0], "AP75": 100 * aps[5], "AP": 100 * sum(aps) / 10, "images": len(images)}
    if task == "depth":
        xtr, ytr, xte, yte, cap, crop = depth_data(data_path, dense_size, p, max_images)
        n = len(backbone.blocks)   # lin. 4: DINOv2's four evenly spaced blocks (ViT-S/B 2, 5, 8, 11), ViT-L's 4, 11, 17, 23
        blocks = {24: [4, 11, 17, 23]}.get(n, [round(n * (i + 1) / 4) - 1 for i in range(4)])
        (ctr, ptr), (cte, pte) = (block_tokens(backbone, x, device, blocks) for x in (xtr, xte))
        out, preds, D = {"images": len(xte)}, [], backbone.embed_dim
        for name, k in (("lin1", slice(-D, None)), ("lin4", slice(None))):   # lin. 1: the last block alone
            preds.append(linear_depth(ctr[:, k], ptr[..., k], ytr, cte[:, k], pte[..., k], yte.shape[-2:], cap, seed=seed))
            out.update({f"{name}_{m}": v for m, v in depth_metrics(preds[-1], yte, cap, crop).items()})
        _depth_picture(xte[:6], [yte[:6]] + [d[:6] for d in preds], ["truth", "lin. 1", "lin. 4"], cap, picture)
        return out
    if task == "action":
        train, test, names, pool = action_data(data_path, max_images)
        (ftr, ytr), (fte, yte) = ((clip_features(backbone, c, device, global_size), torch.tensor([y for _, y in c]))
                                  for c in (train, test))   # (N, T, 2D)
        joined = (lambda f: f.flatten(1)) if pool == "concat" else (lambda f: f.mean(1))
        predict, wd = fit_logistic(joined(ftr), ytr, len(names))
        logits, mid = predict(joined(fte)), ftr.shape[1] // 2
        single, _ = fit_logistic(ftr[:, mid], ytr, len(names))   # the control: one middle frame
        _confusion_picture(logits.argmax(1), yte, names, picture)
        top1, top5 = accuracy(logits, yte)
        return {"top1": top1, "top5": top5, "single_frame_top1": accuracy(single(fte[:, mid]), yte)[0],
                "frames": ftr.shape[1], "pooling": pool, "weight_decay": wd, "clips": len(yte)}
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def figure(rows, cols, cell):
    """A figure of rows x cols panels of cell = (width, height) inches, on the file-only Agg
    backend (eval.py's pictures use it too) -> (fig, axes (rows, cols))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)


def save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(ax, x, **imshow):
    """x on a panel without ticks: an image tensor (3, H, W), uint8 as it is, any other dtype
    rescaled to [0, 1]; or an array (H, W[, 3]) drawn with imshow's keywords."""
    if torch.is_tensor(x):
        if x.dtype != torch.uint8:
            x = (x.float() - x.min()) / (x.max() - x.min() + 1e-8)
        x = x.cpu().permute(1, 2, 0).numpy()
    ax.imshow(x, **imshow)
    ax.set_xticks([]), ax.set_yticks([])


def _label_grid(rows, titles, path, transpose=False):
    """Images, then label maps drawn over them (ten colours, background 0 and ignored -1 clear),
    one column per image (one row per image with transpose)."""
    n, k = len(rows[0]), len(rows)
    fig, axes = figure(n, k, (1.7, 1.7)) if transpose else figure(k, n, (1.7, 1.7))
    for r in range(k):
        for i in range(n):
            ax = axes[i, r] if transpose else axes[r, i]
            show(ax, rows[0][i])
            if r:
                labels = rows[r][i].numpy()
                ax.imshow(np.ma.masked_where(labels <= 0, (labels - 1) % 10), cmap="tab10", alpha=0.6,
                          vmin=0, vmax=9, interpolation="nearest")
            if i == 0:
                ax.set_title(titles[r], fontsize=8)
    save(fig, path)


def _ranking_picture(queries, database, sim, positives, path, top=5):
    """Each query, then its `top` nearest database images, framed green when a positive."""
    fig, axes = figure(len(queries), top + 1, (1.5, 1.5))
    for q in range(len(queries)):
        show(axes[q, 0], queries[q])
        axes[q, 0].set_ylabel("query", fontsize=8)
        for r, i in enumerate(sim[q].topk(min(top, sim.shape[1])).indices.tolist()):
            ax = axes[q, r + 1]
            show(ax, database[i])
            for side in ax.spines.values():
                side.set_edgecolor("limegreen" if i in positives[q] else "red"), side.set_linewidth(3)
    save(fig, path)


def _boxes_picture(images, truth, detections, path):
    """Ground-truth boxes (green) and discovered ones (red, dashed, with their score)."""
    from matplotlib.patches import Rectangle
    box = lambda b, **style: Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, **style)
    fig, axes = figure(1, len(images), (2, 2.2))
    for ax, x, gt, (boxes, scores) in zip(axes[0], images, truth, detections):
        show(ax, x)
        for b in gt.tolist():
            ax.add_patch(box(b, color="limegreen", lw=1.5))
        for b, s in zip(boxes.tolist(), scores.tolist()):
            ax.add_patch(box(b, color="red", lw=1.2, ls="--"))
            ax.text(b[0], b[1] - 1, f"{s:.2f}", color="red", fontsize=6)
    save(fig, path)


def _depth_picture(images, maps, titles, cap, path):
    """Each image, then its depth maps (true, predicted ...), 0 (dark) to cap metres (light)."""
    fig, axes = figure(len(maps) + 1, len(images), (1.8, 1.5 * images.shape[-2] / images.shape[-1] + 0.2))
    for i in range(len(images)):
        show(axes[0, i], images[i])
        for r, d in enumerate(maps):
            show(axes[r + 1, i], d[i].numpy(), cmap="magma", vmin=0, vmax=cap)
            axes[r + 1, 0].set_ylabel(titles[r], fontsize=8)
    save(fig, path)


def _confusion_picture(pred, labels, names, path):
    """The confusion matrix in % of each true class (rows), class names where they fit."""
    k = len(names)
    cm = torch.bincount(labels * k + pred, minlength=k * k).view(k, k).float()
    fig, axes = figure(1, 1, (min(12, 2 + 0.45 * k),) * 2)
    ax = axes[0, 0]
    ax.imshow(100 * cm / cm.sum(1, keepdim=True).clamp(min=1), cmap="Blues", vmin=0, vmax=100)
    ticks = range(k) if k <= 30 else []
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    save(fig, path)
