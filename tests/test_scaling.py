"""DINOv2's scaling recipe (paper §3 and §5): distillation from a frozen teacher, the
high-resolution phase, file lists, data curation. (Efficient stochastic depth: test_vit.py; the
distilled student beating one trained from scratch: test_learning.py.)"""
import json

import pytest
import torch

from tools import curate
import data
import dino
import dinov2
import train


def _teacher_checkpoint(path, arch="vit_nano", extra=()):
    """A dinov2.py training checkpoint (random weights, moved centres) of a larger model."""
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--arch", arch, *extra])
    torch.manual_seed(1)
    method = dinov2.DINOv2(cfg)
    method.center.normal_()
    method.center_patch.normal_()
    state = {**train.split_state(method.state_dict()), "optimizer": {}, "step": 0, "config":
             json.loads(json.dumps(cfg.__dict__))}
    torch.save(state, path)
    return method


def test_distillation_step_uses_the_frozen_teacher_on_every_patch(tmp_path):
    big = _teacher_checkpoint(tmp_path / "teacher.pth")
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS,
                           ["--distill_from", str(tmp_path / "teacher.pth"), "--batch_size_per_gpu", "8",
                            "--drop_path_rate", "0.3"])
    torch.manual_seed(0)
    method = dinov2.DINOv2Distillation(cfg, steps_per_epoch=10)
    # the frozen teacher is the checkpoint's EMA teacher, outside the module tree (not in the
    # checkpoint, not optimised, not EMA-updated); the EMA teacher is the student's size
    assert method.frozen.backbone.embed_dim == 128 and method.teacher.backbone.embed_dim == 96
    assert not any(k.startswith("frozen") for k in method.state_dict())
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not any(id(p) in trained or p.requires_grad for p in method.frozen.parameters())
    assert torch.equal(method.center, big.center) and torch.equal(method.center_patch, big.center_patch)
    assert all(b.drop_path.p == 0 for b in method.student.backbone.blocks)  # §5: no stochastic depth

    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)] + [torch.randn(8, 3, 16, 16)] * 4
    center, center_patch = method.center.clone(), method.center_patch.clone()
    loss, logs = method(crops, step=0)
    logs = {k: float(v) for k, v in logs.items()}
    loss.backward()
    assert method.student.backbone.mask_token is None   # §5: no masking (and no unused parameter for DDP)
    # the losses, transcribed: the frozen teacher's outputs centred with its centres, every patch
    g = torch.cat(crops[:2])
    with torch.no_grad():
        t = big.teacher.backbone.forward_features(g)
        t_cls, t_patch = big.teacher.head(t["x_norm_clstoken"]), big.teacher.head(t["x_norm_patchtokens"].flatten(0, 1))
        s = method.student.backbone.forward_features(g)
        s_cls = method.student.head(torch.cat([s["x_norm_clstoken"], method.student.backbone(torch.cat(crops[2:]))]))
        s_patch = method.student.head(s["x_norm_patchtokens"].flatten(0, 1))
    p_cls = ((t_cls - center) / 0.04).softmax(-1)
    p_patch = ((t_patch - center_patch) / 0.04).softmax(-1)
    assert logs["dino_loss"] == pytest.approx(dino.cross_entropy_pairs(s_cls, p_cls, 0.1).item(), rel=1e-4)
    n_patches = 16                                                       # 32 / 8 squared
    ibot = -((p_patch * (s_patch / 0.1).log_softmax(-1)).sum(-1) / n_patches).sum() / 16
    assert logs["ibot_loss"] == pytest.approx(ibot.item(), rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--patch_size", "4", "--global_crops_size", "32", "--local_crops_size", "16"], "patch_size 4"),
    (["--out_dim", "512"], "out_dim 512"),
])
def test_distillation_refuses_a_teacher_that_does_not_fit(tmp_path, extra, message):
    _teacher_checkpoint(tmp_path / "teacher.pth", extra=extra)
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--distill_from", str(tmp_path / "teacher.pth")])
    with pytest.raises(train.ConfigError, match=message):
        dinov2.DINOv2Distillation(cfg)
    torch.save({"teacher": {}, "config": {"arch": "vit_pico"}}, tmp_path / "other.pth")
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--distill_from", str(tmp_path / "other.pth")])
    with pytest.raises(train.ConfigError, match="not a dinov2.py training checkpoint"):
        dinov2.DINOv2Distillation(cfg)


