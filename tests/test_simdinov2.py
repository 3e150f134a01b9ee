"""SimDINOv2 (simdinov2.py): the CLS loss (SimDINO's alignment and γ-balanced coding rate on
DINOv2's networks) and the masked-patch cosine loss against transcriptions; defaults; the step."""
import pytest
import torch
import torch.nn.functional as F

import simdino
import simdinov2
import train
from kernels.coding_rate import coding_rate_reference


def test_patch_loss_against_a_transcription():
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    M = int(masks.sum())
    s, t = torch.randn(M, 6, generator=g), torch.randn(M, 6, generator=g)
    w = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    got = simdinov2.patch_alignment(s, t, w, masks.shape[0])
    # per image: mean cosine over its masked patches; summed over images; / number of images
    per_image, k = [], 0
    for i in range(4):
        n = int(masks[i].sum())
        if n:
            per_image.append(sum(float(s[j] @ t[j] / (s[j].norm() * t[j].norm())) for j in range(k, k + n)) / n)
        k += n
    assert got.item() == pytest.approx(sum(per_image) / 4, rel=1e-5)


def test_defaults_are_the_official_ones():
    cfg = train.config_cli(simdinov2.SimDINOv2Config, simdinov2.PRESETS, ["--preset", "official"])
    assert (cfg.num_register_tokens, cfg.layerscale, cfg.momentum_teacher, cfg.eps, cfg.coeff) == (4, 0.1, 0.9, 0.05, 1.0)
    assert (cfg.drop_path_rate, cfg.head_bottleneck_dim, cfg.lr, cfg.lr_scaling) == (0.2, 256, 0.004, "sqrt")
    assert not hasattr(cfg, "koleo_loss_weight") and not hasattr(cfg, "out_dim") and not hasattr(cfg, "centering")


def test_step_is_cls_loss_plus_patch_loss():
    cfg = train.config_cli(simdinov2.SimDINOv2Config, simdinov2.PRESETS, ["--batch_size_per_gpu", "8"])
    torch.manual_seed(0)
    method = simdinov2.SimDINOv2(cfg)
    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)] + [torch.randn(8, 3, 16, 16)] * 4
    torch.manual_seed(1)
    loss, logs = method(crops, step=0)
    logs = {k: float(v) for k, v in logs.items()}
    loss.backward()
    # recompute the CLS part from the same outputs with the direct formulas
    torch.manual_seed(1)
    masks, weights = simdinov2.dinov2.masks_and_weights(cfg, crops)
    with torch.no_grad():
        t_cls, _ = method.teacher.teacher_forward(torch.cat(crops[:2]), masks)
        s_cls, _, _ = method.student(torch.cat(crops[:2]), torch.cat(crops[2:]), masks)
    zs, zt = s_cls.double().chunk(6), t_cls.double().chunk(2)
    align = sum(F.cosine_similarity(zt[t], zs[s], dim=-1).mean() for t in range(2) for s in range(6) if s != t) / 10
    Z = ((s_cls[:16] + t_cls).double() / 2).view(2, 8, -1)
    d, m = Z.shape[-1], 8
    expa = (d + m) / (d * m) * coding_rate_reference(Z, cfg.eps).mean()
    assert logs["comp_loss"] == pytest.approx(align.item(), rel=1e-5)
    assert logs["expa_loss"] == pytest.approx(expa.item(), rel=1e-4)
    assert loss.item() == pytest.approx(-align.item() - expa.item() + logs["patch_loss"], rel=1e-4)
    assert method.student.backbone.mask_token.grad.abs().sum() > 0
    assert method.student.backbone.register_tokens.grad is not None
