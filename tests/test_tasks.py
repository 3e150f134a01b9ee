"""The other evaluations (tasks.py): each metric on hand-made cases, the propagation and the
normalized cut on hand-made features, the synthetic scenes, and every subcommand end to end on a
tiny copy of the real dataset's folder layout."""
import functools
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as eval_lib
from tools import tasks
from vit import build_vit


def test_segmentation_metrics_perfect_and_partial():
    t = torch.tensor([0, 0, 1, 1])
    assert tasks.segmentation_metrics(t, t, 2) == (1.0, 1.0)
    # class 0: IoU 1/2, acc 1/2; class 1: IoU 2/3, acc 1
    miou, macc = tasks.segmentation_metrics(torch.tensor([0, 1, 1, 1]), t, 2)
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2) and macc == pytest.approx(0.75)
    # ignored pixels (-1) do not count; a class absent from target and prediction does not either
    miou, macc = tasks.segmentation_metrics(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, -1, -1]), 5)
    assert (miou, macc) == (1.0, 1.0)


def test_average_precision_by_hand():
    assert tasks.average_precision([0, 1], 2) == 1.0
    assert tasks.average_precision([1], 1) == pytest.approx(0.25)           # (0 + 1/2) / 2
    assert tasks.average_precision([0, 2], 2) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.2, 0.3]])
    assert tasks.mean_average_precision(sim, [[0], [0]]) == pytest.approx((1 + (0 + 1 / 3) / 2) / 2)
    # junk is taken out of the ranking: query 1's positive moves from rank 2 to rank 0
    assert tasks.mean_average_precision(sim, [[0], [0]], junk=[[], [1, 2]]) == 1.0
    # a query without positives is left out
    assert tasks.mean_average_precision(sim, [[0], []]) == 1.0


def test_box_ap_by_hand():
    gt = [torch.tensor([[0, 0, 10, 10.]]), torch.tensor([[0, 0, 10, 10.], [20, 20, 30, 30.]])]
    perfect = [(g.clone(), torch.arange(len(g), 0, -1).double()) for g in gt]
    assert tasks.box_ap(perfect, gt, 0.5) == pytest.approx(1.0)
    # a false positive ranked first, then two hits: precision 2/3 up to recall 2/3, none after
    dets = [(torch.tensor([[0, 0, 10, 10.]]), torch.tensor([0.9])),
            (torch.tensor([[20, 20, 30, 30.], [50, 50, 60, 60.]]), torch.tensor([0.8, 0.95]))]
    assert tasks.box_ap(dets, gt, 0.5) == pytest.approx(2 / 3 * 67 / 101)
    # a box of IoU 0.64 counts at 0.5, not at 0.75; a duplicate is a false positive
    shifted = [(torch.tensor([[0, 2, 10, 12.]]), torch.tensor([1.0]))]
    assert tasks.box_iou(shifted[0][0], gt[0]).item() == pytest.approx(80 / 120)
    assert tasks.box_ap(shifted, gt[:1], 0.5) == pytest.approx(1.0) and tasks.box_ap(shifted, gt[:1], 0.75) == 0
    dup = [(torch.tensor([[0, 0, 10, 10.], [0, 0, 10, 10.]]), torch.tensor([1.0, 0.5]))]
    assert tasks.box_ap(dup, gt[:1], 0.5) == pytest.approx(1.0)  # the duplicate comes after recall 1


