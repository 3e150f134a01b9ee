"""Attention for every ViT block: softmax(Q·Kᵀ/√d)·V behind one function with selectable backends.

    attention(q, k, v, backend="sdpa")          q, k, v: (B, H, N, d) -> (B, H, N, d)
    attention_weights(q, k)                      -> (B, H, N, N), the softmax itself
    packed_attention(q, k, v, block_mask)        within each packed sequence (FlexAttention; --pack_crops)

Backends:
    sdpa    torch.nn.functional.scaled_dot_product_attention: PyTorch picks a fused kernel
            (FlashAttention-2, cuDNN or memory-efficient on GPU; a fused C++ kernel on CPU).
    triton  our FlashAttention-2 kernels below, forward and backward: "FlashAttention-2: Faster
            Attention with Better Parallelism and Work Partitioning", Dao 2023, arXiv 2307.08691.
            Head dims 16/32/64/128; fp32, fp16, bf16 (products accumulate in fp32).
    math    the textbook expression, written out; the reference the other backends are tested
            against, and the path that can also return the attention weights (attention maps).

The triton kernels, per (batch, head). S = Q·Kᵀ/√d is never stored: the N rows are cut into
blocks of B_r = BLOCK_M queries and B_c = BLOCK_N keys, and one program owns one block.

  Forward (the paper's Algorithm 1). A program holds a query block Qᵢ and walks over the key
  blocks Kⱼ, Vⱼ, keeping per row the running max m, the running sum ℓ of exp(S − m) and the
  unnormalised output Õ (the online softmax):
      Sᵢⱼ   = Qᵢ·Kⱼᵀ/√d
      m_new = max(m, rowmax(Sᵢⱼ))
      P̃ᵢⱼ   = exp(Sᵢⱼ − m_new)
      ℓ     = exp(m − m_new)·ℓ + rowsum(P̃ᵢⱼ)
      Õ     = exp(m − m_new)·Õ + P̃ᵢⱼ·Vⱼ
      m     = m_new
  then Oᵢ = Õ / ℓ (divided once, at the end: one of FA-2's changes over FA-1), and it saves only
  Lᵢ = m + log ℓ, each row's log-sum-exp, for the backward.

  Backward (Algorithm 2). Given dO, a preprocess computes D = rowsum(dO ∘ O); then blockwise
      Pᵢⱼ  = exp(Sᵢⱼ − Lᵢ)              P recomputed from Q, K and the saved L, never stored
      dVⱼ += Pᵢⱼᵀ·dOᵢ
      dPᵢⱼ = dOᵢ·Vⱼᵀ
      dSᵢⱼ = Pᵢⱼ ∘ (dPᵢⱼ − Dᵢ)          softmax backward; rowsum(P ∘ dP) = rowsum(dO ∘ O) = D
      dKⱼ += dSᵢⱼᵀ·Qᵢ/√d
      dQᵢ += dSᵢⱼ·Kⱼ/√d
  The paper loops over key blocks and adds into dQᵢ with atomics. Here one kernel owns a key block
  (dKⱼ, dVⱼ; loop over queries) and a second owns a query block (dQᵢ; loop over keys): no atomics,
  deterministic gradients, for the price of computing Sᵢⱼ and Pᵢⱼ a second time.

  Details that are not in the equations. Every exp is an exp2, the GPU's native instruction:
  exp(x) = 2^(x·log₂e), so S is scaled once by log₂e/√d and L is kept in base 2. ViT lengths
  (197, 37, with registers 201, ...) are never multiples of a block: keys past N get the score
  −∞ (P = 0), query rows past N are loaded as zeros and never stored. q, k, v may be strided views
  sharing one layout (vit.py's qkv reshape gives exactly that); O, dO, dQ, dK, dV are contiguous.

Triton runs on a CUDA GPU, or on the CPU under its interpreter (slow; the tests use it), which
Triton 3.x switches on while `@triton.jit` wraps a kernel: TRITON_INTERPRET=1 must be set before
this module is imported. Without Triton this module still imports; only backend="triton" raises.

    python kernels/attention.py      # benchmark: forward+backward time and TFLOP/s (needs a GPU)
"""
import functools
import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError as e:  # e.g. macOS or a CPU-only wheel: sdpa and math still work
    triton, _TRITON_IMPORT_ERROR = None, e
_INTERPRETED = False  # set below: were the kernels wrapped by Triton's CPU interpreter?

BACKENDS = ("sdpa", "triton", "math")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange), ≥ 16 (tl.dot)
LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------------------------
# Reference: the `math` backend

