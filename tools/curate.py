"""Data curation as DINOv2 builds LVD-142M (Oquab et al. 2023, arXiv 2304.07193, §3 "Data
Processing" and Appendix A), at laptop scale: tens of thousands of images, plain torch
(docs/SCALING.md). It embeds a curated set and an uncurated pool with a pretrained backbone;
deduplicates the pool (one image per connected component of copies above --dedup_threshold among
each image's --dedup_k nearest neighbours; none above --exclude_threshold to an --exclude image,
a benchmark's test set); retrieves the --neighbours nearest kept pool images of each curated image
(paper: "typically 4"); and writes both as a file list (path, tab, class: a retrieved image takes
its curated image's class) that `--data list --data_path FILE` trains on.

What differs from the paper, for size: one backbone (any checkpoint eval.py reads) embeds and
deduplicates, where the paper deduplicates with the copy-detection model SSCD (Pizzi et al. 2022,
thresholds 0.6 and 0.45 on its embeddings) and retrieves with ViT-H/16 embeddings; Faiss becomes
chunked matrix products; cluster-based retrieval (k-means, for small curated sets) is left out.
Thresholds depend on the backbone: --demo prints the similarity of planted copies and of unrelated
images, to choose them.

    python tools/curate.py --curated CURATED_DIR --pool POOL_DIR --checkpoint runs/dinov2/checkpoint.pth \\
        --output curated.txt
    python dinov2.py --data list --data_path curated.txt --global_crops_size 224 ...
    python tools/curate.py --demo DIR --checkpoint runs/dinov2/checkpoint.pth   # planted copies: precision, recall
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch
import torch.nn.functional as F

import data as data_lib
import eval as eval_lib


def image_files(root):
    """Every image under root (sorted), and each one's class: its folder's name."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in data_lib.IMAGE_EXTENSIONS)
    if not files:
        raise data_lib.DataError(f"no images found under {str(root)!r}")
    return [str(p.resolve()) for p in files], [p.parent.name for p in files]


@torch.no_grad()
def embed(backbone, files, size, device, batch_size=256, grid=4):
    """Two descriptors of each image file (resized and centre-cropped to size): the CLS token
    (n, D), what retrieval compares, and the patch tokens average-pooled to a grid x grid map
    (n, grid²·D), what copy detection compares (see copy_descriptors)."""
    def both(x):
        out = backbone.forward_features(x)
        p = out["x_norm_patchtokens"]                                    # (B, N, D)
        B, N, D = p.shape
        side = int(N ** 0.5)
        p = F.adaptive_avg_pool2d(p.transpose(1, 2).reshape(B, D, side, side), min(grid, side))
        return torch.cat([out["x_norm_clstoken"], p.flatten(1)], dim=1)
    images = data_lib.FolderImages(files, [0] * len(files), 1, size)
    feats, _ = eval_lib.extract_features(both, images, size, device, batch_size)
    D = backbone.embed_dim
    return F.normalize(feats[:, :D], dim=-1), feats[:, D:]


def copy_descriptors(maps, mean):
    """The stand-in for the paper's SSCD, a model trained for copy detection: the coarse patch-token
    map (instance-level, position-sensitive, where the CLS token is trained to ignore crops and to
    gather a class), centred on the pool's mean map (what all images share says nothing about
    copies) and L2-normalised."""
    return F.normalize(maps - mean, dim=-1)


@torch.no_grad()
def nearest(queries, keys, k, skip_self=False, chunk=1024):
    """The k largest cosine similarities of each query among the keys and their indices, (n, k)
    each, chunk queries at a time; skip_self: queries and keys are one set, none its own neighbour."""
    k = min(k, len(keys) - int(skip_self))
    top = []
    for start in range(0, len(queries), chunk):
        s = queries[start:start + chunk] @ keys.T                  # (chunk, len(keys))
        if skip_self:
            s.diagonal(start).fill_(-float("inf"))                 # s[i, start + i]: query i's own key
        top.append(s.topk(k, dim=1))
    sims, index = zip(*top)
    return torch.cat(sims), torch.cat(index)