def test_j_and_f_by_hand():
    gt = torch.zeros(5, 40, 40, dtype=torch.long)
    gt[:, 5:15, 5:15], gt[:, 20:30, 20:30] = 1, 2
    j, f = tasks.j_and_f(gt, gt, [1, 2])
    assert j.tolist() == [1, 1] and f.tolist() == [1, 1]
    missing = torch.where(gt == 2, 0, gt)
    j, f = tasks.j_and_f(missing, gt, [1, 2])
    assert j.tolist() == [1, 0] and f.tolist() == [1, 0]
    # a one-pixel shift: boundaries within the tolerance (ceil(0.008 * 56.6) = 1 px), IoU 90/110
    shifted = torch.roll(gt, 1, dims=2)
    j, f = tasks.j_and_f(shifted, gt, [1])
    assert j.item() == pytest.approx(90 / 110) and f.item() == 1.0
    # the first and last frames do not count
    bad_ends = gt.clone()
    bad_ends[0], bad_ends[-1] = 0, 0
    assert tasks.j_and_f(bad_ends, gt, [1])[0].item() == 1.0


def test_label_propagation_follows_features_not_positions():
    """An object of one patch moving one patch right per frame: with features that move with it
    the labels follow; the first frame's labels alone (all features equal) would stay put."""
    T, h, w, D = 4, 6, 6, 8
    feats = torch.randn(h, w, D).expand(T, h, w, D).clone() * 0.1
    target = torch.randn(D) * 5
    for t in range(T):
        feats[t, 2, 1 + t] = target
    first = torch.zeros(2, h, w)
    first[0], first[1, 2, 1], first[0, 2, 1] = 1, 1, 0
    soft = tasks.propagate_labels(feats, first, topk=1)
    for t in range(T):
        assert soft[t].argmax(0)[2, 1 + t] == 1 and soft[t].argmax(0).sum() == 1
    pixels = tasks.labels_to_pixels(soft, 4)
    assert pixels.shape == (T, 24, 24) and pixels[3, 8:12, 16:20].eq(1).all()
    # the neighbourhood restricts the sources: with radius 0 the object cannot move
    soft0 = tasks.propagate_labels(feats, first, topk=1, neighbourhood=0)
    assert soft0[3].argmax(0)[2, 4] == 0


def test_normalized_cuts_find_the_objects_one_by_one():
    g = torch.Generator().manual_seed(0)
    e = torch.eye(16)   # background, object a and object b along three orthogonal directions
    feats = torch.randn(8, 8, 16, generator=g) * 0.05 + e[0]
    feats[1:4, 1:3] += e[1] - e[0]
    feats[5:7, 4:8] += e[2] - e[0]
    cuts = tasks.normalized_cuts(feats)
    found = sorted(tuple(tasks.mask_box(m)) for m, _ in cuts)
    assert found == [(1, 1, 3, 4), (4, 5, 8, 7)], found
    assert all(0 < s <= 1 for _, s in cuts)


def test_whitening_gives_unit_second_moment():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=g) @ torch.randn(6, 6, generator=g)
    x = x - x.mean(0)
    (w,) = tasks.whiten(x, x)
    assert torch.allclose(w.T @ w / len(w), torch.eye(6), atol=1e-3)


def test_scenes_masks_match_pixels_and_clips_move():
    images, ids, classes = data.make_scenes(3, frames=4, size=64, seed=0)
    assert images.shape == (3, 4, 3, 64, 64) and ids.shape == (3, 4, 64, 64) and classes.shape == (3, 3)
    grey = images[:, :, 0].float()
    assert grey[ids > 0].mean() > grey[ids == 0].mean() + 100      # objects are light on dark
    assert set(ids[0, 0].unique().tolist()) <= {0, 1, 2, 3} and (ids[:, 0] > 0).any()
    assert not torch.equal(ids[:, 0], ids[:, 3])                    # the objects moved
    again = data.make_scenes(3, frames=4, size=64, seed=0)
    assert torch.equal(again[0], images) and torch.equal(again[1], ids)


# ----------------------------------------------------------------------------------------------
# End to end: the subcommands on random weights, on the synthetic data and on tiny folders in
# the real datasets' layouts.

@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    torch.save(build_vit("vit_pico", 8, img_size=32).state_dict(), path)  # an official-style plain backbone
    return str(path)


