"""Vision Transformer (Dosovitskiy et al. 2020, arXiv 2010.11929) as DINO and DINOv2 use it.

One backbone for all four methods: patch embedding, a CLS token, optional register tokens
(Darcet et al. 2023, arXiv 2309.16588), a learned position embedding interpolated (bicubic) to any
input size so 224-pixel global and 96-pixel local crops share one model, pre-norm blocks with
stochastic depth (DINO's per-sample mask, or DINOv2's efficient version that runs the branches on
the kept samples only) and optional LayerScale, and a final LayerNorm. Initialisation follows the
official DINO `vision_transformer.py`.

Letters used in shape comments: B batch, N patch tokens, T all tokens (1 + R + N), R registers,
D width, H heads, d head width (D / H), P patch size.

    model = build_vit("vit_small", patch_size=16)
    out = model.forward_features(images)   # dict of normalised CLS / register / patch tokens
    outs = model.forward_features_list([g, l], [masks, None])   # one dict per crop size (packed: pack_crops)
    cls = model(images)                     # (B, D) normalised CLS token
    attn = model.get_last_selfattention(images)   # (B, H, T, T) last block's attention
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention, attention_weights, block_diagonal_mask, packed_attention

# name: (width D, depth, heads H). tiny/small/base from DINO, large from DINOv2; the two
# smallest are ours, sized for the CPU default runs on the 32x32 synthetic data.
ARCHS = {
    "vit_pico": (96, 4, 3),
    "vit_nano": (128, 6, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),  # DINOv2's ViT-g/14: use with --ffn_layer swiglufused (its default there)
}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, rescale the kept."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x, segments=None):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if segments is None:
            mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)  # (B, 1, 1)
        else:  # packed crops: draw j (j < T) is crop j's, spread over its tokens
            mask = x.new_empty(x.shape[:2]).bernoulli_(keep)[:, segments, None]  # (B, T, 1)
        return x * mask / keep


def drop_add_residual(x, branch, p):
    """x + branch(x) with stochastic depth, the branch computed only for the kept samples (DINOv2's
    drop_add_residual_stochastic_depth): a random subset of k = max(⌊B(1−p)⌋, 1) of the B samples
    goes through the branch and gets its output scaled by B/k; the others skip it. Each sample is
    kept with probability k/B, so the expected output is x + branch(x), as with DropPath, and the
    branch costs k/B of the plain version's compute (0.6 at p = 0.4)."""
    B = x.shape[0]
    k = max(int(B * (1.0 - p)), 1)
    keep = torch.randperm(B, device=x.device)[:k]
    return torch.index_add(x, 0, keep, branch(x[keep]).to(x.dtype), alpha=B / k)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, each linearly projected to D (one strided convolution);
    named `proj` inside `patch_embed` as in the official DINO and DINOv2 code, so that state dicts
    share one key layout."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, backend="sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)

    def forward(self, x, block_mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv_heads(x)
        # (B, H, T, d); packed crops (a block mask): FlexAttention whatever the backend
        x = attention(q, k, v, backend=self.backend) if block_mask is None else packed_attention(q, k, v, block_mask)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's SwiGLU FFN (Shazeer 2020): w3(SiLU(x·W1) ⊙ x·W2), W1 and W2 as one Linear `w12`;
    hidden width 2/3 of the MLP's, rounded up to a multiple of 8 (official SwiGLUFFNFused)."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """DINOv2 / CaiT: a learned per-channel gain on each residual branch, initialised small."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + γ₁·Attn(LN(x)), then x + γ₂·FFN(LN(x)), each with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 layerscale=None, attn_backend="sdpa", ffn=None, efficient_drop_path=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn if ffn is not None else Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = DropPath(drop_path)
        # DINOv2: above a rate of 0.1 the branches run on the kept samples only (below, the
        # gather and scatter cost more than they save, as the official Block says)
        self.efficient_drop_path = efficient_drop_path and drop_path > 0.1

    def forward(self, x, block_mask=None, segments=None):
        """x (B, T, D); packed crops (forward_features_list): the crops' block-diagonal mask and
        the crop of each token, segments (T,). Packed, stochastic depth is DropPath's per crop."""
        attn = lambda x: self.ls1(self.attn(self.norm1(x), block_mask))
        ffn = lambda x: self.ls2(self.mlp(self.norm2(x)))
        if self.training and self.efficient_drop_path and segments is None:
            x = drop_add_residual(x, attn, self.drop_path.p)
            return drop_add_residual(x, ffn, self.drop_path.p)
        x = x + self.drop_path(attn(x), segments)
        return x + self.drop_path(ffn(x), segments)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 num_register_tokens=0, layerscale=None, use_mask_token=False, attn_backend="sdpa",
                 ffn_layer="mlp", drop_path_uniform=False, interpolate_offset=0.1, interpolate_antialias=False,
                 efficient_drop_path=False, cls_token_std=0.02, pack_crops=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.num_register_tokens = num_register_tokens
        self.pack_crops = pack_crops  # forward_features_list: all crop sizes in one pass (DINOv2 §5)
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # CLS + patches
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        # replaces masked patches (iBOT); only created when used, so DDP sees no unused parameter
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        # drop path rate per block: DINOv2's the same in every block, DINO's linearly increasing with depth
        dpr = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth).tolist()
        if ffn_layer not in ("mlp", "swiglufused"):
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose mlp or swiglufused")
        ffn = lambda: SwiGLU(embed_dim, int(embed_dim * mlp_ratio)) if ffn_layer == "swiglufused" else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], layerscale, attn_backend, ffn(),
                  efficient_drop_path)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights(cls_token_std)

    def init_weights(self, cls_token_std=0.02):
        """Official DINO init: truncated normal (std 0.02) for Linear weights, position embedding
        and CLS token; zero biases; LayerNorm 1 / 0; patch-embedding conv left at PyTorch's default.
        DINOv2's CLS token (cls_token_std 1e-6) and registers: normal, std 1e-6; the mask token
        starts at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=cls_token_std)   # at 1e-6 the cut at ±2 is DINOv2's normal
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_encoding(self, h, w):
        """Position embedding for an h x w patch grid: the learned grid resized bicubically.
        As the official code, `interpolate_offset` (0.1) is added to the target size inside the
        scale factor so that floating-point error cannot round the output grid down
        (facebookresearch/dino issue 8); 0 asks for the output size directly. DINOv2's options:
        `interpolate_offset` and `interpolate_antialias` (both as its defaults: 0.1, off)."""
        pos = self.pos_embed
        side = int(math.sqrt(pos.shape[1] - 1))  # the learned grid: side x side patches
        if h == side and w == side:
            return pos
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        off = self.interpolate_offset
        size = dict(scale_factor=((h + off) / side, (w + off) / side)) if off else dict(size=(h, w))
        # float32, as DINOv2; DINO interpolates in the parameters' dtype, which is float32 too (its
        # fp16 is autocast, which leaves interpolate alone): the same numbers for both
        patch_pos = F.interpolate(patch_pos.float(), mode="bicubic", antialias=self.interpolate_antialias, **size)
        assert patch_pos.shape[-2:] == (h, w)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1)  # (1, 1 + N, D)

    def prepare_tokens(self, x, masks=None):
        """Images (B, C, H, W) -> tokens (B, T, D): [CLS, registers, patches] + position.
        masks: optional (B, N) bool, True where a patch is replaced by the mask token (iBOT)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.register_tokens is not None:  # registers carry no position (DINOv2)
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x, masks=None):
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.outputs(self.norm(x), masks)

    def forward_features_list(self, xs, masks_list=None):
        """forward_features of each crop group (xs: e.g. the global crops (2B, 3, 224, 224), then
        the local ones (8B, 3, 96, 96)) -> one dict per group. With pack_crops, DINOv2 §5's
        sequence packing: the groups' tokens run through the blocks as one sequence per row, G rows
        (G = gcd of the group sizes), each holding R_i/G crops of group i, under a block-diagonal
        mask (no crop sees another); the same outputs as one forward per group, in one pass."""
        masks_list = masks_list or [None] * len(xs)
        if not self.pack_crops or len(xs) == 1:
            return [self.forward_features(x, m) for x, m in zip(xs, masks_list)]
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks_list)]  # (R_i, T_i, D) each
        G = math.gcd(*(len(t) for t in tokens))
        lengths = tuple(t.shape[1] for t in tokens for _ in range(len(t) // G))  # the crops of one row
        segments, block_mask = block_diagonal_mask(lengths, tokens[0].device)
        x = torch.cat([t.reshape(G, -1, t.shape[-1]) for t in tokens], dim=1)  # (G, Σ T_i·R_i/G, D)
        for blk in self.blocks:
            x = blk(x, block_mask, segments)
        parts = self.norm(x).split([t.shape[1] * (len(t) // G) for t in tokens], dim=1)
        return [self.outputs(p.reshape(t.shape), m) for p, t, m in zip(parts, tokens, masks_list)]

    def outputs(self, x, masks):
        """Normalised tokens (B, T, D) -> forward_features' dict."""
        R = self.num_register_tokens
        return {"x_norm_clstoken": x[:, 0],            # (B, D)
                "x_norm_regtokens": x[:, 1:1 + R],     # (B, R, D)
                "x_norm_patchtokens": x[:, 1 + R:],    # (B, N, D)
                "masks": masks}

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x, n=1):
        """Normalised outputs of the last n blocks, each (B, T, D) (linear probe: last 4 CLS)."""
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """The last block's attention weights (B, H, T, T), computed on the explicit `math` path."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        q, k, _ = last.attn.qkv_heads(last.norm1(x))
        return attention_weights(q, k)


def build_vit(arch, patch_size=16, img_size=224, **kwargs):
    """`arch` is one of ARCHS; kwargs go to VisionTransformer (drop_path_rate, registers, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    embed_dim, depth, num_heads = ARCHS[arch]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, **kwargs)
