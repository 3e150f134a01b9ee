"""ViT: shapes across archs / patch sizes / input sizes, position-embedding interpolation,
attention backends, attention weights, registers, drop path, init."""
import pytest
import torch

from kernels.attention import attention, attention_weights
from vit import ARCHS, Block, DropPath, build_vit, drop_add_residual


@pytest.mark.parametrize("arch,patch,img,inputs", [
    ("vit_pico", 8, 32, [32, 16, 48]),
    ("vit_tiny", 16, 224, [224, 96]),
    ("vit_small", 14, 56, [56, 28]),
    ("vit_nano", 4, 32, [32, 16, 24]),
])
def test_output_shapes_at_any_input_size(arch, patch, img, inputs):
    torch.manual_seed(0)
    model = build_vit(arch, patch, img_size=img).eval()
    D = ARCHS[arch][0]
    for s in inputs:
        out = model.forward_features(torch.randn(2, 3, s, s))
        assert out["x_norm_clstoken"].shape == (2, D)
        assert out["x_norm_patchtokens"].shape == (2, (s // patch) ** 2, D)
        assert model(torch.randn(2, 3, s, s)).shape == (2, D)


def test_base_and_large_sizes():
    for arch, (D, depth, H) in [("vit_base", (768, 12, 12)), ("vit_large", (1024, 24, 16))]:
        m = build_vit(arch, 16, img_size=32)
        assert (m.embed_dim, len(m.blocks), m.num_heads) == (D, depth, H)


def test_non_square_input():
    model = build_vit("vit_pico", 8, img_size=32).eval()
    out = model.forward_features(torch.randn(1, 3, 16, 40))
    assert out["x_norm_patchtokens"].shape == (1, 2 * 5, 96)


def test_pos_embed_interpolation():
    model = build_vit("vit_pico", 8, img_size=32)
    assert model.interpolate_pos_encoding(4, 4) is model.pos_embed      # native grid: untouched
    with torch.no_grad():  # bicubic resizing keeps a constant field constant ...
        model.pos_embed[:, 1:] = 0.7
    pe = model.interpolate_pos_encoding(6, 6)
    assert pe.shape == (1, 1 + 36, 96)
    assert torch.allclose(pe[:, 1:], torch.full_like(pe[:, 1:], 0.7), atol=1e-5)
    # ... and a horizontal ramp stays increasing along x, constant along y
    with torch.no_grad():
        ramp = torch.arange(4.0).repeat(4)  # x index of each patch of the 4x4 grid
        model.pos_embed[0, 1:] = ramp[:, None]
    pe = model.interpolate_pos_encoding(8, 8)[0, 1:, 0].reshape(8, 8)
    assert (pe[:, 1:] > pe[:, :-1]).all() and torch.allclose(pe[0], pe[5], atol=1e-5)


def test_bad_patch_multiple_is_a_clear_error():
    model = build_vit("vit_pico", 8, img_size=32)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="unknown --arch"):
        build_vit("vit_gigantic")


def test_attention_backends_agree_and_weights_are_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 17, 16).unbind(0)
    assert torch.allclose(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5)
    w = attention_weights(q, k)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 17), atol=1e-6)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # d = 16: √d = 4
    assert torch.allclose(w, ref, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, "cuda-magic")


def test_vit_forward_same_for_sdpa_and_math():
    torch.manual_seed(0)
    a = build_vit("vit_pico", 8, img_size=32, attn_backend="sdpa").eval()
    b = build_vit("vit_pico", 8, img_size=32, attn_backend="math").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_last_selfattention():
    model = build_vit("vit_pico", 8, img_size=32, num_register_tokens=2).eval()
    attn = model.get_last_selfattention(torch.randn(2, 3, 32, 32))
    assert attn.shape == (2, 3, 1 + 2 + 16, 1 + 2 + 16)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 19), atol=1e-5)


