"""DINOv2 (dinov2.py, the DINOv2 parts of vit.py and data.py): Sinkhorn–Knopp marginals in one
process and under torchrun, KoLeo and iBOT against their formulas, block masks, the mask token,
registers, SwiGLU, layer-wise lr multipliers, the step, bad mask flags."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import data
import dinov2
import train
from vit import build_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sinkhorn_knopp_marginals():
    logits = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    Q = dinov2.sinkhorn_knopp(logits, 0.5, n_iterations=3)
    assert Q.shape == (96, 16) and (Q >= 0).all()
    torch.testing.assert_close(Q.sum(1), torch.ones(96))                      # each sample: 1
    assert (Q.sum(0) / (96 / 16) - 1).abs().max() < 0.2    # each prototype: ~n/K after 3 iterations
    Q = dinov2.sinkhorn_knopp(logits, 0.5, n_iterations=200)
    torch.testing.assert_close(Q.sum(0), torch.full((16,), 96 / 16), rtol=1e-4, atol=1e-4)
    # and it is not the plain softmax: a prototype every sample prefers gets spread out
    skewed = logits.clone()
    skewed[:, 0] += 5
    assert dinov2.sinkhorn_knopp(skewed, 0.5)[:, 0].sum() < 0.2 * skewed.div(0.5).softmax(1)[:, 0].sum()


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from kernels import distributed as dist
import dinov2
dist.setup("cpu")
r, W = dist.rank(), dist.world_size()
logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))   # the global batch
mine = logits.chunk(W)[r]
Q = dinov2.sinkhorn_knopp(mine, 0.3)
Q_all = dist.all_gather_cat(Q)
dist.cleanup()
# one process on the whole batch, same function
import importlib, os
for k in ("RANK", "WORLD_SIZE"):
    os.environ.pop(k)
ref = dinov2.sinkhorn_knopp(logits, 0.3)
torch.testing.assert_close(Q_all, ref, rtol=1e-5, atol=1e-7)
if r == 0:
    print("OK")
"""


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_sinkhorn_knopp_under_torchrun_equals_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = tmp_path / "sk.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=ROOT)))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-2000:], r.stderr[-5000:])


def test_koleo_against_its_formula():
    # four points on the unit circle at angles 0, 10, 100, 200 degrees: nearest-neighbour chord lengths
    deg = torch.tensor([0.0, 10.0, 100.0, 200.0])
    x = torch.stack([torch.cos(deg * math.pi / 180), torch.sin(deg * math.pi / 180)], 1) * 3.0  # norm ignored
    chord = lambda a: 2 * math.sin(math.radians(a) / 2)
    nn_dist = [chord(10), chord(10), chord(90), chord(100)]
    expected = -sum(math.log(d) for d in nn_dist) / 4
    assert abs(dinov2.koleo_loss(x).item() - expected) < 1e-5


def test_ibot_loss_against_a_transcription():
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    M, K, tau = int(masks.sum()), 5, 0.1
    s = torch.randn(M, K, generator=g)
    t = torch.randn(M, K, generator=g).softmax(-1)
    w = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    got = dinov2.ibot_loss(s, t, w, masks.shape[0], tau)
    # per image: mean over its masked patches of H(P_t, P_s); summed over images; / number of images
    rows, k = [], 0
    for i in range(4):
        n = int(masks[i].sum())
        if n:
            rows.append(sum(-(t[j] * (s[j] / tau).log_softmax(-1)).sum() for j in range(k, k + n)) / n)
        k += n
    torch.testing.assert_close(got, sum(rows) / 4)


def test_block_masks_stay_in_bounds():
    g = torch.Generator().manual_seed(1)
    for grid in (4, 14):
        N = grid * grid
        for _ in range(30):
            masks = data.sample_masks(32, grid, grid, (0.1, 0.5), 0.5, g)
            counts = masks.sum(1)
            assert (counts > 0).sum() <= 16            # int(32 * 0.5) masked crops at most
            assert counts.max() <= 0.5 * N + 1e-9       # never above the 0.5 ratio
        m = data.block_mask(grid, grid, int(0.4 * N), g, max_patches=int(0.5 * N))
        assert 0 < m.sum() <= int(0.4 * N)
    # the masked ratios cover the range: the i-th masked crop draws from the i-th slice
    g = torch.Generator().manual_seed(2)
    ratios = torch.cat([data.sample_masks(64, 14, 14, (0.1, 0.5), 0.5, g).sum(1) / 196 for _ in range(5)])
    masked = ratios[ratios > 0]
    assert masked.min() < 0.15 and masked.max() > 0.4


