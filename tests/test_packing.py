"""Sequence packing (--pack_crops, vit.forward_features_list, kernels.attention.packed_attention):
the global and local crops in one backbone pass under a block-diagonal FlexAttention mask give
the outputs and parameter gradients of one forward per crop size; drop path is drawn per crop;
DINOv2 and DINO steps are the same with and without packing."""
import pytest
import torch

import dino
import dinov2
import train
import vit
from vit import build_vit

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens")


def tiny_vit():
    """ViT-pico/8 as DINOv2 builds it: registers, LayerScale, a mask token; packing on."""
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, img_size=32, num_register_tokens=2, layerscale=0.1, use_mask_token=True,
                      interpolate_antialias=True, pack_crops=True)
    with torch.no_grad():  # LayerScale 0.1 and zero biases would hide a wrong mask; make every path count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def crops_and_masks():
    g = torch.Generator().manual_seed(1)
    global_crops = torch.randn(6, 3, 32, 32, generator=g)     # 2 views x 3 images: 4x4 patches
    local_crops = torch.randn(12, 3, 16, 16, generator=g)     # 4 views x 3 images: 2x2 patches
    masks = torch.rand(6, 16, generator=g) < 0.4              # iBOT masks on the global crops only
    masks[0] = False                                          # one unmasked crop, as block masking gives
    return [global_crops, local_crops], [masks, None]


def loss_of(outs):
    """A fixed random functional of every output, so that every output gets a gradient."""
    g = torch.Generator().manual_seed(2)
    return sum((o[k] * torch.randn(o[k].shape, generator=g)).sum() for o in outs for k in KEYS)


def assert_close_to_scale(a, b, name, tol=1e-5):
    """fp32 agreement: max |a − b| at most tol of max |b| (sums of hundreds of terms in another order)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale, f"{name}: max |diff| {err:.3g} against max |grad| {scale:.3g}"


def test_packed_outputs_and_gradients_equal_one_forward_per_crop_size():
    model = tiny_vit()
    xs, masks = crops_and_masks()
    packed = model.forward_features_list(xs, masks)
    loss_of(packed).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = [model.forward_features(x, m) for x, m in zip(xs, masks)]    # one forward per crop size
    loss_of(ref).backward()
    for p_out, r_out in zip(packed, ref):
        assert torch.equal(p_out["masks"], r_out["masks"]) if r_out["masks"] is not None else p_out["masks"] is None
        for k in KEYS:
            assert p_out[k].shape == r_out[k].shape
            torch.testing.assert_close(p_out[k], r_out[k], rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, n
        assert_close_to_scale(grads[n], p.grad, n)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_equals_one_forward_per_crop_size():
    """Without gradients the CPU runs FlexAttention itself (its backward does not exist on CPU)."""
    model = tiny_vit().eval()
    xs, masks = crops_and_masks()
    with torch.no_grad():
        packed = model.forward_features_list(xs, masks)
        ref = [model.forward_features(x, m) for x, m in zip(xs, masks)]
    for p_out, r_out in zip(packed, ref):
        for k in KEYS:
            torch.testing.assert_close(p_out[k], r_out[k], rtol=0, atol=1e-5)


def test_packed_drop_path_is_drawn_per_crop():
    torch.manual_seed(0)
    segments = torch.repeat_interleave(torch.arange(5), torch.tensor([17, 5, 5, 3, 3]))
    out = vit.DropPath(0.5).train()(torch.ones(64, len(segments), 4), segments)  # (rows, T, D)
    assert set(out.unique().tolist()) == {0.0, 2.0}             # dropped, or kept and scaled by 1/keep
    for j in range(5):  # one draw per crop and row: constant over its tokens, not over the crops
        crop = out[:, segments == j, 0]
        assert (crop == crop[:, :1]).all() and 0.3 < (crop[:, 0] > 0).float().mean() < 0.7
    assert (out[:, segments == 1, 0][:, 0] != out[:, segments == 2, 0][:, 0]).any()


@pytest.mark.parametrize("recipe", [dinov2.RECIPE, dino.RECIPE], ids=["dinov2", "dino"])
def test_step_is_the_same_with_pack_crops(recipe, monkeypatch):
    calls = []
    monkeypatch.setattr(vit, "block_diagonal_mask", lambda *a: calls.append(a) or vit_block_mask(*a))
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)] + [torch.randn(4, 3, 16, 16)] * 4
    results = []
    for pack in ("false", "true"):
        cfg = train.config_cli(recipe.Config, recipe.presets, ["--pack_crops", pack, "--batch_size_per_gpu", "4"])
        torch.manual_seed(0)
        method = recipe.Method(cfg, 10)
        loss, _ = method(crops, step=0)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in method.student.named_parameters() if p.grad is not None}))
    assert len(calls) == 1                                      # the student packed once, with --pack_crops true
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert_close_to_scale(grads_b[n], grads_a[n], n)


vit_block_mask = vit.block_diagonal_mask
