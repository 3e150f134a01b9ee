"""Evaluation of a pretrained backbone.

    python eval.py knn --checkpoint runs/dino/checkpoint.pth [--baselines]

k-NN (DINO, Caron et al. 2021, §4.1 and the official `eval_knn.py`): the teacher backbone's CLS
features of the train split (the memory bank) and of the held-out split, L2-normalised; each
held-out image votes over its k = 20 nearest train images (cosine similarity s), each vote
weighted by exp(s / T) with T = 0.07; top-1 and top-5 accuracy. Features are extracted in shards
under torchrun and gathered. `--baselines` also runs the same k-NN on raw pixels and on a randomly
initialised ViT of the same architecture: what self-supervised learning has to beat.
"""
import argparse
import json
import os
import pickle
import sys

import torch
import torch.nn.functional as F

import data as data_lib
from kernels import distributed as dist
from vit import build_vit


@torch.no_grad()
def extract_features(fn, dataset, size, device, batch_size=256, num_workers=0):
    """fn(images (B, 3, size, size)) -> (B, D) on every image of a dataset, sharded over ranks
    and gathered; returns (features (N, D) float32 on device, labels (N,))."""
    loader = data_lib.Loader(dataset, batch_size, rank=dist.rank(), world_size=dist.world_size(),
                             num_workers=num_workers, shuffle=False, drop_last=False)
    crops, feats, labels = getattr(dataset, "crops", None), [], []
    if crops is not None:  # an image folder set up for training: ask for evaluation views
        dataset.crops = None
    for images, y in loader.epoch(0):
        feats.append(fn(data_lib.eval_view(images.to(device), size)).float())
        labels.append(y.to(device))
    if crops is not None:
        dataset.crops = crops
    feats = dist.all_gather_cat(torch.cat(feats))
    labels = dist.all_gather_cat(torch.cat(labels))
    return feats, labels


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, k=20, T=0.07,
                 num_classes=None, chunk=1024):
    """Weighted k-NN of the official eval_knn.py: features L2-normalised here; returns (top-1, top-5) in %."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    k = min(k, len(train_features))
    top1 = top5 = 0
    for i in range(0, len(test_features), chunk):
        q, y = test_features[i:i + chunk], test_labels[i:i + chunk]
        sim, idx = (q @ train_features.T).topk(k, dim=1)           # (b, k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / T).exp())  # Σ exp(s/T) per class
        pred = votes.topk(min(5, num_classes), dim=1).indices       # (b, 5)
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(1).sum().item()
    return 100.0 * top1 / len(test_features), 100.0 * top5 / len(test_features)


@torch.no_grad()
def feature_stats(features):
    """Collapse signs of features (N, D): `feat_std`, the per-dimension std of the L2-normalised
    features averaged over dimensions and times √D (SimSiam's measure, scaled: about 1 when the
    features spread over the sphere, 0 when every image maps to one point); `feat_rank`, the
    effective rank exp(entropy of the normalised singular values) of the centred features
    (Roy & Vetterli 2007): from 1 (one direction) to D."""
    z = F.normalize(features.double(), dim=1)
    std = z.std(dim=0).mean().item() * z.shape[1] ** 0.5
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()
    return {"feat_std": std, "feat_rank": rank}


def collapse_check(backbone, dataset, size, device, n=1024):
    """feature_stats of a backbone's CLS on the first n images of a dataset (train mode kept)."""
    was_training = backbone.training
    backbone.eval()
    subset = data_lib.subset(dataset, range(min(n, len(dataset))))
    feats, _ = extract_features(backbone, subset, size, device)
    backbone.train(was_training)
    return feature_stats(feats)


def _labelled(ds):
    """The labelled part of a dataset (STL-10's unlabelled images carry label -1)."""
    if isinstance(ds, data_lib.TensorImages) and (ds.labels < 0).any():
        keep = ds.labels >= 0
        return data_lib.TensorImages(ds.images[keep], ds.labels[keep], ds.classes)
    return ds


