"""Evaluation of a pretrained backbone: ours or an official DINO / DINOv2 / SimDINO one
(docs/EVALUATION.md: each protocol, the checkpoints it reads, the numbers measured).

    python eval.py knn --checkpoint runs/dino/checkpoint.pth [--baselines]
    python eval.py linear --checkpoint runs/dino/checkpoint.pth [--fast | --epochs 100]
    python eval.py attention --checkpoint runs/dino/checkpoint.pth   # also: pca
    python eval.py curves --logs runs/dino runs/simdino
    python eval.py knn --checkpoint dinov2_vits14_reg4_pretrain.pth --data imagefolder --data_path DIR
    python eval.py seg|video|retrieval|copydetection|discover|depth|action --checkpoint runs/dino/checkpoint.pth [--data_path DIR]

knn: DINO's weighted k-NN (§4.1, the official eval_knn.py) on the teacher's CLS features, sharded
under torchrun; `--baselines` also on raw pixels and on a randomly initialised ViT of the same
architecture, what self-supervised learning has to beat. linear: DINO's linear probe
(eval_linear.py); `--fast` a logistic regression on precomputed features. attention, pca, curves:
pictures. seg ... action: the papers' other evaluations (tools/tasks.py, below; `--baselines`
runs each on a random ViT too).
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile

import torch
import torch.nn.functional as F

import data as data_lib
from tools import tasks
from tools.tasks import accuracy as _accuracy, logistic_regression
from kernels import distributed as dist
from vit import ARCHS, build_vit


@torch.no_grad()
def extract_features(fn, dataset, size, device, batch_size=256, num_workers=0, gather=True):
    """fn(images (B, 3, size, size)) -> (B, D) on a dataset, one process's batches dealt to the ranks
    in contiguous runs (some may get none); returns (features (N, D) float32 on device, labels (N,))
    in the dataset's order, gathered, or with gather=False this rank's shard of them."""
    n, steps = len(dataset), math.ceil(len(dataset) / batch_size)
    lo, hi = (min(n, batch_size * (steps * r // dist.world_size())) for r in (dist.rank(), dist.rank() + 1))
    shard = data_lib.subset(dataset, range(lo, hi) if hi > lo else range(1))  # none: one image, for D
    loader = data_lib.Loader(shard, batch_size, num_workers=num_workers, shuffle=False, drop_last=False)
    feats, labels = zip(*[(fn(data_lib.eval_view(x.to(device), size)).float(), y.to(device))
                          for x, y in loader.epoch(0)])
    feats, labels = torch.cat(feats)[:hi - lo], torch.cat(labels)[:hi - lo]
    return (dist.all_gather_cat(feats), dist.all_gather_cat(labels)) if gather else (feats, labels)


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, num_classes, k=20, T=0.07,
                 chunk=1024):
    """Weighted k-NN of the official eval_knn.py, the bank sharded over ranks (train_*: this rank's shard, test_*:
    every query): each rank's k nearest, gathered and merged (ties: lower rank first); L2-normalised; (top-1, top-5) %."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    top1 = top5 = 0
    for i in range(0, len(test_features), chunk):
        q, y = test_features[i:i + chunk], test_labels[i:i + chunk]
        sim, idx = (q @ train_features.T).topk(min(k, len(train_features)), dim=1)   # (b, k) of this shard
        sim, order = dist.all_gather_cat(sim, dim=1).sort(dim=1, descending=True, stable=True)  # (b, ranks·k)
        labels = dist.all_gather_cat(train_labels[idx], dim=1).gather(1, order)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, labels[:, :k], (sim[:, :k] / T).exp())  # Σ exp(s/T) per class, k nearest
        pred = votes.topk(min(5, num_classes), dim=1).indices          # (b, 5)
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(1).sum().item()
    return 100.0 * top1 / len(test_features), 100.0 * top5 / len(test_features)