def _run(capsys, *argv):
    capsys.readouterr()
    eval_lib.main(list(argv) + ["--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _save(array, path):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _scene_images(n, size=64, seed=0):
    images, ids, classes = data.make_scenes(n, size=size, seed=seed)
    return images[:, 0].permute(0, 2, 3, 1).numpy(), ids[:, 0].numpy(), classes.numpy()


def test_seg_on_ade20k_layout(tmp_path, random_checkpoint, capsys):
    images, ids, classes = _scene_images(6)
    for i in range(6):
        split = "training" if i < 4 else "validation"
        _save(images[i], str(tmp_path / "ADEChallengeData2016/images" / split / f"ADE_{i}.jpg"))
        labels = np.where(ids[i] > 0, classes[i][np.maximum(ids[i].astype(int) - 1, 0)] + 2, 0).astype(np.uint8)
        _save(labels, str(tmp_path / "ADEChallengeData2016/annotations" / split / f"ADE_{i}.png"))
    x, y, xe, ye, names = tasks.segmentation_data(str(tmp_path), 64)
    assert x.shape == (4, 3, 64, 64) and len(names) == 150
    assert y.min() == -1 and set(y.unique().tolist()) - {-1} <= set(range(1, 12))  # 0 ("other") ignored, v -> v-1
    out = _run(capsys, "seg", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path),
               "--image_size", "32", "--output_dir", str(tmp_path / "out"))
    assert 0 <= out["mIoU"] <= 100 and os.path.isfile(out["picture"])


def test_video_on_davis_layout(tmp_path, random_checkpoint, capsys):
    frames, ids, _ = data.make_scenes(1, frames=4, size=64, seed=0)
    for t in range(4):
        _save(frames[0, t].permute(1, 2, 0).numpy(), str(tmp_path / f"JPEGImages/480p/shapes/{t:05d}.jpg"))
        _save(ids[0, t].numpy(), str(tmp_path / f"Annotations/480p/shapes/{t:05d}.png"))
    os.makedirs(tmp_path / "ImageSets/2017")
    (tmp_path / "ImageSets/2017/val.txt").write_text("shapes\n")
    out = _run(capsys, "video", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path),
               "--image_size", "64", "--output_dir", str(tmp_path / "out"))
    assert out["clips"] == 1 and 0 <= out["J&F"] <= 100 and os.path.isfile(out["picture"])


def test_retrieval_on_revisited_oxford_layout(tmp_path, random_checkpoint, capsys):
    images, _, _ = _scene_images(6)
    names = [f"im{i}" for i in range(6)]
    for name, x in zip(names, images):
        _save(x, str(tmp_path / "jpg" / f"{name}.jpg"))
    gnd = [{"easy": np.array([1]), "hard": np.array([2]), "junk": np.array([0]), "bbx": np.array([0., 0., 40., 40.])}]
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": names[:1], "gnd": gnd}, f)
    out = _run(capsys, "retrieval", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path),
               "--image_size", "32", "--output_dir", str(tmp_path / "out"))
    assert out["queries"] == 1 and 0 < out["mAP_hard"] <= 100 and 0 < out["mAP_medium"] <= 100
    # a pickle naming any other class is refused with one line
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": [], "gnd": [], "x": pytest.approx}, f)
    with pytest.raises(SystemExit, match="refused"):
        _run(capsys, "retrieval", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path))


def test_copydetection_on_copydays_layout(tmp_path, random_checkpoint, capsys):
    images, _, _ = _scene_images(4)
    copies = tasks.make_copies(torch.from_numpy(images).permute(0, 3, 1, 2)[:2], torch.Generator(), strong=True)
    for i in range(4):
        _save(images[i], str(tmp_path / f"original/20{i}000.jpg"))
    for i in range(2):
        _save(copies[i].permute(1, 2, 0).numpy(), str(tmp_path / f"strong/20{i}001.jpg"))
    db, q, positives, whitening = tasks.copy_detection_data(str(tmp_path), 32, torch.Generator())
    assert positives == [[0], [1]] and len(db) == 4 and len(q) == 2
    out = _run(capsys, "copydetection", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path),
               "--output_dir", str(tmp_path / "out"))
    assert out["queries"] == 2 and 0 < out["mAP"] <= 100


