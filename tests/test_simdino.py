import math

import pytest
import torch
import torch.nn.functional as F

import simdino
import train
from simdino import SimDINO, SimDINOConfig, SimDINOHead, alignment, expansion


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def half_logdet(M):
    """½·log det of one symmetric positive-definite matrix (single-matrix slogdet, no batching)."""
    sign, value = torch.linalg.slogdet(M)
    assert sign > 0
    return 0.5 * value


def test_alignment_matches_the_formula_and_skips_same_view():
    V, B, d = 5, 7, 16
    s, t = unit(V * B, d, seed=1), unit(2 * B, d, seed=2)
    # transcription: (1/(2V−2)) Σ_{i∈{1,2}} Σ_{j≠i} (1/B) Σ_b ⟨z_t^i(b), z_s^j(b)⟩ / (‖·‖‖·‖)
    total = 0.0
    for i in range(2):
        for j in range(V):
            if i != j:
                for b in range(B):
                    a, c = t[i * B + b], s[j * B + b]
                    total += float(a @ c / (a.norm() * c.norm())) / B
    assert alignment(s, t).item() == pytest.approx(total / (2 * V - 2), rel=1e-12)
    # a student view equal to its own teacher view counts for nothing
    s2 = s.clone()
    s2[:B], s2[B:2 * B] = t[:B], t[B:]
    moved = alignment(s2, t).item() - alignment(s, t).item()
    expected = sum(float((t[i * B:(i + 1) * B] * t[(1 - i) * B:(2 - i) * B]).sum(-1).mean()
                         - (t[i * B:(i + 1) * B] * s[(1 - i) * B:(2 - i) * B]).sum(-1).mean())
                   for i in range(2)) / (2 * V - 2)
    assert moved == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("expa_type", [0, 1])
@pytest.mark.parametrize("B,d", [(8, 16), (40, 16)])
def test_expansion_gamma_and_expa_type(expa_type, B, d):
    V, eps = 4, 0.05
    s, t = unit(V * B, d, seed=3), unit(2 * B, d, seed=4)
    expa, R = expansion(s, t, eps, expa_type)
    gamma = (d + B) / (d * B)                        # (d + N·m)/(d·N·m) with N = 1, m = B
    rates = []
    for v in range(2):
        Z = s[v * B:(v + 1) * B]
        if expa_type == 1:
            Z = (Z + t[v * B:(v + 1) * B]) / 2
        rates.append(half_logdet(torch.eye(d, dtype=Z.dtype) + d / (B * eps) * Z.T @ Z))
    assert R.item() == pytest.approx(sum(rates).item() / 2, rel=1e-10)
    assert expa.item() == pytest.approx(gamma * sum(rates).item() / 2, rel=1e-10)


def test_teacher_features_get_no_gradient():
    B, d = 6, 8
    s = unit(4 * B, d).requires_grad_()
    t = unit(2 * B, d, seed=5).requires_grad_()
    expa, _ = expansion(s, t, 0.5, 1)
    (-alignment(s, t) - expa).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def tiny_cfg(**kw):
    base = dict(arch="vit_pico", patch_size=8, global_crops_size=32, local_crops_size=16,
                local_crops_number=2, head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.0)
    base.update(kw)
    return SimDINOConfig(**base)


def test_head_has_no_prototypes_and_is_normalised():
    head = SimDINOHead(96, 32, 16)
    z = head(torch.randn(5, 96))
    assert z.shape == (5, 16) and torch.allclose(z.norm(dim=-1), torch.ones(5))
    assert not any("last_layer" in n for n, _ in head.named_parameters())


def test_step_loss_is_the_sum_of_its_logged_terms():
    torch.manual_seed(0)
    cfg = tiny_cfg(coeff=0.7, eps=0.2)
    method = SimDINO(cfg)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    loss, logs = method(crops, step=0)
    logs = {k: float(v) for k, v in logs.items()}
    assert loss.item() == pytest.approx(-0.7 * logs["comp_loss"] - logs["expa_loss"], rel=1e-5)
    d, m = cfg.head_bottleneck_dim, 4
    assert logs["expa_loss"] == pytest.approx((d + m) / (d * m) * logs["coding_rate"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


def test_presets_trace_to_official_values():
    official = SimDINOConfig()
    assert (official.eps, official.coeff, official.expa_type, official.reduce_cov) == (0.5, 1.0, 1, 0)
    assert (official.head_hidden_dim, official.head_bottleneck_dim) == (2048, 256)   # --hidden_dim, --z_dim
    imagenet = train.config_cli(SimDINOConfig, simdino.PRESETS, ["--preset", "imagenet"])
    assert (imagenet.arch, imagenet.patch_size, imagenet.local_crops_number) == ("vit_base", 16, 10)
    assert (imagenet.eps, imagenet.coeff) == (0.05, 1.0)
    assert not hasattr(official, "out_dim") and not hasattr(official, "teacher_temp")


def test_bad_eps_is_a_config_error():
    with pytest.raises(train.ConfigError, match="--eps"):
        tiny_cfg(eps=0.0, data="synthetic").check()