def test_registers_layerscale_and_mask_token():
    torch.manual_seed(0)
    model = build_vit("vit_pico", 8, img_size=32, num_register_tokens=4, layerscale=0.1,
                      use_mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_features(x)
    assert out["x_norm_regtokens"].shape == (2, 4, 96)
    assert out["x_norm_patchtokens"].shape == (2, 16, 96)
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((96,), 0.1))
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    masked = model.forward_features(x, masks)
    assert not torch.allclose(masked["x_norm_clstoken"][0], out["x_norm_clstoken"][0])
    assert torch.allclose(masked["x_norm_clstoken"][1], out["x_norm_clstoken"][1], atol=1e-6)


def test_drop_path_keeps_expectation_and_is_off_in_eval():
    torch.manual_seed(0)
    dp = DropPath(0.3)
    x = torch.ones(20000, 1, 4)
    y = dp.train()(x)
    kept = (y[:, 0, 0] != 0).float().mean()
    assert abs(kept - 0.7) < 0.02
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert abs(y.mean() - 1.0) < 0.03
    assert torch.equal(dp.eval()(x), x)


def test_efficient_drop_path_has_the_plain_expectation():
    """DINOv2's drop_add_residual: E[x + branch on the kept samples, scaled] = x + branch(x); and a
    whole block (two such residuals) has the expectation of the plain DropPath block. z-tests of
    Monte-Carlo means per element (1600 elements: under the null |z| > 5 has odds ~1e-3)."""
    torch.manual_seed(0)
    B, p, n = 7, 0.4, 3000                       # k = 4 of 7 kept, scale 7/4 (not 1/(1-p): still unbiased)
    x = torch.randn(B, 3, 8)
    branch = lambda t: torch.tanh(t) * 2 + 1
    draws = torch.stack([drop_add_residual(x, branch, p) for _ in range(n)])
    z = (draws.mean(0) - (x + branch(x))) / (draws.std(0) / n ** 0.5 + 1e-12)
    assert z.abs().max() < 5, z.abs().max()

    block = Block(16, 2, drop_path=p, efficient_drop_path=True).train()
    plain = Block(16, 2, drop_path=p).train()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(10, 10, 16)
    with torch.no_grad():
        a, b = torch.stack([block(x) for _ in range(n)]), torch.stack([plain(x) for _ in range(n)])
    z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / n).sqrt()
    assert z.abs().max() < 5, z.abs().max()
    assert not torch.allclose(a.mean(0), block.eval()(x), atol=1e-2)  # the test can see a difference


def test_efficient_drop_path_equals_plain_on_the_kept_samples():
    """Same kept samples: same output and same gradients as x + mask·branch(x)/(1−p), with the
    branches run on the kept samples only (p = 0.4, 6 of 10 samples)."""
    torch.manual_seed(0)
    block = Block(16, 2, drop_path=0.4, efficient_drop_path=True).train()
    seen = []
    block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = torch.randn(10, 5, 16, requires_grad=True)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)   # the same draws: each residual keeps randperm(10)[:6]
    masks = [torch.zeros(10, 1, 1).index_fill_(0, torch.randperm(10)[:6], 1.0) for _ in range(2)]
    assert seen == [6]     # the FFN saw the 6 kept samples only
    xr = x.detach().clone().requires_grad_(True)
    h = xr + masks[0] * block.ls1(block.attn(block.norm1(xr))) / 0.6
    ref = h + masks[1] * block.ls2(block.mlp(block.norm2(h))) / 0.6
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *block.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [xr, *block.parameters()], g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    # below a rate of 0.1 the official block keeps the plain path
    assert not Block(16, 2, drop_path=0.1, efficient_drop_path=True).efficient_drop_path


def test_official_init():
    torch.manual_seed(0)
    m = build_vit("vit_small", 16, img_size=224)
    w = m.blocks[0].mlp.fc1.weight
    # trunc_normal_(std=0.02) with the official (and PyTorch's) bounds a=-2, b=2: absolute, not ±2σ
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert torch.all(m.blocks[0].mlp.fc1.bias == 0)
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002
    dpr = [blk.drop_path.p for blk in build_vit("vit_tiny", 16, drop_path_rate=0.1).blocks]
    assert dpr[0] == 0 and abs(dpr[-1] - 0.1) < 1e-7 and dpr == sorted(dpr)