def test_discover_on_coco_layout(tmp_path, random_checkpoint, capsys):
    images, ids, _ = _scene_images(2, size=48)
    anns, k = [], 0
    for i in range(2):
        _save(images[i], str(tmp_path / f"val2017/{i:012d}.jpg"))
        for obj in range(1, 4):
            x0, y0, x1, y1 = tasks.mask_box(torch.from_numpy(ids[i] == obj))
            anns.append({"id": k, "image_id": i, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
            k += 1
    anns.append({"id": k, "image_id": 0, "bbox": [0, 0, 48, 48], "iscrowd": 1})
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations/instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(2)], "annotations": anns}))
    _, truth = tasks.discovery_data(str(tmp_path), 96)
    assert [len(t) for t in truth] == [3, 3]                                 # crowd left out
    assert truth[0].max() <= 96 and truth[0].min() >= 0                     # rescaled 48 -> 96 px
    out = _run(capsys, "discover", "--checkpoint", random_checkpoint, "--data_path", str(tmp_path),
               "--image_size", "96", "--output_dir", str(tmp_path / "out"))
    assert out["images"] == 2 and 0 <= out["AP50"] <= 100 and os.path.isfile(out["picture"])


def test_task_errors_are_one_line(tmp_path, random_checkpoint):
    for argv in (["video", "--data_path", str(tmp_path)],                       # no DAVIS listing
                 ["discover", "--data_path", str(tmp_path / "missing")],        # not a directory
                 ["seg", "--image_size", "60"],                                 # not a multiple of 8
                 ["copydetection", "--data_path", str(tmp_path)],               # no original/
                 ["depth", "--data_path", str(tmp_path)],                       # no split file
                 ["action", "--data_path", str(tmp_path)]):                     # no UCF101 lists, no train/
        with pytest.raises(SystemExit) as e:
            eval_lib.main(argv + ["--checkpoint", random_checkpoint, "--device", "cpu"])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value), (argv, e.value)


def test_linear_segmentation_learns_a_separable_problem():
    """Patch features that name their patch's class (one-hot + noise): the head must reach an
    mIoU near 1 at pixel level (labels constant on each 4 x 4 patch)."""
    g = torch.Generator().manual_seed(0)
    patch_labels = torch.randint(0, 3, (64, 4, 4), generator=g)
    feats = F.one_hot(patch_labels, 3).float() + 0.1 * torch.randn(64, 4, 4, 3, generator=g)
    labels = patch_labels.repeat_interleave(4, 1).repeat_interleave(4, 2)          # (64, 16, 16)
    pred = tasks.linear_segmentation(feats[:48], labels[:48], feats[48:], 3, steps=300, lr=1e-2)
    miou, macc = tasks.segmentation_metrics(pred, labels[48:], 3)
    assert miou > 0.8 and macc > 0.85, (miou, macc)


# ----------------------------------------------------------------------------------------------
# Monocular depth and action recognition.