def connected_components(n, edges):
    """Disjoint sets over n items joined by edges: each item's component, named by its smallest
    member (the representative that deduplication keeps)."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i
    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def deduplicate(pool, threshold, k=64, exclude=None, exclude_threshold=None):
    """Indices of the pool images kept (sorted): one per component of the graph linking each image
    to those of its k nearest neighbours above `threshold` (self-deduplication), less those above
    `exclude_threshold` to any `exclude` feature (relative deduplication)."""
    sims, index = nearest(pool, pool, k, skip_self=True)
    pairs = (sims > threshold).nonzero().tolist()
    component = connected_components(len(pool), [(i, int(index[i, j])) for i, j in pairs])
    keep = torch.tensor([i for i in range(len(pool)) if component[i] == i], dtype=torch.long)
    if exclude is not None and len(exclude) and len(keep):
        closest, _ = nearest(pool[keep], exclude, 1)
        keep = keep[closest[:, 0] <= exclude_threshold]
    return keep


def retrieve(curated, pool, keep, n):
    """Sample-based retrieval: for each curated image, the pool indices (among `keep`) of its n
    nearest neighbours, (len(curated), n)."""
    _, index = nearest(curated, pool[keep], n)
    return keep.to(index.device)[index]


def curate(curated_files, curated_labels, pool_files, backbone, size, device, args, exclude_files=()):
    """The pipeline on file lists -> (list entries [(path, class)], report dict, what score() reads)."""
    print(f"embedding {len(curated_files)} curated and {len(pool_files)} pool images at {size}x{size} ...")
    curated, _ = embed(backbone, curated_files, size, device)
    pool, pool_maps = embed(backbone, pool_files, size, device)
    mean = pool_maps.mean(dim=0)
    copies, exclude = copy_descriptors(pool_maps, mean), None
    if exclude_files:
        exclude = copy_descriptors(embed(backbone, list(exclude_files), size, device)[1], mean)
    keep = deduplicate(copies, args.dedup_threshold, args.dedup_k, exclude, args.exclude_threshold)
    retrieved = retrieve(curated, pool, keep, args.neighbours)
    taken = {}                          # pool index -> the class of the first curated image that retrieved it
    for q, row in enumerate(retrieved.tolist()):
        for i in row:
            taken.setdefault(i, curated_labels[q])
    entries = list(zip(curated_files, curated_labels)) + [(pool_files[i], label) for i, label in taken.items()]
    report = {"curated": len(curated_files), "pool": len(pool_files), "kept_after_dedup": len(keep),
              "retrieved": len(taken), "written": len(entries)}
    print(f"pool: {len(pool_files)} images, {len(keep)} kept after deduplication; {len(taken)} retrieved "
          f"({args.neighbours} per curated image); the list holds {len(entries)} images")
    return entries, report, {"keep": keep.tolist(), "retrieved": retrieved.tolist(), "copies": copies}


def write_list(path, entries):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(f"{file}\t{label}\n" for file, label in entries))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# --demo: a curated set and a pool with planted copies and neighbours, to measure the pipeline.

def write_demo(root, n_curated=200, n_pool=2000, n_dup_groups=100, n_planted=100, seed=0):
    """root/curated/<class>/*.png (held-out synthetic images), root/pool/*.png (training images,
    unrelated to the curated ones) with planted near-duplicates (each of n_dup_groups pool images
    gets an exact and an augmented copy) and planted neighbours (an augmented copy of each of
    n_planted curated images); root/planted.json names them."""
    from torchvision.utils import save_image
    train, held_out = data_lib.load_dataset("synthetic")
    g = torch.Generator().manual_seed(seed)
    root = Path(root)
    names = data_lib.SHAPES

    def save(img, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(img.float() / 255, path)
        return str(path.resolve())

    curated = [save(held_out.images[i], root / "curated" / names[int(held_out.labels[i])] / f"{i:05d}.png")
               for i in range(n_curated)]
    pool_idx = torch.randperm(len(train), generator=g)[:n_pool]
    pool = [save(train.images[i], root / "pool" / f"p{j:05d}.png") for j, i in enumerate(pool_idx.tolist())]
    classes = {f: names[int(train.labels[i])] for f, i in zip(pool, pool_idx.tolist())}
    groups, neighbours = [], {}
    for j in range(n_dup_groups):
        img = train.images[pool_idx[j]]
        groups.append([pool[j], save(img, root / "pool" / f"p{j:05d}_copy.png"),
                       save(augmented_copy(img, g), root / "pool" / f"p{j:05d}_aug.png")])
        classes.update({f: classes[pool[j]] for f in groups[-1]})
    for q in range(n_planted):
        neighbours[curated[q]] = save(augmented_copy(held_out.images[q], g), root / "pool" / f"q{q:05d}_aug.png")
        classes[neighbours[curated[q]]] = names[int(held_out.labels[q])]
    (root / "planted.json").write_text(json.dumps({"duplicate_groups": groups, "neighbours": neighbours,
                                                   "pool_classes": classes}))


def augmented_copy(img, g):
    """A near-duplicate as the web has them (trimmed, recoloured, re-encoded, stamped): a mild crop,
    colour jitter, blur and a small overlaid square. img: (3, H, W) uint8."""
    x = img.float().unsqueeze(0) / 255
    H, W = x.shape[-2:]
    boxes = data_lib.random_resized_crop_boxes(1, H, W, (0.9, 1.0), g)
    x = data_lib.resized_crops(x, boxes, torch.zeros(1, dtype=torch.bool), H)
    x = data_lib.color_jitter(x, g, 0.1, 0.1, 0.05, 0.0)
    x = data_lib.gaussian_blur(x, torch.full((1,), 0.5))
    s = max(2, H // 12)
    i, j = (torch.randint(0, H - s, (2,), generator=g)).tolist()
    x[..., i:i + s, j:j + s] = torch.rand(3, 1, 1, generator=g)
    return (x.clamp(0, 1)[0] * 255).round().to(torch.uint8)


def score(planted, pool_files, curated_files, curated_labels, result):
    """Precision and recall against planted.json: deduplication should remove the exact and
    augmented copies and keep their originals; retrieval should find each planted neighbour, and
    images of the curated image's class. And the similarities to choose thresholds from: augmented
    copy to original, and each unrelated pool image's nearest neighbour."""
    keep, retrieved, feats = result["keep"], result["retrieved"], result["copies"]
    removed = set(pool_files) - {pool_files[i] for i in keep}
    groups = planted["duplicate_groups"]                     # [original, exact copy, augmented copy]
    exact, augmented = {grp[1] for grp in groups}, {grp[2] for grp in groups}
    row = {f: r for f, r in zip(curated_files, retrieved)}
    at = {f: i for i, f in enumerate(pool_files)}
    found = sum(at[n] in row[q] for q, n in planted["neighbours"].items())
    same_class = [planted["pool_classes"][pool_files[i]] == curated_labels[q]
                  for q, r in enumerate(retrieved) for i in r]
    copy_sims = torch.stack([feats[at[grp[0]]] @ feats[at[grp[2]]] for grp in groups])
    planted_files = {f for grp in groups for f in grp} | set(planted["neighbours"].values())
    others = torch.tensor([i for i, f in enumerate(pool_files) if f not in planted_files])
    other_sims, _ = nearest(feats[others], feats[others], 1, skip_self=True)
    r = lambda x: round(x, 3)
    return {"dedup_precision": r(len(removed & (exact | augmented)) / max(len(removed), 1)),
            "dedup_recall_exact": r(len(removed & exact) / len(exact)),
            "dedup_recall_augmented": r(len(removed & augmented) / len(augmented)),
            "retrieval_recall_planted": r(found / max(len(planted["neighbours"]), 1)),
            "retrieval_precision_same_class": r(sum(same_class) / max(len(same_class), 1)),
            "augmented_copy_similarity_min_median": [r(copy_sims.min().item()), r(copy_sims.median().item())],
            "unrelated_nearest_similarity_median_max": [r(other_sims.median().item()), r(other_sims.max().item())]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="backbone: any checkpoint eval.py reads (teacher)")
    p.add_argument("--curated", help="folder of curated images (class sub-folders name the classes)")
    p.add_argument("--pool", help="folder of uncurated images (any layout)")
    p.add_argument("--exclude", default="", help="folder of images to keep out (a benchmark's test set)")
    p.add_argument("--output", default="curated.txt", help="the file list to write")
    p.add_argument("--demo", default="", help="write a synthetic curated set and pool with planted "
                   "copies here, curate it, print precision and recall")
    p.add_argument("--image_size", type=int, default=0, help="embedding size (default: the checkpoint's "
                   "global crop size)")
    p.add_argument("--dedup_threshold", type=float, default=0.85,
                   help="cosine similarity above which two pool images are copies")
    p.add_argument("--dedup_k", type=int, default=64, help="neighbours examined per pool image (paper: 64)")
    p.add_argument("--exclude_threshold", type=float, default=0.85,
                   help="similarity to an --exclude image that removes a pool image")
    p.add_argument("--neighbours", type=int, default=4, help="pool images retrieved per curated image (paper: 4)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for name in ("dedup_threshold", "exclude_threshold"):
        if not -1 <= getattr(args, name) <= 1:
            p.error(f"--{name} is a cosine similarity, in [-1, 1]; got {getattr(args, name)}")
    for name in ("dedup_k", "neighbours"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if not args.demo and not (args.curated and args.pool):
        p.error("give --curated and --pool (or --demo DIR)")
    try:
        device = torch.device(args.device)
        backbone, cfg = eval_lib.load_backbone(args.checkpoint, device)
        size = args.image_size or (cfg or {}).get("global_crops_size", 224)
        if args.demo:
            if not Path(args.demo, "planted.json").exists():  # else reuse it (to try other thresholds)
                write_demo(args.demo)
            args.curated, args.pool = f"{args.demo}/curated", f"{args.demo}/pool"
            args.output = f"{args.demo}/curated.txt"
        curated_files, curated_labels = image_files(args.curated)
        pool_files, _ = image_files(args.pool)
        exclude_files = image_files(args.exclude)[0] if args.exclude else ()
        entries, report, result = curate(curated_files, curated_labels, pool_files, backbone, size, device,
                                         args, exclude_files)
        write_list(args.output, entries)
    except (ValueError, RuntimeError, OSError, data_lib.DataError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.output}: train on it with --data list --data_path {args.output}")
    if args.demo:
        planted = json.loads(Path(args.demo, "planted.json").read_text())
        report.update(score(planted, pool_files, curated_files, curated_labels, result))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
