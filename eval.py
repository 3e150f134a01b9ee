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
    """The teacher backbone of a nanodino checkpoint and its config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "method" not in ckpt:
        raise ValueError(f"{path} is not a nanodino checkpoint (no 'config' / 'method' keys)")
    cfg = ckpt["config"]
    model = build_vit(cfg["arch"], cfg["patch_size"], img_size=cfg["global_crops_size"],
                      num_register_tokens=cfg.get("num_register_tokens", 0),
                      layerscale=cfg.get("layerscale") or None, ffn_layer=cfg.get("ffn_layer", "mlp"),
                      interpolate_offset=cfg.get("interpolate_offset", 0.1),
                      interpolate_antialias=cfg.get("interpolate_antialias", False))
    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["method"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["knn"])
    p.add_argument("--checkpoint", default="", help="a nanodino checkpoint.pth")
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--data_path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--nb_knn", type=int, default=20, help="k (official default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of exp(s/T) (official 0.07)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--baselines", action="store_true", help="also k-NN on raw pixels and a random ViT")
    args = p.parse_args(argv)
    device = dist.setup(args.device)
    try:
        if not args.checkpoint:
            raise ValueError("--checkpoint is required")
        backbone, cfg = load_backbone(args.checkpoint, device)
        name = args.data or cfg["data"]
        path = args.data_path if args.data_path is not None else cfg.get("data_path", "")
        size = cfg["global_crops_size"]
        train_set, eval_set = data_lib.load_dataset(name, path, eval_size=size)
        top1, top5 = knn_eval(backbone, train_set, eval_set, size, device, args.nb_knn, args.temperature,
                              args.batch_size, args.num_workers)
        result = {"top1": top1, "top5": top5, "k": args.nb_knn, "data": name}
        if args.baselines:
            for key, (b1, b5) in baselines(cfg["arch"], cfg["patch_size"], train_set, eval_set, size,
                                           device, k=args.nb_knn, T=args.temperature).items():
                result[f"{key}_top1"], result[f"{key}_top5"] = b1, b5
    except (ValueError, data_lib.DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if dist.is_main():
        print(json.dumps(result))
    dist.cleanup()


if __name__ == "__main__":
    main()