def knn_eval(backbone, train_set, eval_set, size, device, k=20, T=0.07, batch_size=256, num_workers=0):
    """k-NN top-1 / top-5 of a backbone's CLS features (train split as memory bank)."""
    was_training = backbone.training
    backbone.eval()
    train_set, eval_set = _labelled(train_set), _labelled(eval_set)
    ftr, ytr = extract_features(backbone, train_set, size, device, batch_size, num_workers)
    fte, yte = extract_features(backbone, eval_set, size, device, batch_size, num_workers)
    backbone.train(was_training)
    return knn_classify(ftr, ytr, fte, yte, k, T, num_classes=train_set.classes)


def baselines(arch, patch_size, train_set, eval_set, size, device, seed=0, **kw):
    """k-NN on raw normalised pixels and on a randomly initialised ViT: {name: (top-1, top-5)}."""
    train_set, eval_set = _labelled(train_set), _labelled(eval_set)
    flat = lambda x: x.flatten(1)
    ftr, ytr = extract_features(flat, train_set, size, device)
    fte, yte = extract_features(flat, eval_set, size, device)
    out = {"raw_pixels": knn_classify(ftr, ytr, fte, yte, num_classes=train_set.classes)}
    torch.manual_seed(seed)
    random_vit = build_vit(arch, patch_size, img_size=size).to(device)
    out["random_vit"] = knn_eval(random_vit, train_set, eval_set, size, device, **kw)
    return out