def test_depth_metrics_by_hand():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])                      # one image; 0: no depth there
    assert tasks.depth_metrics(gt.clone(), gt, 10.0) == {"RMSE": 0.0, "AbsRel": 0.0, "delta1": 1.0}
    pred = torch.tensor([[[1.0, 3.0], [4.0, 7.0]]])                    # 2 m read as 3 (ratio 1.5); the 0 ignored
    m = tasks.depth_metrics(pred, gt, 10.0)
    assert m["RMSE"] == pytest.approx((1 / 3) ** 0.5) and m["AbsRel"] == pytest.approx(0.5 / 3)
    assert m["delta1"] == pytest.approx(2 / 3)
    # depths at or beyond the cap, and pixels outside the crop (top, bottom, left, right), do not count
    capped = tasks.depth_metrics(pred, torch.tensor([[[1.0, 2.0], [10.0, 0.0]]]), 10.0)
    cropped = tasks.depth_metrics(pred, gt, 10.0, crop=(0.0, 0.5, 0.0, 1.0))
    for m in (capped, cropped):
        assert (m["RMSE"], m["AbsRel"], m["delta1"]) == pytest.approx((0.5 ** 0.5, 0.25, 0.5))
    # per image, then averaged over images: a perfect image and one 2 m off on its single pixel -> RMSE 1
    two = tasks.depth_metrics(torch.tensor([[[1.0, 1.0]], [[3.0, 0.0]]]), torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]]), 10)
    assert two["RMSE"] == pytest.approx(1.0) and two["AbsRel"] == pytest.approx(1.0) and two["delta1"] == 0.5


def test_depth_from_bins_is_the_normalised_expectation():
    logits = torch.zeros(1, 5, 1, 3)                                   # bins 0, 1, 2, 3, 4 m
    logits[0, 0, 0, 1] = 10.0                                          # weights 10.1, 0.1, 0.1, 0.1, 0.1
    logits[0, 0, 0, 2], logits[0, 4, 0, 2] = 1.0, -5.0                 # a negative logit weighs as 0 (ReLU)
    d = tasks.depth_from_bins(logits, 0.0, 4.0)
    assert d.shape == (1, 1, 3)
    assert d[0, 0].tolist() == pytest.approx([2.0, 1.0 / 10.5, 1.0 / 1.5])   # Σ 0.1·(1 + 2 + 3 + 4) / Σ weights