@torch.no_grad()
def feature_stats(features):
    """Collapse signs of features (N, D): `feat_std`, SimSiam's per-dimension std of the L2-normalised
    features times √D (about 1 spread over the sphere, 0 all on one point); `feat_rank`, the
    effective rank of the centred features (Roy & Vetterli 2007), from 1 (one direction) to D."""
    z = F.normalize(features.double(), dim=1)
    std = z.std(dim=0).mean().item() * z.shape[1] ** 0.5
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()
    return {"feat_std": std, "feat_rank": rank}


def collapse_check(backbone, dataset, size, device, n=1024):
    """feature_stats of a backbone's CLS on the first n images of a dataset (train mode kept)."""
    was_training = backbone.training
    subset = data_lib.subset(dataset, range(min(n, len(dataset))))
    feats, _ = extract_features(backbone.eval(), subset, size, device)
    backbone.train(was_training)
    return feature_stats(feats)


def _labelled(ds):
    """The labelled part of a dataset (STL-10's unlabelled images carry label -1)."""
    if isinstance(ds, data_lib.TensorImages) and (ds.labels < 0).any():
        keep = ds.labels >= 0
        return data_lib.TensorImages(ds.images[keep], ds.labels[keep], ds.classes)
    return ds


def split_features(fn, train_set, eval_set, size, device, batch_size=256, num_workers=0):
    """extract_features on the labelled images of both splits -> (ftr, ytr, fte, yte)."""
    return (*extract_features(fn, _labelled(train_set), size, device, batch_size, num_workers),
            *extract_features(fn, _labelled(eval_set), size, device, batch_size, num_workers))


def knn_eval(backbone, train_set, eval_set, size, device, k=20, T=0.07, batch_size=256, num_workers=0,
             precision=contextlib.nullcontext):
    """k-NN top-1 / top-5 of a backbone's CLS features (train split as memory bank, kept sharded).
    `precision()`: the context of the backbone's forward (a run's autocast); features and similarities fp32."""
    was_training = backbone.training
    backbone.eval()

    def fn(x):
        with precision():
            return backbone(x)
    bank = extract_features(fn, _labelled(train_set), size, device, batch_size, num_workers, False)
    queries = extract_features(fn, _labelled(eval_set), size, device, batch_size, num_workers)
    backbone.train(was_training)
    return knn_classify(*bank, *queries, train_set.classes, k, T)


def baselines(arch, patch_size, train_set, eval_set, size, device, seed=0, **kw):
    """k-NN on raw normalised pixels and on a randomly initialised ViT: {name: (top-1, top-5)}."""
    out = {"raw_pixels": knn_eval(torch.nn.Flatten(), train_set, eval_set, size, device)}
    torch.manual_seed(seed)
    random_vit = build_vit(arch, patch_size, img_size=size).to(device)
    out["random_vit"] = knn_eval(random_vit, train_set, eval_set, size, device, **kw)
    return out


# ----------------------------------------------------------------------------------------------
# Linear probe (DINO §4.1, the official eval_linear.py) and its fast logistic-regression mode.

def probe_features(backbone, images, n_last_blocks, avgpool):
    """The official eval_linear features: the CLS tokens of the last n blocks (each through the
    final norm), concatenated; with avgpool also the mean of the last block's patch tokens
    (registers left out). The official code interleaves CLS and mean; a linear layer does not care."""
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    out = torch.cat([t[:, 0] for t in layers], dim=-1)
    if avgpool:
        out = torch.cat([out, layers[-1][:, 1 + backbone.num_register_tokens:].mean(1)], dim=-1)
    return out


def probe_recipe(backbone):
    """(n_last_blocks, avgpool) of the official recipe: ViT-S and smaller the last 4 CLS tokens;
    ViT-B and larger the last CLS with the average patch token."""
    return (1, True) if backbone.embed_dim >= 768 else (4, False)


