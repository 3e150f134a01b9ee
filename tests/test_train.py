"""The shared loop's pieces: schedules against the official numpy implementation, EMA,
per-parameter clipping, the command line."""
import numpy as np
import pytest
import torch

import train
from dino import PRESETS, DINOConfig


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.cosine_scheduler of facebookresearch/dino, transcribed to test against."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("base,final,epochs,niter,warmup", [
    (5e-4, 1e-6, 10, 7, 2), (0.04, 0.4, 5, 3, 0), (0.996, 1.0, 4, 11, 0), (1e-3, 0.0, 3, 1, 1)])
def test_cosine_schedule_matches_official(base, final, epochs, niter, warmup):
    ref = official_cosine_scheduler(base, final, epochs, niter, warmup)
    ours = [train.cosine_schedule(s, base, final, epochs * niter, warmup * niter) for s in range(epochs * niter)]
    assert np.allclose(ours, ref, rtol=0, atol=1e-12)


def test_schedules_scale_lr_with_batch():
    cfg = DINOConfig(batch_size_per_gpu=128, lr=0.001, warmup_epochs=1, epochs=10)
    s = train.schedules(cfg, 10, steps_per_epoch=10)   # first step after warm-up: the peak
    assert abs(s["lr"] - 0.001 * 128 / 256) < 1e-12
    assert s["wd"] < cfg.weight_decay + 0.01 and train.schedules(cfg, 99, 10)["momentum"] > 0.9999


def test_ema_update():
    torch.manual_seed(0)
    s, t = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.9 * b + 0.1 * a for a, b in zip(s.parameters(), t.parameters())]
    train.ema_update(s, t, 0.9)
    for e, p in zip(expected, t.parameters()):
        assert torch.allclose(e, p.detach(), atol=1e-7)


def test_per_parameter_clipping():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    norms = train.clip_gradients([a, b], 1.0)
    assert torch.allclose(torch.stack(norms), torch.tensor([5.0, 0.5]))
    assert abs(a.grad.norm() - 1.0) < 1e-5            # clipped on its own
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # left alone (not a global norm)


def test_cli_preset_then_flags():
    cfg = train.config_cli(DINOConfig, PRESETS, ["--arch", "vit_tiny", "--global_crops_scale", "0.3", "1"])
    assert cfg.arch == "vit_tiny" and cfg.data == "synthetic" and cfg.global_crops_scale == (0.3, 1.0)
    cfg = train.config_cli(DINOConfig, PRESETS, ["--preset", "imagenet", "--norm_last_layer", "true", "--use_fp16", "true"])
    assert cfg.teacher_temp == 0.07 and cfg.norm_last_layer is True and cfg.precision == "fp16"


@pytest.mark.parametrize("flags,message", [
    (["--arch", "vit_huge"], "unknown --arch"),
    (["--batch_size_per_gpu", "-4"], "--batch_size_per_gpu must be positive"),
    (["--global_crops_size", "30"], "--global_crops_size 30 is not divisible by --patch_size 8"),
    (["--local_crops_scale", "0.5", "0.2"], "--local_crops_scale"),
    (["--data", "imagefolder"], "--data imagefolder needs --data_path"),
    (["--data_path", "/nonexistent/dir"], "does not exist"),
])
def test_check_config_names_the_flag(flags, message):
    cfg = train.config_cli(DINOConfig, PRESETS, flags)
    with pytest.raises(train.ConfigError, match=message.replace("-", r"\-")):
        cfg.check()


def test_summary_line_puts_the_knn_next_to_the_cached_baselines(tmp_path, monkeypatch):
    """The run's last line: its k-NN against raw pixels and the random ViT, computed once per data
    and architecture and then read from the cache; below the random ViT it says why (the method's
    own words, DINO's for the synthetic data, or a general one)."""
    monkeypatch.setenv("NANODINO_CACHE", str(tmp_path))
    calls = []
    fake = lambda arch, *a, **k: calls.append(arch) or {"raw_pixels": (27.0, 60.0), "random_vit": (26.0, 61.0)}
    monkeypatch.setattr(train.eval_lib, "baselines", fake)
    cfg, cpu, images = DINOConfig(**PRESETS["synthetic"]), torch.device("cpu"), [0] * 10
    line = train.summary(cfg, object(), 40.0, images, images[:4], cpu)
    assert "k-NN top-1 40.00" in line and "raw pixels 27.00" in line and "26.00" in line and "+14.00" in line
    below = train.summary(cfg, object(), 20.0, images, images[:4], cpu)
    assert calls == ["vit_pico"] and "below the random ViT" in below and "Collapse" in below
    import dino
    assert train.summary(cfg, dino.DINO.__new__(dino.DINO), 20.0, images, images[:4], cpu).endswith(
        dino.DINO.below_random_vit) and "tools/compare.py" in dino.DINO.below_random_vit
    train.summary(DINOConfig(**{**PRESETS["synthetic"], "arch": "vit_nano"}), object(), 40.0, images, images[:4], cpu)
    assert calls == ["vit_pico", "vit_nano"]            # another architecture: its own baselines
    assert "no k-NN" in train.summary(cfg, object(), None, images, images[:4], cpu)


