"""The coding rate of MCR² (Yu et al. 2020, arXiv 2006.08558), SimDINO's expansion term
(Wu et al. 2025, arXiv 2502.10385), batched over views, with an analytic backward.

    coding_rate(Z, eps, reduce_cov=False, n_global=None)     Z: (..., n, d) -> R: (...)
    R(Z) = ½·logdet(I_d + α·ZᵀZ),   α = d / (n_global·eps),   n_global = n·world_size by default

Z holds n feature vectors of width d (one view of the batch); the leading dims are views.
`eps` is the official code's `--eps` (SimDINO 0.5, SimDINOv2 0.05). It stands where the paper
writes ε² (R = ½·logdet(I + d/(nε²)·ZᵀZ)): `eps` = ε², not ε.

Computation. M = I + α·G with G the Gram matrix is positive definite for any finite Z (even Z of
rank 1), so its Cholesky factor M = L·Lᵀ exists and ½·logdet M = Σ log diag L. With n < d,
Sylvester's identity det(I_d + α·ZᵀZ) = det(I_n + α·Z·Zᵀ) gives R from the smaller n×n matrix
(not with reduce_cov: n×n Grams of different rows cannot be summed). Backward, from
d(½·logdet M) = ½·tr(M⁻¹·dM), one `cholesky_solve` against the saved L:

    d×d side   dR/dZ = α·Z·(I_d + α·ZᵀZ)⁻¹        n×n side   dR/dZ = α·(I_n + α·Z·Zᵀ)⁻¹·Z

Everything runs in fp32 (fp64 stays fp64) with autocast off: logdet in bf16 is noise. Batched
`torch.logdet` (LU) is avoided on purpose: on CPU in this torch build it goes wrong after
`torch.set_num_threads` (MKL SLASWP errors). A NaN/inf in Z raises ValueError instead of
returning NaN, for one host sync per call (`cholesky_ex`; R and the factorization status are
tested together, as `torch.linalg.cholesky` would sync on GPU anyway).

Global batch under DDP (`reduce_cov=True`, the official `--reduce_cov 1`). The d×d Gram matrices
are summed over ranks, so every rank returns the same R of the global batch of n·world_size
rows. As the official code's differentiable `torch.distributed.nn.all_reduce`, the backward sums
the incoming gradients over ranks. So on rank r

    value  R(Z_global)        gradient  (Σ_s g_s)·∂R/∂Z_r,   g_s = dloss_s/dR on rank s,

the gradient of the sum of all ranks' losses. DDP then averages over ranks: every rank's loss
holds the same γ·R(Z_global), so the parameter gradients equal those of one process computing
mean-over-ranks(local terms) + γ·R(Z_global) on the concatenated batch. Without a process group
the reduce is a no-op. All ranks must call it with the same V, d (and, for α, the same n).

    python -m kernels.coding_rate      # benchmark: ours vs autograd through torch.logdet
"""
import torch

from kernels import distributed as dist


class _CodingRate(torch.autograd.Function):
    """R = ½·logdet(I + α·G) by Cholesky; the backward is one Cholesky solve."""

    @staticmethod
    def forward(ctx, Z, alpha, reduce_cov):
        n, d = Z.shape[-2:]
        n_side = n < d and not reduce_cov                # Sylvester: the n×n side is smaller
        G = Z @ Z.mT if n_side else Z.mT @ Z             # (..., n, n) or (..., d, d)
        if reduce_cov:
            dist.all_reduce_sum(G)                       # Gram of the global batch
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(eye + alpha * G)
        R = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)   # R = ½·logdet M = Σ log Lᵢᵢ, M = L·Lᵀ
        # NaN where the factorisation failed (non-finite input, here or on another rank, or an
        # overflow in ZᵀZ): checked on the device, the loop's non-finite guard stops the run
        R = torch.where(info == 0, R, torch.nan)
        ctx.save_for_backward(Z, L)
        ctx.alpha, ctx.n_side, ctx.reduce_cov = alpha, n_side, reduce_cov
        return R

    @staticmethod
    @torch.autograd.function.once_differentiable        # no double backward (L does not track Z)
    def backward(ctx, g):
        Z, L = ctx.saved_tensors
        with torch.autocast(Z.device.type, enabled=False):
            if ctx.reduce_cov:                           # backward of the all-reduce: sum over ranks
                g = dist.all_reduce_sum(g.clone(memory_format=torch.contiguous_format))
            if ctx.n_side:
                dZ = torch.cholesky_solve(Z, L)          # M⁻¹·Z, M = I_n + α·Z·Zᵀ
            else:
                dZ = torch.cholesky_solve(Z.mT, L).mT    # Z·M⁻¹ (M symmetric), M = I_d + α·ZᵀZ
            return ctx.alpha * g[..., None, None] * dZ, None, None


def coding_rate(Z, eps, reduce_cov=False, n_global=None):
    """R = ½·logdet(I_d + α·ZᵀZ) per leading index of Z (..., n, d), α = d/(n_global·eps).

    n_global defaults to the global batch n·world_size, with or without reduce_cov, as the
    official code (its α counts all ranks' rows even when the Gram matrix is the local one).
    Returns fp32 (fp64 for fp64 input), even under autocast."""
    n, d = Z.shape[-2:]
    if n_global is None:
        n_global = n * dist.world_size()
    alpha = d / (n_global * eps)
    with torch.autocast(Z.device.type, enabled=False):
        Z = Z if Z.dtype == torch.float64 else Z.float()
        return _CodingRate.apply(Z, alpha, bool(reduce_cov))


def coding_rate_reference(Z, eps):
    """The textbook expression, autograd through torch.logdet, one matrix at a time (one process)."""
    n, d = Z.shape[-2:]
    alpha = d / (n * eps)
    eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    R = [0.5 * torch.logdet(eye + alpha * z.mT @ z) for z in Z.reshape(-1, n, d)]
    return torch.stack(R).reshape(Z.shape[:-2])


if __name__ == "__main__":
    import time

    def median_ms(fn, Z, reps=20):
        times, sync = [], torch.cuda.synchronize if Z.is_cuda else (lambda: None)
        for _ in range(reps + 2):                        # the first two are warm-up
            Zi = Z.detach().requires_grad_()
            sync()
            t = time.perf_counter()
            fn(Zi, 0.5).sum().backward()
            sync()
            times.append(time.perf_counter() - t)
        return 1e3 * sorted(times[2:])[reps // 2]

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    V, d = 2, 256
    print(f"forward+backward, fp32, V={V} views, d={d}, median ms, {torch.get_num_threads()} CPU threads "
          "(on a busy machine OMP_NUM_THREADS=1 gives steadier numbers)")
    print(f"{'device':>6} {'n':>5} {'side':>5} {'ours':>9} {'logdet ref':>11} {'speed-up':>9} {'max |ΔR|':>9}")
    for device in devices:
        for n in (64, 256, 1024):
            Z = torch.nn.functional.normalize(torch.randn(V, n, d, device=device), dim=-1)
            ours, ref = median_ms(coding_rate, Z), median_ms(coding_rate_reference, Z)
            err = (coding_rate(Z, 0.5) - coding_rate_reference(Z.double(), 0.5)).abs().max().item()
            print(f"{device:>6} {n:>5} {f'{min(n, d)}²':>5} {ours:9.2f} {ref:11.2f} {ref / ours:8.1f}x {err:9.1e}")
