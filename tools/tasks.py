"""The papers' other evaluations of frozen features, run by eval.py:

    python eval.py seg|video|retrieval|copydetection|discover --checkpoint runs/dino/checkpoint.pth

Without --data_path each task draws its own offline data from data.py's shapes: 64 px scenes of
three shapes of different classes with per-pixel masks and boxes (seg, discover), 16-frame clips of
them moving (video), strongly augmented instance copies of the training images (retrieval, copy
detection). With --data_path each reads the real dataset's layout (below) and reports the paper's
metric. Features are the backbone's last layer (after its norm): patch tokens for the dense tasks,
the CLS token (and GeM-pooled patches for copy detection) for retrieval.

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

TASKS = ("seg", "video", "retrieval", "copydetection", "discover")


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


def global_features(backbone, images, device, size, gem=False):
    """uint8 images, resized to size x size -> CLS tokens (N, D); with gem also the patch tokens
    GeM-pooled with p = 4 after clamping at 1e-6 (N, 2D), as the official copy detection."""
    def cls_and_gem(x):
        f = backbone.forward_features(x)
        g = f["x_norm_patchtokens"].clamp(min=1e-6).pow(4).mean(1).pow(0.25)
        return torch.cat([f["x_norm_clstoken"], g], -1) if gem else f["x_norm_clstoken"]
    return _per_batch(cls_and_gem, images, device, size, batch_size=256)


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


def linear_segmentation(ftr, ytr, fte, num_classes, steps=500, batch_size=16, lr=1e-3, seed=0):
    """A linear head on frozen patch features ftr (N, h, w, D), standardised per channel with their
    statistics (the frozen BatchNorm of DINOv2's linear head), its logits upsampled bilinearly to
    the pixel labels ytr (N, S, S); returns the predicted labels of fte (M, S, S)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = ftr.mean((0, 1, 2)), ftr.std((0, 1, 2)) + 1e-6
    head = torch.nn.Linear(ftr.shape[-1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    logits = lambda f: F.interpolate(head((f - mean) / std).permute(0, 3, 1, 2), size=ytr.shape[-2:],
                                     mode="bilinear", align_corners=False)
    for _ in range(steps):
        i = torch.randint(len(ftr), (min(batch_size, len(ftr)),), generator=g)
        loss = F.cross_entropy(logits(ftr[i]), ytr[i], ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return torch.cat([logits(f).argmax(1) for f in fte.split(64)])


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
        raw = [_read(f) for f in files]
        H, W = raw[0].shape[-2:]
        step = 64 if 64 % patch_size == 0 else patch_size
        th, tw = (size, int(size * W / H) // step * step) if W > H else (int(size * H / W) // step * step, size)
        labels = [os.path.join(root, "Annotations", "480p", name, os.path.basename(f)[:-4] + ".png") for f in files]
        labels = torch.stack([_read_index_png(p) if os.path.isfile(p) else torch.full((H, W), -1) for p in labels])
        clips.append((name, torch.stack([_resize(x, (th, tw)) for x in raw]), labels, (H, W)))
    return clips


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
        fd, fq, fw = (global_features(backbone, x, device, global_size, gem=True) for x in (database, queries, whitening))
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