def load_backbone(path, device):
    """The teacher backbone of a nanodino checkpoint and its config. Read with weights_only=True
    (loading never runs code from the file); every key must match the model, one for one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # a pickle asking for a global (a class or function): refused
            raise ValueError(f"cannot read checkpoint {path} (not a PyTorch checkpoint: {str(e)[:100]})") from None
        raise ValueError(f"{path} holds pickled objects other than tensors, numbers, strings, lists and "
                         f"dicts; refused, since loading it could run code") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "method" not in ckpt:
        raise ValueError(f"{path} is not a nanodino checkpoint (no 'config' / 'method' keys)")
    cfg = ckpt["config"]
    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["method"].items() if k.startswith(prefix)}
    model = build_vit(cfg["arch"], cfg["patch_size"], img_size=cfg["global_crops_size"],
                      num_register_tokens=cfg.get("num_register_tokens", 0),
                      layerscale=cfg.get("layerscale") or None, ffn_layer=cfg.get("ffn_layer", "mlp"),
                      use_mask_token="mask_token" in state,
                      interpolate_offset=cfg.get("interpolate_offset", 0.1),
                      interpolate_antialias=cfg.get("interpolate_antialias", False))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match the config (another patch size, width, ...)
        detail = [l.strip() for l in str(e).splitlines() if "size mismatch" in l][:1]
        raise ValueError(f"{path}: the weights do not fit a {cfg['arch']}/{cfg['patch_size']} "
                         f"({detail[0] if detail else 'size mismatch'})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: the backbone's keys do not match a {cfg['arch']}/{cfg['patch_size']} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------
# Pictures: attention maps, PCA of patch features, training curves (PNG files).

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _first_images(dataset, n, size, device):
    subset = data_lib.subset(dataset, range(min(n, len(dataset))))
    images, _ = next(data_lib.Loader(subset, len(subset), shuffle=False, drop_last=False).epoch(0))
    return data_lib.eval_view(images.to(device), size)   # normalised (n, 3, size, size)


def _show(ax, image):
    x = image.float().cpu()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    ax.imshow(x.permute(1, 2, 0).numpy())
    ax.set_xticks([]), ax.set_yticks([])


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
    plt = _pyplot()
    n, (_, _, H, W) = len(images), images.shape
    gh, gw = H // backbone.patch_size, W // backbone.patch_size
    attn = backbone.get_last_selfattention(images)[:, :, 0, 1 + backbone.num_register_tokens:]  # (n, heads, N)
    attn = torch.cat([attn, attn.mean(1, keepdim=True)], 1).reshape(n, -1, gh, gw).float().cpu()
    masks = keep_mass(attn.flatten(2)).reshape(attn.shape)
    cols = attn.shape[1] + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        for h in range(attn.shape[1]):
            ax = axes[i, h + 1]
            ax.imshow(attn[i, h].numpy(), cmap="inferno", extent=(0, W, H, 0))
            centres = lambda k: (torch.arange(k) + 0.5).numpy() * backbone.patch_size
            if 0 < masks[i, h].sum() < gh * gw:
                ax.contour(centres(gw), centres(gh), masks[i, h].float().numpy(), levels=[0.5],
                           colors="cyan", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title("mean" if h == attn.shape[1] - 1 else f"head {h}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def pca_picture(backbone, images, path):
    """DINOv2's picture: PCA of the patch features of all images; the first component,
    thresholded at 0 (sign chosen so fewer patches are foreground), separates the foreground;
    a second PCA on the foreground patches gives three components shown as RGB."""
    plt = _pyplot()
    n, (_, _, H, W) = len(images), images.shape
    gh, gw = H // backbone.patch_size, W // backbone.patch_size
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
    rgb = rgb.reshape(n, gh, gw, 3)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.3), squeeze=False)
    for i in range(n):
        _show(axes[0, i], images[i])
        axes[1, i].imshow(rgb[i].numpy(), extent=(0, W, H, 0))
        axes[1, i].set_xticks([]), axes[1, i].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_picture(log_paths, path):
    """Training loss and k-NN top-1 against epoch, one line per run (log.jsonl files or run dirs)."""
    plt = _pyplot()
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.8))
    for p in log_paths:
        p = os.path.join(p, "log.jsonl") if os.path.isdir(p) else p
        try:
            records = [json.loads(line) for line in open(p) if line.strip()]
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {p}: {e}") from None
        label = os.path.basename(os.path.dirname(os.path.abspath(p)))
        ax_loss.plot([r["epoch"] + 1 for r in records], [r["train_loss"] for r in records], label=label)
        knn = [(r["epoch"] + 1, r["knn_top1"]) for r in records if "knn_top1" in r]
        if knn:
            ax_knn.plot(*zip(*knn), marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_knn.set(xlabel="epoch", ylabel="k-NN top-1 (%)", title="k-NN")
    for ax in (ax_loss, ax_knn):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["knn", "attention", "pca", "curves"])
    p.add_argument("--checkpoint", default="", help="a nanodino checkpoint.pth")
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--data_path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--output_dir", default=".", help="where attention.png / pca.png / curves.png go")
    p.add_argument("--nb_knn", type=int, default=20, help="k (official default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of exp(s/T) (official 0.07)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--baselines", action="store_true", help="also k-NN on raw pixels and a random ViT")
    p.add_argument("--num_images", type=int, default=6, help="images in the attention / PCA pictures")
    p.add_argument("--logs", nargs="+", default=[], help="curves: log.jsonl files or run directories")
    args = p.parse_args(argv)
    device = dist.setup(args.device)
    result = None
    try:
        if args.command == "curves":
            if not args.logs:
                raise ValueError("curves needs --logs RUN_DIR_OR_LOG [...]")
            os.makedirs(args.output_dir, exist_ok=True)
            result = {"picture": os.path.join(args.output_dir, "curves.png")}
            curves_picture(args.logs, result["picture"])
        else:
            if not args.checkpoint:
                raise ValueError("--checkpoint is required")
            backbone, cfg = load_backbone(args.checkpoint, device)
            name = args.data or cfg["data"]
            path = args.data_path if args.data_path is not None else cfg.get("data_path", "")
            size = cfg["global_crops_size"]
            train_set, eval_set = data_lib.load_dataset(name, path, eval_size=size)
        if args.command == "knn":
            top1, top5 = knn_eval(backbone, train_set, eval_set, size, device, args.nb_knn, args.temperature,
                                  args.batch_size, args.num_workers)
            result = {"top1": top1, "top5": top5, "k": args.nb_knn, "data": name}
            if args.baselines:
                for key, (b1, b5) in baselines(cfg["arch"], cfg["patch_size"], train_set, eval_set, size,
                                               device, k=args.nb_knn, T=args.temperature).items():
                    result[f"{key}_top1"], result[f"{key}_top5"] = b1, b5
        elif args.command in ("attention", "pca"):
            if args.num_images < 1:
                raise ValueError(f"--num_images must be positive, got {args.num_images}")
            os.makedirs(args.output_dir, exist_ok=True)
            images = _first_images(eval_set, args.num_images, size, device)
            result = {"picture": os.path.join(args.output_dir, f"{args.command}.png")}
            (attention_picture if args.command == "attention" else pca_picture)(backbone, images, result["picture"])
    except (ValueError, data_lib.DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if dist.is_main():
        print(json.dumps(result))
    dist.cleanup()


if __name__ == "__main__":
    main()
