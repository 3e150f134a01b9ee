"""What must stay fp32 under bf16 autocast stays there: the loss side of each method, checked
against the same computation in fp32 (on CPU, where autocast runs matrix products in bf16)."""
import torch

import dino
import dinov2


def bf16(fn, *args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args)


def test_prototype_logits_are_fp32_under_autocast():
    """DINO's prototypes: bf16 logits divided by τ_t = 0.04 would put ~5 % noise into P_t."""
    torch.manual_seed(0)
    layer = dino.WeightNormLinear(64, 512)
    x = torch.nn.functional.normalize(torch.randn(32, 64), dim=-1)
    out, ref = bf16(layer, x), layer(x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)
    p, p_ref = (bf16(dino.centred_softmax, out, torch.zeros(1, 512), 0.04), dino.centred_softmax(ref, torch.zeros(1, 512), 0.04))
    assert p.dtype == torch.float32 and torch.allclose(p, p_ref, atol=1e-6)


def test_koleo_neighbours_and_distances_are_fp32_under_autocast():
    """Points so close that bf16 dot products cannot tell their neighbours apart."""
    torch.manual_seed(0)
    x = torch.randn(1, 32) + 1e-3 * torch.randn(64, 32)
    assert bf16(dinov2.koleo_loss, x).dtype == torch.float32
    assert torch.allclose(bf16(dinov2.koleo_loss, x), dinov2.koleo_loss(x), atol=1e-6)


def test_sinkhorn_and_centres_are_fp32_under_autocast():
    torch.manual_seed(0)
    logits = torch.randn(24, 128)
    q = bf16(dinov2.sinkhorn_knopp, logits.bfloat16(), 0.05)
    assert q.dtype == torch.float32 and torch.allclose(q, dinov2.sinkhorn_knopp(logits.bfloat16().float(), 0.05))
    c = bf16(dino.update_center, torch.zeros(1, 128), logits.bfloat16(), 0.9)
    assert c.dtype == torch.float32 and torch.allclose(c, dino.update_center(torch.zeros(1, 128),
                                                                             logits.bfloat16().float(), 0.9))