def test_blocks_have_the_official_aspect_bounds():
    """A single block on an empty grid: a rectangle of area >= 4 with aspect in [0.3, 1/0.3]."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        m = data.block_mask(14, 14, 30, g, max_patches=30)
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        if m.sum() == h * w:   # one block (a second block may follow when the first fell short)
            assert 4 <= h * w <= 30 and 0.3 / 1.2 <= h / w <= 1.2 / 0.3


def test_mask_token_replaces_masked_patches_and_registers_are_not_patches():
    vit = build_vit("vit_pico", 8, img_size=32, num_register_tokens=4, use_mask_token=True, layerscale=1e-5)
    with torch.no_grad():
        vit.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    tokens = vit.prepare_tokens(x, masks)                        # [CLS, 4 registers, 16 patches]
    assert tokens.shape == (2, 1 + 4 + 16, 96)
    pos = vit.interpolate_pos_encoding(4, 4)[0, 1:]             # patch positions
    torch.testing.assert_close(tokens[0, 5 + 1], vit.mask_token[0] + pos[1])
    torch.testing.assert_close(tokens[0, 5 + 5], vit.mask_token[0] + pos[5])
    assert not torch.allclose(tokens[1, 5 + 1], vit.mask_token[0] + pos[1])
    out = vit.forward_features(x, masks)
    assert out["x_norm_patchtokens"].shape == (2, 16, 96) and out["x_norm_regtokens"].shape == (2, 4, 96)


def test_swiglu_and_uniform_drop_path():
    vit = build_vit("vit_pico", 8, img_size=32, ffn_layer="swiglufused", drop_path_rate=0.3, drop_path_uniform=True)
    ffn = vit.blocks[0].mlp
    assert ffn.w12.out_features == 2 * 256 and ffn.w3.in_features == 256   # (int(384·2/3)+7)//8·8
    assert all(b.drop_path.p == 0.3 for b in vit.blocks)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    linear = build_vit("vit_pico", 8, img_size=32, drop_path_rate=0.3)
    assert [b.drop_path.p for b in linear.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_layerwise_lr_multipliers():
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--layerscale", "1e-5"])
    method = dinov2.DINOv2(cfg)
    mult = {id(p): (g["lr_mult"], g["wd_mult"], g["is_last_layer"]) for g in method.param_groups() for p in g["params"]}
    named = dict(method.student.named_parameters())
    L, rho = 4, 0.9
    for i in range(L):
        assert mult[id(named[f"backbone.blocks.{i}.attn.qkv.weight"])] == (pytest.approx(rho ** (L - i)), 1.0, False)
        assert mult[id(named[f"backbone.blocks.{i}.ls1.gamma"])][1] == 0.0            # no decay on gammas
    assert mult[id(named["backbone.patch_embed.proj.weight"])][0] == pytest.approx(rho ** (L + 1) * 0.2)
    assert mult[id(named["backbone.pos_embed"])][0] == pytest.approx(rho ** (L + 1))
    assert mult[id(named["backbone.mask_token"])][0] == pytest.approx(rho ** (L + 1))
    assert mult[id(named["backbone.norm.weight"])][:2] == (1.0, 0.0)
    assert mult[id(named["head.mlp.0.weight"])] == (1.0, 1.0, False)
    assert mult[id(named["head.last_layer.weight_v"])][2] is True
    assert named["head.last_layer.weight_g"].requires_grad                      # DINOv2 learns the norms


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_step_losses_and_centres(centering):
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--centering", centering, "--batch_size_per_gpu", "8"])
    torch.manual_seed(0)
    method = dinov2.DINOv2(cfg, steps_per_epoch=10)
    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)] + [torch.randn(8, 3, 16, 16)] * 4
    loss, logs = method(crops, step=0)
    logs = {k: float(v) for k, v in logs.items()}
    loss.backward()
    assert torch.isfinite(loss) and logs["ibot_loss"] > 0 and logs["teacher_temp"] == pytest.approx(0.04)
    assert loss.item() == pytest.approx(logs["dino_loss"] + 0.1 * logs["koleo_loss"] + logs["ibot_loss"], rel=1e-5)
    assert method.student.backbone.mask_token.grad is not None and method.student.backbone.mask_token.grad.abs().sum() > 0
    moved = method.center.abs().sum() > 0
    assert moved if centering == "centering" else not moved
    # τ_t grows linearly per step over the warm-up (3 epochs of 10 steps) to 0.07
    assert method.teacher_temp(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert method.teacher_temp(30) == pytest.approx(0.07)


def test_sqrt_lr_scaling():
    cfg = train.config_cli(dinov2.DINOv2Config, dinov2.PRESETS, ["--batch_size_per_gpu", "256", "--warmup_epochs", "0"])
    assert train.schedules(cfg, 0, 10)["lr"] == pytest.approx(0.004 * math.sqrt(256 / 1024))


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio_min_max", "0.5", "0.1"], "--mask_ratio_min_max must satisfy"),
    (["--mask_ratio_min_max", "0.1", "1.5"], "--mask_ratio_min_max must satisfy"),
    (["--mask_sample_probability", "2"], "--mask_sample_probability must be in [0, 1]"),
    (["--layerwise_decay", "0"], "--layerwise_decay must be in (0, 1]"),
    (["--batch_size_per_gpu", "1"], "KoLeo needs at least 2 images"),
])
def test_bad_dinov2_flags_get_one_line(flags, message, tmp_path):
    r = subprocess.run([sys.executable, "dinov2.py", *flags, "--output_dir", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