def _small_synthetic(monkeypatch, n_train=128, n_eval=64):
    full_train, full_eval = data.load_dataset("synthetic")
    small = (data.subset(full_train, range(n_train)), data.subset(full_eval, range(n_eval)))
    monkeypatch.setattr(train.data_lib, "load_dataset", lambda *a, **k: small)


def test_high_res_phase_switches_the_global_crops_in_the_last_epochs(tmp_path, monkeypatch):
    _small_synthetic(monkeypatch)
    sizes = []
    forward = dinov2.DINOv2.forward
    monkeypatch.setattr(dinov2.DINOv2, "forward", lambda self, crops, step: (sizes.append(
        (step, crops[0].shape[-1], crops[-1].shape[-1])), forward(self, crops, step))[1])
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, [
        "--epochs", "3", "--batch_size_per_gpu", "32", "--high_res_epochs", "1", "--high_res_size", "48",
        "--eval_every", "0", "--output_dir", str(tmp_path)])
    train.train(cfg, dinov2.DINOv2)
    assert sizes == [(s, 32 if s < 8 else 48, 16) for s in range(12)]   # 4 steps per epoch; locals stay 16
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["global_crops_size"] for r in log] == [32, 32, 48]
    with pytest.raises(train.ConfigError, match="--high_res_size 50 must be a positive multiple of --patch_size 8"):
        train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--high_res_epochs", "1", "--high_res_size", "50"]).check()


def test_a_checkpoint_from_before_the_new_flags_resumes(tmp_path, monkeypatch):
    """A run written before --high_res_* and --compile existed (its config lacks them) resumes:
    missing flags count as their defaults; a changed flag is still refused."""
    _small_synthetic(monkeypatch)
    args = ["--batch_size_per_gpu", "32", "--eval_every", "0", "--output_dir", str(tmp_path)]
    train.train(train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, args + ["--max_steps", "2"]), dinov2.DINOv2)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    for name in ("high_res_epochs", "high_res_size", "compile", "distill_from", "efficient_drop_path"):
        del state["config"][name]
    torch.save(state, tmp_path / "checkpoint.pth")
    train.train(train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, args + ["--max_steps", "4"]), dinov2.DINOv2)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4]
    changed = args + ["--max_steps", "6", "--high_res_epochs", "1", "--high_res_size", "48"]
    with pytest.raises(train.ConfigError, match="different config"):
        train.train(train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, changed), dinov2.DINOv2)


def test_image_list_dataset(tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    lines = []
    for i in range(20):
        Image.new("RGB", (36, 36), (i * 10, 0, 0)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
        lines.append(f"imgs/cat/{i}.png" + ("\tdog" if i % 2 else ""))   # a tab names the class
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    train_set, held = data.load_dataset("list", str(tmp_path / "list.txt"), eval_size=32)
    assert train_set.classes == 2 and len(train_set) == 18 and len(held) == 2
    image, label = held[0]
    assert image.shape == (3, 32, 32)
    with pytest.raises(data.DataError, match="--data list needs --data_path FILE"):
        data.load_dataset("list", str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(data.DataError, match="names no image"):
        data.load_dataset("list", str(tmp_path / "empty.txt"))


def test_nearest_and_components():
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    sims, index = curate.nearest(x, x, 3, skip_self=True, chunk=7)       # chunks of 7: same answer as one
    full = x @ x.T
    full.fill_diagonal_(-2)
    ref_sims, ref_index = full.topk(3, dim=1)
    assert torch.allclose(sims, ref_sims) and torch.equal(index, ref_index)
    assert curate.connected_components(6, [(4, 2), (2, 5), (0, 1)]) == [0, 0, 2, 3, 2, 2]
    # exact copies are removed, one of each group kept; an excluded image's copy goes too
    pool = torch.cat([x[:10], x[:3], x[5:6]])
    keep = curate.deduplicate(pool, 0.99, k=4)
    assert keep.tolist() == list(range(10))
    keep = curate.deduplicate(pool, 0.99, k=4, exclude=x[7:8], exclude_threshold=0.99)
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert curate.retrieve(x[:2], pool, torch.arange(10), 1).tolist() == [[0], [1]]