def linear_probe(backbone, train_set, eval_set, size, device, n_last_blocks, avgpool, epochs=100,
                 batch_size=128, lr=0.001, seed=0, num_workers=0):
    """A linear classifier on the frozen backbone, trained as eval_linear.py (lr = lr·B/256, B the
    global batch); evaluated once, after the last epoch (the official script prints the best one's)."""
    train_set, eval_set = _labelled(train_set), _labelled(eval_set)
    backbone.eval()
    feats = lambda x: probe_features(backbone, x, n_last_blocks, avgpool)
    torch.manual_seed(seed)
    clf = torch.nn.Linear(backbone.embed_dim * (n_last_blocks + avgpool), train_set.classes).to(device)
    torch.nn.init.normal_(clf.weight, std=0.01)
    torch.nn.init.zeros_(clf.bias)
    model = dist.wrap_ddp(clf, device)
    opt = torch.optim.SGD(model.parameters(), lr=lr * batch_size * dist.world_size() / 256, momentum=0.9,
                          weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    loader = data_lib.Loader(train_set, batch_size, seed, dist.rank(), dist.world_size(), num_workers)
    folder = isinstance(train_set, data_lib.FolderImages)
    if folder:  # workers crop the full-resolution images, as torchvision's pipeline
        train_set.crops = [(size, (0.08, 1.0), 1)]
    g, t0 = torch.Generator().manual_seed(seed * 1009 + dist.rank()), time.time()
    for epoch in range(epochs):
        total = torch.zeros((), device=device)
        for images, y in loader.epoch(epoch):
            if folder:
                x = images[0].to(device).float() / 255
            else:
                boxes = data_lib.random_resized_crop_boxes(len(images), *images.shape[-2:], (0.08, 1.0), g)
                flips = torch.rand(len(images), generator=g) < 0.5
                x = data_lib.resized_crops(images.to(device).float() / 255, boxes, flips, size)
            with torch.no_grad():
                f = feats(data_lib.normalize(x))
            loss = F.cross_entropy(model(f), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        sched.step()
        if epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 10) == 0:
            dist.print0(f"linear epoch {epoch + 1}/{epochs} loss {total.item() / len(loader):.4f} "
                        f"({time.time() - t0:.0f} s)")
    if folder:
        train_set.crops = None
    fte, yte = extract_features(feats, eval_set, size, device)
    return _accuracy(clf(fte), yte)


# Each task's default resolution, (real data, synthetic data); --image_size overrides. Real: the
# official one, but depth's short side 224 (the official runs NYU and KITTI at full resolution, 480 and
# 352: here every image's tokens are held in memory). Synthetic: 64 px for dense tasks and action (its
# clips need room to move; video 128: at 64 px the shapes are 2 x 2 patches of 8), whole-image
# features (None) at the training resolution.
TASK_SIZES = {"seg": (512, 64), "video": (480, 128), "discover": (480, 64), "retrieval": (224, None),
              "copydetection": (320, None), "depth": (224, 64), "action": (224, 64)}


def run_task(args, backbone, arch, trained, size, device):
    """seg / video / retrieval / copydetection / discover / depth / action (tasks.py) on the backbone and, with
    --baselines, on a randomly initialised ViT of its architecture (seed 0)."""
    path = args.data_path or ""
    if path and not os.path.isdir(path):
        raise ValueError(f"--data_path {path} is not a directory")
    os.makedirs(args.output_dir, exist_ok=True)
    models = {"": backbone}
    if args.baselines:
        torch.manual_seed(0)
        models["random_vit_"] = build_vit(arch, backbone.patch_size, img_size=trained).to(device).eval()
    result = {"task": args.command, "image_size": size, "data": path or "synthetic"}
    for prefix, model in models.items():
        t0 = time.time()
        picture = os.path.join(args.output_dir, f"{args.command}{'_' + prefix[:-1] if prefix else ''}.png")
        out = tasks.run(args.command, model, device, path, size, size, picture, args.max_images)
        out.update(picture=picture, seconds=round(time.time() - t0, 1))
        result.update({prefix + k: v for k, v in out.items()})
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints: ours and the official ones, read safely, mapped key for key onto vit.py.

def read_checkpoint(path):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts, and the
    argparse.Namespace that official DINO / SimDINO checkpoints carry as `args` (an attribute bag:
    rebuilding it calls no code of the file). A pickle asking for any other global is refused.
    Zip files (torch.save's format since PyTorch 1.6) are memory-mapped, not copied whole into each rank."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):
            raise ValueError(f"cannot read checkpoint {path} (not a PyTorch checkpoint: {str(e)[:100]})") from None
        raise ValueError(f"{path} holds pickled objects other than tensors, numbers, strings, lists and "
                         f"dicts; refused, since loading it could run code") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {first})") from None


def backbone_state(ckpt, key="teacher"):
    """The backbone weights in a checkpoint, with vit.py's keys (which are the official ones):
    - ours and official DINO / SimDINO `checkpoint.pth`: ckpt[key] with `backbone.` / `head.` keys
      (`module.` too under DDP); DINOv2 / SimDINOv2 `teacher_checkpoint.pth`: ckpt["teacher"];
    - DINOv2 / SimDINOv2 training checkpoints: ckpt["model"] with `teacher.backbone.` keys;
    - released backbones (dino_vits16, dinov2_vits14[_reg], ...): the plain state dict.
    Heads are dropped and DINOv2's chunked blocks (`blocks.<chunk>.<i>.`) unchunked."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a state dict")
    if isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if isinstance(ckpt.get(key), dict):
        state = ckpt[key]
    elif any(k.startswith(key + ".") for k in ckpt):
        state = {k[len(key) + 1:]: v for k, v in ckpt.items() if k.startswith(key + ".")}
    else:
        state = ckpt
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"holds no ViT backbone under {key!r} (no cls_token / patch_embed.proj.weight; "
                         f"keys: {list(state)[:4]})")
    return state


def infer_vit(state):
    """build_vit's arguments for an official backbone state dict: width and depth give the arch,
    the patch embedding the patch size, the position embedding the training resolution; registers,
    LayerScale, SwiGLU and the mask token where their weights are. Registers imply the DINOv2 hub
    `_reg` models' position interpolation (no offset, antialiased), else DINO's (offset 0.1)."""
    width = state["cls_token"].shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    arch = next((a for a, (d, n, _) in ARCHS.items() if (d, n) == (width, depth)), None)
    if arch is None:
        raise ValueError(f"a ViT of width {width} and depth {depth} is none of {', '.join(ARCHS)}")
    patch = state["patch_embed.proj.weight"].shape[-1]
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return dict(arch=arch, patch_size=patch, img_size=math.isqrt(state["pos_embed"].shape[1] - 1) * patch,
                num_register_tokens=registers, layerscale=1.0 if "blocks.0.ls1.gamma" in state else None,
                ffn_layer="swiglufused" if "blocks.0.mlp.w12.weight" in state else "mlp",
                use_mask_token="mask_token" in state,
                interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=bool(registers))


def load_backbone(path, device, key="teacher", arch=None, patch_size=None):
    """(backbone in eval mode, our training config or None) from a checkpoint of ours or of the
    official code. Every key must match, one for one; `arch` / `patch_size`, when given, must be
    what the file holds."""
    ckpt = read_checkpoint(path)
    try:
        state = backbone_state(ckpt, key)
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
        if cfg is not None:  # ours: the config names the model
            kw = dict(arch=cfg["arch"], patch_size=cfg["patch_size"], img_size=cfg["global_crops_size"],
                      num_register_tokens=cfg.get("num_register_tokens", 0), use_mask_token="mask_token" in state,
                      layerscale=cfg.get("layerscale") or None, ffn_layer=cfg.get("ffn_layer", "mlp"),
                      interpolate_offset=cfg.get("interpolate_offset", 0.1),
                      interpolate_antialias=cfg.get("interpolate_antialias", False))
        else:
            kw = infer_vit(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    name = f"{kw['arch']}/{kw['patch_size']}"
    if (arch and arch != kw["arch"]) or (patch_size and patch_size != kw["patch_size"]):
        raise ValueError(f"{path} holds a {name}, not the requested {arch or kw['arch']}/{patch_size or kw['patch_size']}")
    model = build_vit(**kw)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit (another patch size, width, ...)
        detail = [l.strip() for l in str(e).splitlines() if "size mismatch" in l][:1]
        raise ValueError(f"{path}: the weights do not fit a {name} ({detail[0] if detail else 'size mismatch'})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: the backbone's keys do not match a {name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------
# Pictures: attention maps, PCA of patch features, training curves (PNG files).

def _first_images(dataset, n, size, device):
    subset = data_lib.subset(dataset, range(min(n, len(dataset))))
    images, _ = next(data_lib.Loader(subset, len(subset), shuffle=False, drop_last=False).epoch(0))
    return data_lib.eval_view(images.to(device), size)   # normalised (n, 3, size, size)


def keep_mass(a, fraction=0.6):
    """DINO's thresholded attention (visualize_attention.py): per map (..., N), the smallest set of
    patches holding `fraction` of the attention mass. -> bool (..., N)."""
    values, order = a.sort(dim=-1, descending=True)
    cum = values.cumsum(-1) / values.sum(-1, keepdim=True)
    keep_sorted = cum <= fraction
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@torch.no_grad()
def attention_picture(backbone, images, path):
    """The last block's CLS attention over the patches, per head and averaged, for each image
    (registers left out), outlined where DINO's 60 % mass threshold keeps it."""
    n, (_, _, H, W), p = len(images), images.shape, backbone.patch_size
    attn = backbone.get_last_selfattention(images)[:, :, 0, 1 + backbone.num_register_tokens:]  # (n, heads, N)
    attn = torch.cat([attn, attn.mean(1, keepdim=True)], 1).reshape(n, -1, H // p, W // p).float().cpu()
    masks = keep_mass(attn.flatten(2)).reshape(attn.shape)
    centres = lambda k: (torch.arange(k) + 0.5).numpy() * p
    fig, axes = tasks.figure(n, attn.shape[1] + 1, (1.6, 1.6))
    for i in range(n):
        tasks.show(axes[i, 0], images[i])
        for h in range(attn.shape[1]):
            ax = axes[i, h + 1]
            tasks.show(ax, attn[i, h].numpy(), cmap="inferno", extent=(0, W, H, 0))
            if 0 < masks[i, h].sum() < masks[i, h].numel():
                ax.contour(centres(W // p), centres(H // p), masks[i, h].float().numpy(), levels=[0.5],
                           colors="cyan", linewidths=0.8)
            if i == 0:
                ax.set_title("mean" if h == attn.shape[1] - 1 else f"head {h}", fontsize=8)
    tasks.save(fig, path)


@torch.no_grad()
def pca_picture(backbone, images, path):
    """DINOv2's picture: PCA of the patch features of all images; the first component,
    thresholded at 0 (sign chosen so fewer patches are foreground), separates the foreground;
    a second PCA on the foreground patches gives three components shown as RGB."""
    n, (_, _, H, W), p = len(images), images.shape, backbone.patch_size
    f = backbone.forward_features(images)["x_norm_patchtokens"].float().flatten(0, 1).cpu()   # (n·N, D)
    pc1 = (f - f.mean(0)) @ torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]
    fg = pc1 > 0
    if fg.float().mean() > 0.5:
        fg = ~fg
    rgb = torch.zeros(len(f), 3)
    if fg.sum() >= 3:
        g = f[fg] - f[fg].mean(0)
        comps = g @ torch.linalg.svd(g, full_matrices=False).Vh[:3].T
        lo, hi = comps.min(0).values, comps.max(0).values
        rgb[fg] = (comps - lo) / (hi - lo + 1e-8)
    rgb = rgb.reshape(n, H // p, W // p, 3)
    fig, axes = tasks.figure(2, n, (1.6, 1.65))
    for i in range(n):
        tasks.show(axes[0, i], images[i])
        tasks.show(axes[1, i], rgb[i].numpy(), extent=(0, W, H, 0))
    tasks.save(fig, path)


# The panels of the curves: log.jsonl key, marker, y label, title.
CURVES = [("train_loss", None, "train loss", "loss"), ("knn_top1", "o", "k-NN top-1 (%)", "k-NN"),
          ("feat_std", ".", "feature std", "teacher CLS spread (near 0: collapse)")]


def curves_picture(log_paths, path):
    """Training loss, k-NN top-1 and the teacher's feature spread (std over the held-out images,
    train.py's collapse watch) against epoch, one line per run (log.jsonl files or run dirs)."""
    fig, axes = tasks.figure(1, len(CURVES), (5, 3.8))
    for p in log_paths:
        p = os.path.join(p, "log.jsonl") if os.path.isdir(p) else p
        try:
            records = [json.loads(line) for line in open(p) if line.strip()]
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {p}: {e}") from None
        label = os.path.basename(os.path.dirname(os.path.abspath(p)))
        for ax, (key, marker, _, _) in zip(axes[0], CURVES):
            points = [(r["epoch"] + 1, r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker=marker, label=label)
    for ax, (_, _, ylabel, title) in zip(axes[0], CURVES):
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        if ax.lines:  # a run without k-NN or feature-spread records leaves its panel empty
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    tasks.save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=tasks.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["knn", "linear", "attention", "pca", "curves", *tasks.TASKS])
    p.add_argument("--checkpoint", default="", help="ours (checkpoint.pth) or an official DINO / DINOv2 / "
                                                    "SimDINO checkpoint or backbone")
    p.add_argument("--checkpoint_key", default="teacher", help="teacher or student, where a file holds both")
    p.add_argument("--arch", default=None, help="check that the checkpoint holds this arch")
    p.add_argument("--patch_size", type=int, default=None, help="check that the checkpoint has this patch size")
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--data_path", default=None)
    p.add_argument("--image_size", type=int, default=None,
                   help="evaluation resolution (default: ours the global crop size, official the training one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output_dir", default=".", help="where the pictures go (attention.png, seg.png, ...)")
    p.add_argument("--max_images", type=int, default=0, help="seg / discover / depth / action on real data: at "
                                                             "most this many images (clips) per split (0: all)")
    p.add_argument("--nb_knn", type=int, default=20, help="k (official default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of exp(s/T) (official 0.07)")
    p.add_argument("--batch_size", type=int, default=256, help="feature extraction batch")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--baselines", action="store_true", help="also k-NN on raw pixels and a random ViT")
    p.add_argument("--fast", action="store_true", help="linear: logistic regression on precomputed features "
                                                       "instead of the SGD protocol")
    p.add_argument("--epochs", type=int, default=100, help="linear: epochs (official 100)")
    p.add_argument("--lr", type=float, default=0.001, help="linear: base lr, scaled by batch/256 (official 0.001)")
    p.add_argument("--batch_size_per_gpu", type=int, default=128, help="linear: batch per process (official 128)")
    p.add_argument("--n_last_blocks", type=int, default=None, help="linear: CLS of the last n blocks "
                                                                   "(default: 4 below ViT-B, else 1)")
    p.add_argument("--avgpool_patchtokens", type=int, choices=[0, 1], default=None,
                   help="linear: add the mean patch token (default: from ViT-B on)")
    p.add_argument("--num_images", type=int, default=6, help="images in the attention / PCA pictures")
    p.add_argument("--logs", nargs="+", default=[], help="curves: log.jsonl files or run directories")
    args = p.parse_args(argv)
    device = dist.setup(args.device)
    try:
        for name in ("batch_size", "batch_size_per_gpu", "epochs", "nb_knn", "num_images"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
        result = evaluate(args, device)
    except (ValueError, data_lib.DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if dist.is_main():
        print(json.dumps(result))
    dist.cleanup()


def evaluate(args, device):
    """The subcommand's result (a dict)."""
    if args.command == "curves":
        if not args.logs:
            raise ValueError("curves needs --logs RUN_DIR_OR_LOG [...]")
        os.makedirs(args.output_dir, exist_ok=True)
        picture = os.path.join(args.output_dir, "curves.png")
        curves_picture(args.logs, picture)
        return {"picture": picture}
    if not args.checkpoint:
        raise ValueError("--checkpoint is required")
    backbone, cfg = load_backbone(args.checkpoint, device, args.checkpoint_key, args.arch, args.patch_size)
    cfg, p = cfg or {}, backbone.patch_size
    arch = cfg.get("arch") or infer_vit(backbone.state_dict())["arch"]
    trained = cfg.get("global_crops_size") or p * math.isqrt(backbone.pos_embed.shape[1] - 1)
    real, synthetic = TASK_SIZES.get(args.command, (trained, trained))   # knn, linear, pictures: as trained
    size = args.image_size or max(p, (real if args.data_path else synthetic or trained) // p * p)
    if size % p:
        raise ValueError(f"--image_size {size} is not divisible by the patch size {p}")
    if args.command in tasks.TASKS:
        return run_task(args, backbone, arch, trained, size, device)
    name = args.data or cfg.get("data")
    if not name:
        raise ValueError(f"{args.checkpoint} is not a nanodino checkpoint: give --data (and --data_path)")
    path = args.data_path if args.data_path is not None else cfg.get("data_path", "")
    train_set, eval_set = data_lib.load_dataset(name, path, eval_size=size)
    if args.command == "knn":
        top1, top5 = knn_eval(backbone, train_set, eval_set, size, device, args.nb_knn, args.temperature,
                              args.batch_size, args.num_workers)
        result = {"top1": top1, "top5": top5, "k": args.nb_knn, "data": name}
        if args.baselines:
            for key, (b1, b5) in baselines(arch, p, train_set, eval_set, size, device, k=args.nb_knn,
                                           T=args.temperature).items():
                result[f"{key}_top1"], result[f"{key}_top5"] = b1, b5
        return result
    if args.command == "linear":
        n_last, avgpool = probe_recipe(backbone)
        n_last = args.n_last_blocks or n_last
        avgpool = bool(avgpool if args.avgpool_patchtokens is None else args.avgpool_patchtokens)
        if not 1 <= n_last <= len(backbone.blocks):
            raise ValueError(f"--n_last_blocks must be in 1..{len(backbone.blocks)}, got {n_last}")
        result = {"data": name, "n_last_blocks": n_last, "avgpool_patchtokens": avgpool}
        if args.fast:
            features = split_features(lambda x: probe_features(backbone, x, n_last, avgpool), train_set, eval_set,
                                      size, device, args.batch_size, args.num_workers)
            (top1, top5), wd = logistic_regression(*features, train_set.classes)
            result.update(mode="logistic regression", weight_decay=wd)
        else:
            top1, top5 = linear_probe(backbone, train_set, eval_set, size, device, n_last, avgpool,
                                      args.epochs, args.batch_size_per_gpu, args.lr, num_workers=args.num_workers)
            result.update(mode="sgd", epochs=args.epochs)
        return {**result, "top1": top1, "top5": top5}
    os.makedirs(args.output_dir, exist_ok=True)   # attention, pca
    picture = os.path.join(args.output_dir, f"{args.command}.png")
    draw = attention_picture if args.command == "attention" else pca_picture
    draw(backbone, _first_images(eval_set, args.num_images, size, device), picture)
    return {"picture": picture}


if __name__ == "__main__":
    main()
