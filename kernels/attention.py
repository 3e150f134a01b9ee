"""Attention for every ViT block: softmax(Q·Kᵀ/√d)·V behind one function with selectable backends.

    attention(q, k, v, backend="sdpa")          q, k, v: (B, H, N, d) -> (B, H, N, d)
    attention_weights(q, k)                      -> (B, H, N, N), the softmax itself

Backends:
    sdpa  torch.nn.functional.scaled_dot_product_attention: PyTorch picks a fused kernel
          (FlashAttention-2, cuDNN or memory-efficient on GPU; a fused C++ kernel on CPU).
    math  the textbook expression, written out; the reference the other backends are tested
          against, and the path that can also return the attention weights (attention maps).
"""
import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")


def attention_weights(q, k):
    """softmax(Q·Kᵀ/√d) over the keys: (B, H, N, d), (B, H, N, d) -> (B, H, N, N)."""
    scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def attention(q, k, v, backend="sdpa"):
    """Scaled dot-product attention, (B, H, N, d) -> (B, H, N, d)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_weights(q, k) @ v
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