def test_an_epoch_is_what_each_methods_official_code_counts():
    """DINO, SimDINO and SimDINOv2 (OFFICIAL_EPOCH_LENGTH -1: len(dataset) // batch) count passes
    over the data; DINOv2 counts OFFICIAL_EPOCH_LENGTH = 1,250 iterations, whatever the batch."""
    import dinov2
    import simdino
    import simdinov2
    assert DINOConfig().epoch_length(7) == simdino.SimDINOConfig().epoch_length(7) == 7
    assert simdinov2.SimDINOv2Config().epoch_length(7) == 7
    assert dinov2.DINOv2Config().epoch_length(7) == 1250
    assert dinov2.DINOv2Config(official_epoch_length=0).epoch_length(7) == 7


def test_batches_run_on_across_passes_over_the_data():
    """An epoch longer than a pass: the steps' batches are those of pass after pass, each in its
    own seeded order, and resuming at any step gives the same batches."""
    import data
    ds = data.TensorImages(torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 2, 2).to(torch.uint8),
                           torch.arange(10), 10)
    loader = data.Loader(ds, 3, seed=1)                              # 3 steps a pass (one image left out)
    expected = [x for e in range(3) for x, _ in loader.epoch(e)]     # 9 steps
    got = list(train.batches(loader, 2, 8))
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, expected[2:8]))
    assert not torch.equal(expected[0], expected[3])                 # each pass its own order


def test_clipping_per_parameter_or_per_submodule():
    """Groups without a clip_group: each parameter on its own (DINO); groups sharing one: one norm
    over all their gradients, as torch.nn.utils.clip_grad_norm_ (DINOv2, per student submodule)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(4)]
    grads = [torch.randn(4) * s for s in (1.0, 5.0, 0.1, 3.0)]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    groups = [{"params": ps[:2]}, {"params": ps[2:3], "clip_group": "head"}, {"params": ps[3:], "clip_group": "head"}]
    norms = train.clip_groups(groups, 1.0)
    assert torch.allclose(torch.stack(norms), torch.stack([g.norm() for g in grads]))
    assert abs(ps[0].grad.norm() - 1.0) < 1e-5 and abs(ps[1].grad.norm() - 1.0) < 1e-5   # each on its own
    ref = [g.clone().requires_grad_() for g in grads[2:]]
    for r, g in zip(ref, grads[2:]):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert all(torch.allclose(p.grad, r.grad) for p, r in zip(ps[2:], ref))             # together
    assert abs(torch.cat([p.grad for p in ps[2:]]).norm() - 1.0) < 1e-5


def test_last_layer_freeze_drops_gradients_for_dino_and_zeroes_the_lr_for_dinov2(tmp_path):
    """During the first epoch the prototypes do not move. DINO (cancel_gradients_last_layer): no
    gradient, so AdamW keeps no state for them. DINOv2 (last_layer_lr 0): gradients flow into
    AdamW's moments (and the clip norm), the step is zero."""
    import dino
    import dinov2
    from kernels import distributed
    for recipe in (dino.RECIPE, dinov2.RECIPE):
        cfg = train.config_cli(recipe.Config, recipe.presets, [
            "--max_steps", "2", "--eval_every", "0", "--batch_size_per_gpu", "16", "--out_dim", "64",
            "--output_dir", str(tmp_path / recipe.name)])
        method = train.train(cfg, recipe.Method)
        distributed.seed_everything(cfg.seed)
        init = recipe.Method(cfg, 1).student.state_dict()     # the same seed: the initial weights
        after = method.student.state_dict()
        assert torch.equal(after["head.last_layer.weight_v"], init["head.last_layer.weight_v"]), recipe.name
        assert not torch.equal(after["head.mlp.0.weight"], init["head.mlp.0.weight"])   # the rest learns
        order = [n for g in method.param_groups() for n, p in method.student.named_parameters()
                 if any(p is q for q in g["params"])]           # AdamW's state is indexed in this order
        moments = torch.load(tmp_path / recipe.name / "checkpoint.pth", weights_only=True)["optimizer"]["state"]
        last = [i for i, n in enumerate(order) if "last_layer" in n]
        assert last and all((i in moments) == (recipe.name == "dinov2") for i in last), (recipe.name, last)