def test_depth_scenes_nearer_shapes_cover_farther_ones():
    images, depth, ids, zs = tasks.depth_scenes(30, size=64, seed=0)
    assert images.shape == (30, 3, 64, 64) and depth.shape == ids.shape == (30, 64, 64)
    assert (zs[:, :-1] >= zs[:, 1:]).all()                             # drawn far to near: later ids nearer
    assert (depth[ids == 0] == 0).all() and (depth[ids == 1] > 0).all()  # sky without depth, ground with
    overlaps, errors = 0, []
    for i in range(30):
        ground = depth[i][ids[i] == 1]
        assert ground.max() <= 10.0
        for k in range(3):
            mask = ids[i] == k + 2
            if mask.any():
                assert torch.allclose(depth[i][mask], zs[i, k].float())
                # its base stands on the ground row whose depth is its own
                base = torch.nonzero(mask)[:, 0].max().item()
                row = depth[i, base + 1][ids[i, base + 1] == 1] if base + 1 < 64 else torch.tensor([])
                if len(row):
                    errors.append(abs(row.mean().item() - zs[i, k].item()) / zs[i, k].item())
                # a farther object touching this one never shows over it
                nearer_neighbour = F.max_pool2d((ids[i] > k + 2).float()[None, None], 3, 1, 1)[0, 0] > 0
                overlaps += (mask & nearer_neighbour).sum().item() > 0
    assert overlaps >= 3 and sorted(errors)[len(errors) // 2] < 0.1, (overlaps, errors)
    # apparent size falls with depth: the nearest of each scene covers more pixels than the farthest
    sizes = torch.stack([(ids == k + 2).sum((1, 2)) for k in range(3)], 1)
    assert (sizes[:, 2] > sizes[:, 0]).float().mean() > 0.8


def test_action_clips_motion_decides_the_class():
    """Motion energy (frame differences against the spatial gradients: translation, rotation about and
    scaling from the centroid) classifies the clips; a single middle frame (grey-level histogram,
    row and column profiles) stays near chance."""
    clips, labels = tasks.action_clips(240, size=32, seed=0)
    x = clips[:, :, 0].float() / 255                                   # (n, T, S, S)
    dI, m = x[:, 1:] - x[:, :-1], (x[:, 1:] + x[:, :-1]) / 2
    gy, gx = torch.gradient(m, dim=(2, 3))
    w = (m - m.amin((2, 3), keepdim=True)).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    X = xs - ((w * xs).sum((2, 3)) / w.sum((2, 3)))[..., None, None]
    Y = ys - ((w * ys).sum((2, 3)) / w.sum((2, 3)))[..., None, None]
    # brightness constancy dI = −a·v·∇I: per mode, the least-squares amount a of x, y, turn and zoom
    modes = (gx, gy, X * gy - Y * gx, X * gx + Y * gy)
    motion = torch.stack([(dI * v).sum((1, 2, 3)) / (v * v).sum((1, 2, 3)) for v in modes], 1)
    for k, (axis, sign) in enumerate(zip([0, 0, 1, 1, 2, 2, 3, 3], [1, -1, 1, -1, -1, 1, -1, 1])):
        assert sign * motion[labels == k, axis].mean() > 0, tasks.MOTIONS[k]   # each class moves as named
    (top1, _), _ = tasks.logistic_regression(motion[:160], labels[:160], motion[160:], labels[160:], 8)
    assert top1 > 80, top1
    mid, wm = x[:, 4], w[:, 3]   # the middle frame, its object weights
    mass = wm.sum((1, 2))
    cov = torch.stack([(wm * a * b).sum((1, 2)) / mass for a, b in ((X[:, 3], X[:, 3]), (X[:, 3], Y[:, 3]),
                                                                    (Y[:, 3], Y[:, 3]))], 1)
    shape = torch.stack([mass, cov[:, 0] + cov[:, 2], (cov[:, 0] - cov[:, 2]) ** 2 + 4 * cov[:, 1] ** 2], 1)
    single = torch.cat([torch.stack([torch.histc(f, 16, 0, 1) for f in mid]), mid.mean(1), mid.mean(2),
                        shape / shape.std(0)], 1)   # + the object's size and elongation: the shape
    (top1, _), _ = tasks.logistic_regression(single[:160], labels[:160], single[160:], labels[160:], 8)
    assert top1 < 100 / 8 + 10, top1


def _frames(folder, clip):
    for t, frame in enumerate(clip):
        _save(frame.permute(1, 2, 0).numpy(), os.path.join(folder, f"frame_{t:04d}.jpg"))


def test_depth_on_nyu_and_kitti_layouts(tmp_path, random_checkpoint, capsys, monkeypatch):
    images, depth, _, _ = tasks.depth_scenes(6, size=48, seed=0)
    nyu, kitti = tmp_path / "nyu", tmp_path / "kitti"
    lines, klines = [], []
    for i in range(6):
        _save(images[i].permute(1, 2, 0).numpy(), str(nyu / f"room_{i // 3}/rgb_{i:05d}.jpg"))
        _save((depth[i].numpy() * 1000).astype(np.uint16), str(nyu / f"room_{i // 3}/sync_depth_{i:05d}.png"))
        lines.append(f"/room_{i // 3}/rgb_{i:05d}.jpg /room_{i // 3}/sync_depth_{i:05d}.png 518.8579")
        big = F.pad(images[i], (0, 1222 - 48, 356 - 48, 0))            # 356 x 1222: the KB crop keeps 352 x 1216
        _save(big.permute(1, 2, 0).numpy(), str(kitti / f"input/2011_09_26/drive/image_02/data/{i:010d}.png"))
        _save((F.pad(depth[i], (0, 1222 - 48, 356 - 48, 0)).numpy() * 256).astype(np.uint16),
              str(kitti / f"gt_depth/drive/proj_depth/groundtruth/image_02/{i:010d}.png"))
        klines.append(f"2011_09_26/drive/image_02/data/{i:010d}.png drive/proj_depth/groundtruth/image_02/{i:010d}.png 721.5")
    (nyu / "nyu_train.txt").write_text("\n".join(lines[:4]) + "\n")
    (nyu / "nyu_test.txt").write_text("\n".join(lines[4:]) + "\n")
    (kitti / "kitti_eigen_train.txt").write_text("\n".join(klines[:4]) + "\n")
    (kitti / "kitti_eigen_test.txt").write_text("\n".join(klines[4:] + [klines[0].split()[0] + " None 721.5"]) + "\n")
    xtr, ytr, xte, yte, cap, crop = tasks.depth_data(str(nyu), 32, 8)
    assert xtr.shape == (4, 3, 32, 32) and ytr.shape == (4, 32, 32) and cap == 10.0 and crop[0] == 45 / 480
    assert torch.allclose(yte, depth[4:], atol=1e-3)                   # millimetres -> metres, full resolution
    xtr, ytr, xte, yte, cap, crop = tasks.depth_data(str(kitti), 32, 8)
    assert xte.shape == (2, 3, 32, 104) and yte.shape == (2, 352, 1216) and cap == 80.0   # "None" skipped
    assert torch.allclose(yte[:, -48:, :45], depth[4:, :, 3:], atol=1 / 256)     # the bottom-centre crop
    monkeypatch.setattr(tasks, "linear_depth", functools.partial(tasks.linear_depth, steps=20))  # the wiring, fast
    for root in (nyu, kitti):
        out = _run(capsys, "depth", "--checkpoint", random_checkpoint, "--data_path", str(root),
                   "--image_size", "16", "--output_dir", str(tmp_path / "out"))
        assert out["images"] == 2 and out["lin1_RMSE"] > 0 and 0 <= out["lin4_delta1"] <= 1
        assert os.path.isfile(out["picture"])


def test_action_on_ucf101_and_kinetics_layouts(tmp_path, random_checkpoint, capsys):
    clips, _ = tasks.action_clips(8, frames=10, size=32, seed=0)
    ucf, kinetics = tmp_path / "ucf", tmp_path / "kinetics"
    os.makedirs(ucf / "ucfTrainTestlist")
    (ucf / "ucfTrainTestlist/classInd.txt").write_text("1 Jump\n2 Run\n")
    train, test = [], []
    for i, clip in enumerate(clips):
        name, group = ("Jump", "Run")[i % 2], 1 + i // 2
        video = f"{name}/v_{name}_g{group:02d}_c01"
        _frames(str(ucf / "UCF-101" / video), clip)
        (train if group <= 3 else test).append(f"{video}.avi" + (f" {1 + i % 2}" if group <= 3 else ""))
        _frames(str(kinetics / ("train" if group <= 3 else "val") / name / f"clip{i}"), clip)
    (ucf / "ucfTrainTestlist/trainlist01.txt").write_text("\n".join(train) + "\n")
    (ucf / "ucfTrainTestlist/testlist01.txt").write_text("\n".join(test) + "\n")
    tr, te, names, pool = tasks.action_data(str(ucf))
    assert names == ("Jump", "Run") and pool == "mean" and [y for _, y in tr] == [0, 1] * 3 and len(te) == 2
    assert [os.path.basename(f) for f in tr[0][0]] == [f"frame_{t:04d}.jpg" for t in (0, 1, 3, 4, 5, 6, 8, 9)]
    for root in (ucf, kinetics):
        out = _run(capsys, "action", "--checkpoint", random_checkpoint, "--data_path", str(root),
                   "--image_size", "16", "--output_dir", str(tmp_path / "out"))
        assert out["clips"] == 2 and out["frames"] == 8 and 0 <= out["top1"] <= 100 and os.path.isfile(out["picture"])
    # videos not extracted into frames: one line saying so
    os.rename(ucf / "UCF-101/Jump/v_Jump_g01_c01", ucf / "frames")
    (ucf / "UCF-101/Jump/v_Jump_g01_c01.avi").write_bytes(b"")
    with pytest.raises(SystemExit, match="extract its frames"):
        _run(capsys, "action", "--checkpoint", random_checkpoint, "--data_path", str(ucf))