def attention_weights(q, k):
    """softmax(Q·Kᵀ/√d) over the keys: (B, H, N, d), (B, H, N, d) -> (B, H, N, N)."""
    scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def math_attention(q, k, v):
    """softmax(Q·Kᵀ/√d)·V with the (B, H, N, N) weights materialised: the reference."""
    return attention_weights(q, k) @ v


# ----------------------------------------------------------------------------------------------
# Triton kernels. Q, K, V share the strides (sb, sh, sn) over (B, H, N); d has stride 1.
# O, dO, dQ, dK, dV are contiguous (B, H, N, d); L and D are contiguous (B, H, N) in fp32.
# Each launch is a 1-D grid over (batch·head, block), the block index running fastest, so the
# programs of one head run side by side and share its K and V in the L2 cache.

if triton is not None:

    @triton.jit
    def _online_softmax_step(s, v, m, l, acc, PRECISION: tl.constexpr):
        """FA-2 Algorithm 1, the body of the loop over key blocks: folds one block of scores
        s = Sᵢⱼ·log₂e (B_r, B_c) and its values Vⱼ (B_c, d) into the running row max m (B_r,),
        row sum ℓ (B_r,) and unnormalised output Õ (B_r, d). Returns the new (m, ℓ, Õ)."""
        m_new = tl.maximum(m, tl.max(s, 1))  # m_new = max(m, rowmax(Sᵢⱼ))
        p = tl.exp2(s - m_new[:, None])  # P̃ᵢⱼ = exp(Sᵢⱼ − m_new)
        alpha = tl.exp2(m - m_new)  # exp(m − m_new): rescales what was summed so far
        l = alpha * l + tl.sum(p, 1)  # ℓ = exp(m − m_new)·ℓ + rowsum(P̃ᵢⱼ)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # Õ
        return m_new, l, acc

    @triton.jit
    def _program(sb, sh, H, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """The (batch·head bh, block index) this program owns, the offset of that (batch, head) in
        Q, K, V (strides sb, sh) and its offset in O, dO, dQ, dK, dV. int64: B·sb can pass 2³¹."""
        pid, num_blocks = tl.program_id(0), tl.cdiv(N, BLOCK)
        bh = pid // num_blocks
        qkv_off = (bh // H).to(tl.int64) * sb + (bh % H) * sh
        return bh, pid % num_blocks, qkv_off, bh.to(tl.int64) * N * HEAD_DIM

    @triton.jit
    def _load_rows(X, rows, stride, N, HEAD_DIM: tl.constexpr):
        """Rows `rows` of one head's (N, d) matrix X, `stride` apart -> (len(rows), d); rows past N read 0."""
        dims = tl.arange(0, HEAD_DIM)
        return tl.load(X + rows[:, None] * stride + dims[None, :], mask=rows[:, None] < N, other=0.0)

    @triton.jit
    def _store_rows(X, rows, x, N, HEAD_DIM: tl.constexpr):
        """x (len(rows), d) into rows `rows` of one head's contiguous (N, d) X, in X's dtype; rows past N are left."""
        dims = tl.arange(0, HEAD_DIM)
        tl.store(X + rows[:, None] * HEAD_DIM + dims[None, :], x.to(X.dtype.element_ty), mask=rows[:, None] < N)

    @triton.jit
    def _attn_fwd(Q, K, V, O, L, sb, sh, sn, H, N, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
        """Algorithm 1 for one query block Qᵢ of one (batch, head): writes Oᵢ and Lᵢ."""
        bh, i, qkv_off, out_off = _program(sb, sh, H, N, HEAD_DIM, BLOCK_M)  # i: the query block
        Q, K, V = Q + qkv_off, K + qkv_off, V + qkv_off  # this (batch, head)
        O, L = O + out_off, L + bh * N
        rows = i * BLOCK_M + tl.arange(0, BLOCK_M)  # the query rows of block i
        q = _load_rows(Q, rows, sn, N, HEAD_DIM)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (log₂ units)
        l = tl.zeros([BLOCK_M], tl.float32)  # running row sum ℓ of 2^(S − m)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # Õ
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)  # the key rows of block j = start / BLOCK_N
            k = _load_rows(K, keys, sn, N, HEAD_DIM)
            v = _load_rows(V, keys, sn, N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # Sᵢⱼ·log₂e
            s = tl.where(keys[None, :] < N, s, float("-inf"))  # keys past N do not exist
            m, l, acc = _online_softmax_step(s, v, m, l, acc, PRECISION)
        _store_rows(O, rows, acc / l[:, None], N, HEAD_DIM)  # Oᵢ = Õ / ℓ
        tl.store(L + rows, m + tl.log2(l), mask=rows < N)  # Lᵢ = m + log ℓ, in base 2

    @triton.jit
    def _attn_bwd_preprocess(O, dO, D, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """D = rowsum(dO ∘ O) for one query block: the row term of the softmax backward."""
        bh, i, _, out_off = _program(0, 0, 1, N, HEAD_DIM, BLOCK_M)  # no Q, K, V here: sb = sh = 0, H = 1
        rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
        o = _load_rows(O + out_off, rows, HEAD_DIM, N, HEAD_DIM).to(tl.float32)
        do = _load_rows(dO + out_off, rows, HEAD_DIM, N, HEAD_DIM).to(tl.float32)
        tl.store(D + bh * N + rows, tl.sum(o * do, 1), mask=rows < N)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, dO, L, D, dK, dV, sb, sh, sn, H, N, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
        """dKⱼ and dVⱼ for one key block: walks over the query blocks, recomputing Pᵢⱼ from L."""
        bh, j, qkv_off, out_off = _program(sb, sh, H, N, HEAD_DIM, BLOCK_N)  # j: the key block
        Q, K, V = Q + qkv_off, K + qkv_off, V + qkv_off
        dO, dK, dV, L, D = dO + out_off, dK + out_off, dV + out_off, L + bh * N, D + bh * N
        keys = j * BLOCK_N + tl.arange(0, BLOCK_N)  # the key rows of block j
        k = _load_rows(K, keys, sn, N, HEAD_DIM)
        v = _load_rows(V, keys, sn, N, HEAD_DIM)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)  # the query rows of block i = start / BLOCK_M
            q = _load_rows(Q, rows, sn, N, HEAD_DIM)
            do = _load_rows(dO, rows, HEAD_DIM, N, HEAD_DIM)
            lse = tl.load(L + rows, mask=rows < N, other=0.0)
            delta = tl.load(D + rows, mask=rows < N, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # Sᵢⱼ·log₂e
            p = tl.exp2(s - lse[:, None])  # Pᵢⱼ = exp(Sᵢⱼ − Lᵢ)
            # No masks needed: query rows past N were loaded as zeros (dOᵢ = 0, Dᵢ = 0: they add
            # nothing), and keys past N are this block's padding, whose dK, dV rows are not stored.
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # dVⱼ += Pᵢⱼᵀ·dOᵢ
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dPᵢⱼ = dOᵢ·Vⱼᵀ
            ds = p * (dp - delta[:, None])  # dSᵢⱼ = Pᵢⱼ ∘ (dPᵢⱼ − Dᵢ)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # dKⱼ += dSᵢⱼᵀ·Qᵢ
        _store_rows(dK, keys, dk * sm_scale, N, HEAD_DIM)  # the 1/√d of Sᵢⱼ = Qᵢ·Kⱼᵀ/√d
        _store_rows(dV, keys, dv, N, HEAD_DIM)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, dO, L, D, dQ, sb, sh, sn, H, N, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
        """dQᵢ for one query block: walks over the key blocks, recomputing Pᵢⱼ from L."""
        bh, i, qkv_off, out_off = _program(sb, sh, H, N, HEAD_DIM, BLOCK_M)  # i: the query block
        Q, K, V = Q + qkv_off, K + qkv_off, V + qkv_off
        dO, dQ, L, D = dO + out_off, dQ + out_off, L + bh * N, D + bh * N
        rows = i * BLOCK_M + tl.arange(0, BLOCK_M)  # the query rows of block i
        q = _load_rows(Q, rows, sn, N, HEAD_DIM)
        do = _load_rows(dO, rows, HEAD_DIM, N, HEAD_DIM)
        lse = tl.load(L + rows, mask=rows < N, other=0.0)
        delta = tl.load(D + rows, mask=rows < N, other=0.0)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)  # the key rows of block j = start / BLOCK_N
            k = _load_rows(K, keys, sn, N, HEAD_DIM)
            v = _load_rows(V, keys, sn, N, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # Sᵢⱼ·log₂e
            s = tl.where(keys[None, :] < N, s, float("-inf"))  # keys past N do not exist
            p = tl.exp2(s - lse[:, None])  # Pᵢⱼ = exp(Sᵢⱼ − Lᵢ)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dPᵢⱼ = dOᵢ·Vⱼᵀ
            ds = p * (dp - delta[:, None])  # dSᵢⱼ = Pᵢⱼ ∘ (dPᵢⱼ − Dᵢ)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQᵢ += dSᵢⱼ·Kⱼ
        _store_rows(dQ, rows, dq * sm_scale, N, HEAD_DIM)  # the 1/√d of Sᵢⱼ = Qᵢ·Kⱼᵀ/√d

    # Triton decides at `@triton.jit` time whether a kernel is compiled or interpreted.
    _INTERPRETED = not isinstance(_attn_fwd, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------
# autograd.Function: launches the kernels

def _launch_config(q):
    """Tile sizes and launch options: 64×64 tiles, or 32×32 when a row of Q is wider than 128
    bytes (fp32 at d ≥ 64, fp16/bf16 at d = 128), so that the backward kernels fit in 64 KiB of
    shared memory (a T4's; fp32 at d = 128 needs 68 KiB there); two pipeline stages."""
    block = 64 if q.shape[-1] * q.element_size() <= 128 else 32
    # fp32 dots in IEEE fp32 unless torch allows TF32 (torch.set_float32_matmul_precision);
    # None is Triton's default (TF32 on NVIDIA; fp16 and bf16 ignore the option).
    ieee = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(BLOCK_M=block, BLOCK_N=block, PRECISION="ieee" if ieee else None, num_warps=4, num_stages=2)


class FlashAttention(torch.autograd.Function):
    """O = softmax(Q·Kᵀ/√d)·V by the kernels above; saves Q, K, V, O and L for the backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, N, d = q.shape
        if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cfg = _launch_config(q)
        o = torch.empty(B, H, N, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)  # L, in log₂ units
        grid = (B * H * triton.cdiv(N, cfg["BLOCK_M"]),)
        _attn_fwd[grid](q, k, v, o, lse, *q.stride()[:3], H, N, d ** -0.5 * LOG2E, HEAD_DIM=d, **cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, N, d = q.shape
        cfg = _launch_config(q)
        do = do.contiguous()  # in vit.py dO arrives as a (B, N, H, d) tensor seen as (B, H, N, d)
        delta = torch.empty_like(lse)  # D = rowsum(dO ∘ O)
        dq, dk, dv = torch.empty_like(o), torch.empty_like(o), torch.empty_like(o)
        grid_m = (B * H * triton.cdiv(N, cfg["BLOCK_M"]),)
        grid_n = (B * H * triton.cdiv(N, cfg["BLOCK_N"]),)
        strides, scales = q.stride()[:3], (d ** -0.5 * LOG2E, d ** -0.5)
        _attn_bwd_preprocess[grid_m](o, do, delta, N, HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"])
        _attn_bwd_dkdv[grid_n](q, k, v, do, lse, delta, dk, dv, *strides, H, N, *scales, HEAD_DIM=d, **cfg)
        _attn_bwd_dq[grid_m](q, k, v, do, lse, delta, dq, *strides, H, N, *scales, HEAD_DIM=d, **cfg)
        return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Public op

def flash_attention(q, k, v):
    """The `triton` backend: (B, H, N, d) -> (B, H, N, d). Raises, never falls back."""
    if not (q.dim() == 4 and q.shape == k.shape == v.shape and q.device == k.device == v.device):
        raise ValueError("attention backend 'triton' needs q, k, v of one shape (B, H, N, d) on "
                         f"one device; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in TRITON_DTYPES:
        raise ValueError(f"attention backend 'triton' supports dtypes float32, float16 and "
                         f"bfloat16 (one for q, k, v); got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"attention backend 'triton' supports head dims "
                         f"{', '.join(map(str, TRITON_HEAD_DIMS))}; got head dim {q.shape[-1]}")
    if triton is None:
        raise RuntimeError(f"attention backend 'triton' needs the triton package, which cannot be "
                           f"imported here ({_TRITON_IMPORT_ERROR}); use backend 'sdpa'")
    if not q.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"attention backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1, "
                           f"set before kernels.attention is imported, for the slow CPU "
                           f"interpreter); the tensors are on {q.device}")
    if _INTERPRETED and q.dtype == torch.bfloat16:  # seen in Triton 3.8: numpy has no bfloat16
        raise RuntimeError("attention backend 'triton' cannot run bfloat16 under "
                           "TRITON_INTERPRET=1: the interpreter's tl.dot multiplies the raw bits; "
                           "use float32 or float16")
    return FlashAttention.apply(q, k, v)


def attention(q, k, v, backend="sdpa"):
    """Scaled dot-product attention, (B, H, N, d) -> (B, H, N, d)."""
    if backend == "sdpa" and q.device.type == "cpu" and q.dtype != torch.float32:
        # PyTorch's CPU flash kernel runs the bf16 backward 2-12x slower than the product written out,
        # whose matrix products are native bf16 (python benchmarks/attention_cpu.py): that one here
        return math_attention(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "triton":
        return flash_attention(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------------------------
# Packed sequences: FlexAttention with a block-diagonal mask (vit.py's forward_features_list)

COMPILE_FLEX_ON_CPU = False  # minutes of compiling on CPU (a C++ compiler, forward only): off; on GPU always


@functools.lru_cache(maxsize=16)
def block_diagonal_mask(lengths, device):
    """FlexAttention BlockMask of sequences of `lengths` tokens packed along the token axis (DINOv2
    §5, the official code's xFormers BlockDiagonalMask): query token q sees key token kv iff both
    are in one sequence; one mask for all rows and heads, made once per layout. -> (segments (T,),
    the sequence of each token; the BlockMask)."""
    from torch.nn.attention.flex_attention import create_block_mask  # torch >= 2.5
    segments = torch.cat([torch.full((n,), j, device=device) for j, n in enumerate(lengths)])  # no host copy
    T = len(segments)
    return segments, create_block_mask(lambda b, h, q, kv: segments[q] == segments[kv], None, None, T, T, device=device)


def packed_attention(q, k, v, block_mask):
    """Attention within each packed sequence, (B, H, T, d) -> (B, H, T, d): FlexAttention, compiled
    into one fused kernel off the CPU. FlexAttention has no CPU backward (torch 2.14 raises
    NotImplementedError), so a CPU forward that needs gradients runs SDPA with the block mask's
    mask_mod evaluated on every (q, kv) pair; without gradients the CPU runs FlexAttention (eager:
    unfused, or compiled with COMPILE_FLEX_ON_CPU)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        idx = torch.arange(q.shape[2], device=q.device)
        mask = block_mask.mask_mod(0, 0, idx[:, None], idx[None, :])  # (T, T), True: attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if q.device.type != "cpu" or COMPILE_FLEX_ON_CPU:
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex():
    """torch.compile(flex_attention), made once: compiling is what makes FlexAttention a fused kernel."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


# ----------------------------------------------------------------------------------------------
# Benchmark: python kernels/attention.py

BENCH_SHAPES = [  # (name, B, H, N, d): DINO's crops, 128 images per GPU, bf16 as under autocast
    ("ViT-S/16 global 224²", 128, 6, 197, 64),
    ("ViT-S/16 local 96²", 128 * 10, 6, 37, 64),  # 10 local crops per image
    ("ViT-B/16 global 224²", 128, 12, 197, 64),
]


def _time_ms(fn, warmup=5, reps=20):
    """Median wall time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def benchmark(dtype=torch.bfloat16):
    """Checks each backend against `math`, then prints forward and forward+backward time and
    TFLOP/s. FLOPs: forward 4·B·H·N²·d (Q·Kᵀ and P·V), backward 2.5× that (the FA-2 paper's count)."""
    print(f"{torch.cuda.get_device_name()}, {dtype}; q, k, v are strided views of one qkv tensor")
    print(f"{'shape':22} {'backend':7} {'max|err|':>9} {'fwd ms':>8} {'fwd+bwd ms':>11} "
          f"{'TFLOP/s':>8}")
    for name, B, H, N, d in BENCH_SHAPES:
        qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype, requires_grad=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d), as in vit.py
        do = torch.randn(B, H, N, d, device="cuda", dtype=dtype)
        ref = math_attention(q.float(), k.float(), v.float())
        flops = 4 * B * H * N * N * d * 3.5
        for backend in BACKENDS:
            err = (attention(q, k, v, backend).float() - ref).abs().max().item()
            fwd = _time_ms(lambda: attention(q, k, v, backend))
            both = _time_ms(lambda: torch.autograd.grad(attention(q, k, v, backend), qkv, do))
            tflops = flops / both / 1e9  # FLOP per ms -> TFLOP/s
            print(f"{name:22} {backend:7} {err:9.1e} {fwd:8.3f} {both:11.3f} {tflops:8.1f}")


if __name__ == "__main__":
    if torch.cuda.is_available():
        benchmark()
    else:
        print("the attention benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
