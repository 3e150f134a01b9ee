"""Details a quick read misses. What must stay fp32 under bf16 autocast stays there (the loss side
of each method, against the same computation in fp32; on CPU autocast runs matrix products in
bf16); torchvision's crop fallback and DINOv2's fixed blur kernel."""
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


def test_random_resized_crop_falls_back_to_torchvisions_centre_crop():
    """When none of the 10 tries fits (a 10 x 40 image at scale 1), torchvision takes the centre
    crop with the aspect clamped to [3/4, 4/3], not the whole image squashed."""
    import data
    g = torch.Generator().manual_seed(0)
    boxes = data.random_resized_crop_boxes(3, 10, 40, (1.0, 1.0), g)
    assert boxes.tolist() == [[0, 13, 10, 13]] * 3                    # wide: h 10, w round(10·4/3)
    assert data.random_resized_crop_boxes(2, 40, 10, (1.0, 1.0), g).tolist() == [[13, 0, 13, 10]] * 2
    assert data.random_resized_crop_boxes(2, 12, 12, (1.0, 1.0), g)[:, 2:].tolist() in ([[12, 12]] * 2,)


def test_dinov2_blur_is_torchvisions_nine_tap_kernel():
    """DINOv2's GaussianBlur(kernel_size=9): at 224 pixels, taps out to 4 pixels, not 3σ."""
    import torchvision.transforms.functional as TF
    import data
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    sigma = torch.tensor([2.0, 0.7])
    ours = data.gaussian_blur(x, sigma, max_radius=data.MultiCrop(224, 96, blur_kernel_size=9).blur_radius)
    ref = torch.stack([TF.gaussian_blur(x[i], kernel_size=9, sigma=float(sigma[i])) for i in range(2)])
    assert torch.allclose(ours[0], ref[0], atol=1e-5)                # σ 2: 9 taps, where 3σ would give 13
    assert data.MultiCrop(224, 96).blur_radius is None and data.MultiCrop(32, 16, blur_kernel_size=9).blur_radius == 1



def test_knn_of_a_bf16_run_runs_the_backbone_in_bf16_and_votes_in_fp32(monkeypatch):
    """The epoch's k-NN of a bf16 run extracts its features under the run's autocast, as its step runs
    (not in fp32, which costs a large ViT twice the time and activation memory); the features that
    the vote compares stay fp32."""
    import types
    import data
    import eval as eval_lib
    import train
    import vit
    torch.manual_seed(0)
    backbone = vit.build_vit("vit_pico", 8, img_size=32)
    seen, compared = [], []
    backbone.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    knn_classify = eval_lib.knn_classify
    monkeypatch.setattr(eval_lib, "knn_classify", lambda *a, **kw: compared.extend(
        x.dtype for x in a[:4:2]) or knn_classify(*a, **kw))
    images, labels = data.make_synthetic(60, seed=3)
    ds = data.TensorImages(images, labels, 10)
    cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, ["--precision", "bf16"])
    method = types.SimpleNamespace(teacher=types.SimpleNamespace(backbone=backbone))
    record = train.end_of_epoch(cfg, method, ds, ds, torch.device("cpu"), {"epoch": 0}, evaluate=True)
    assert torch.bfloat16 in seen and compared == [torch.float32, torch.float32], (seen, compared)
    assert 0 <= record["knn_top1"] <= 100
