"""kernels/coding_rate.py against its reference: value and gradient vs autograd through
torch.logdet, the Sylvester (n×n) path vs the d×d path, views batched vs looped, fp32 under
bf16 autocast, rank-1 and non-finite inputs, and global-batch semantics under torchrun (Gloo)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.coding_rate import coding_rate, coding_rate_reference
from host_syncs import HostSyncs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(2, 8, 16), (2, 24, 8), (3, 12, 12), (2, 3, 6, 10), (7, 5)],
                         ids=["n<d", "n>d", "n==d", "extra-leading-dims", "no-view-dim"])
def test_value_and_gradient_match_logdet_reference(shape):
    Z = randn(*shape).requires_grad_()
    w = randn(*shape[:-2], seed=1)                       # a different weight per view
    R, R_ref = coding_rate(Z, 0.5), coding_rate_reference(Z, 0.5)
    assert R.shape == shape[:-2] and R.dtype == torch.float64
    torch.testing.assert_close(R, R_ref, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad((w * R).sum(), Z)
    g_ref, = torch.autograd.grad((w * R_ref).sum(), Z)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 5, 3)], ids=["n×n-side", "d×d-side"])
def test_gradcheck_analytic_backward(shape):
    Z = randn(*shape).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: coding_rate(z, 0.3), (Z,))


def test_sylvester_side_equals_d_side():
    """n < d takes the n×n side; reduce_cov=True without a process group takes the d×d side."""
    Z = randn(2, 6, 20).requires_grad_()
    R_n, R_d = coding_rate(Z, 0.05), coding_rate(Z, 0.05, reduce_cov=True)
    torch.testing.assert_close(R_n, R_d, rtol=1e-12, atol=0)
    g_n, = torch.autograd.grad(R_n.sum(), Z)
    g_d, = torch.autograd.grad(R_d.sum(), Z)
    torch.testing.assert_close(g_n, g_d, rtol=1e-10, atol=1e-13)


def test_n_global_sets_alpha():
    """The official code's α = d/(n·world_size·eps) with a local Gram (reduce_cov 0 under DDP)."""
    Z = randn(2, 10, 6)
    eye = torch.eye(6, dtype=Z.dtype)
    expected = torch.stack([0.5 * torch.logdet(eye + 6 / (4 * 10 * 0.5) * z.mT @ z) for z in Z])
    torch.testing.assert_close(coding_rate(Z, 0.5, n_global=4 * 10), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(4, 32, 16), (4, 8, 16)], ids=["d×d-side", "n×n-side"])
def test_batched_views_equal_a_loop_over_views(shape):
    Z = randn(*shape, dtype=torch.float32).requires_grad_()
    R = coding_rate(Z, 0.5)
    R_loop = torch.stack([coding_rate(z, 0.5) for z in Z])
    torch.testing.assert_close(R, R_loop)
    g, = torch.autograd.grad(R.sum(), Z)
    g_loop, = torch.autograd.grad(R_loop.sum(), Z)
    torch.testing.assert_close(g, g_loop)


def test_fp32_under_bf16_autocast():
    lin = torch.nn.Linear(16, 32)
    x = randn(2, 48, 16, dtype=torch.float32)
    Z32 = torch.nn.functional.normalize(lin(x), dim=-1)
    R32 = coding_rate(Z32, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        R = coding_rate(Z32, 0.05)                       # fp32 in: must not be cast to bf16
        Z16 = lin(x)                                     # bf16 from autocast
        R16 = coding_rate(torch.nn.functional.normalize(Z16, dim=-1), 0.05)
    assert Z16.dtype == torch.bfloat16 and R.dtype == R16.dtype == torch.float32
    torch.testing.assert_close(R, R32, rtol=1e-6, atol=0)   # bf16 Gram would be off by ~1e-3
    torch.testing.assert_close(R16, R32, rtol=2e-2, atol=0)  # only the bf16 input rounding
    R16.sum().backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n,d", [(32, 16), (8, 16)], ids=["d×d-side", "n×n-side"])
def test_rank_one_input_is_finite(n, d):
    row = torch.nn.functional.normalize(randn(d, dtype=torch.float32), dim=0)
    Z = row.expand(2, n, d).clone().requires_grad_()     # every row equal: ZᵀZ has rank 1
    R = coding_rate(Z, 0.05)
    R.sum().backward()
    assert torch.isfinite(R).all() and torch.isfinite(Z.grad).all()
    # rank 1: R = ½·log(1 + α·n·|row|²) = ½·log(1 + d/eps)
    torch.testing.assert_close(R, torch.full((2,), 0.5 * torch.log(torch.tensor(1 + d / 0.05)).item()))
    Zr = Z.detach().double().requires_grad_()
    coding_rate_reference(Zr, 0.05).sum().backward()
    torch.testing.assert_close(Z.grad, Zr.grad.float(), rtol=1e-4, atol=1e-6)
    Z0 = torch.zeros(2, n, d, requires_grad=True)        # all zeros: R = 0, gradient 0
    coding_rate(Z0, 0.05).sum().backward()
    assert Z0.grad.abs().max() == 0


def test_never_calls_lu_logdet(monkeypatch):
    """Batched CPU torch.logdet (LU) hangs or errs after set_num_threads in this torch build
    (MKL SLASWP errors): the op must use Cholesky only, forward and backward."""
    def forbidden(*args, **kwargs):
        raise AssertionError("coding_rate called an LU determinant")
    for name in ("logdet", "det", "slogdet"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.linalg, name, forbidden, raising=False)
    for shape in [(2, 8, 16), (2, 16, 8)]:
        Z = randn(*shape).requires_grad_()
        coding_rate(Z, 0.5).sum().backward()
        assert torch.isfinite(Z.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("n", [4, 40])
def test_non_finite_input_gives_nan_without_a_host_sync(bad, n):
    """A non-finite view gets R = NaN (never a finite number: the loop's guard stops on it), the
    other views their values; nothing is read on the host (no .item() / bool() of a tensor)."""
    Z = randn(2, n, 16)
    Z[1, 2, 3] = bad
    with HostSyncs() as syncs:
        R = coding_rate(Z, 0.5)
    assert torch.isnan(R[1]) and torch.isclose(R[0], coding_rate(Z[:1], 0.5)[0]), R
    assert syncs.calls == [], syncs.calls


DDP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
from kernels import distributed as dist
from kernels.coding_rate import coding_rate, coding_rate_reference

torch.set_num_threads(1)
dist.setup("cpu")
r, W = dist.rank(), dist.world_size()
assert W == 2
torch.manual_seed(0)                                     # the same batch and weights on every rank
V, n, k, d, eps = 2, 6, 5, 16, 0.05                      # n per rank < d: would take the n×n side
X = torch.randn(V, W * n, k, dtype=torch.float64)        # (V, W·n, k) the global batch
lin = torch.nn.Linear(k, d).double()
w = torch.tensor([1.0, 2.5], dtype=torch.float64)        # a different weight per view
mine = slice(r * n, (r + 1) * n)

# 1. the op itself: value of the global batch; gradient wrt local Z = (Σ_s g_s)·∂R/∂Z_r
Zg = torch.randn(V, W * n, d, dtype=torch.float64, requires_grad=True)
R_full = coding_rate_reference(Zg, eps)                  # one process, concatenated batch
g_full, = torch.autograd.grad((w * R_full).sum(), Zg)
Z = Zg.detach()[:, mine].clone().requires_grad_()
R = coding_rate(Z, eps, reduce_cov=True)
torch.testing.assert_close(R, R_full.detach(), rtol=1e-12, atol=0)
((r + 1) * w * R).sum().backward()                       # rank r weights its loss by r + 1
g = dist.all_gather_cat(Z.grad.transpose(0, 1).contiguous()).transpose(0, 1)   # (V, W·n, d)
torch.testing.assert_close(g, sum(range(1, W + 1)) * g_full, rtol=1e-10, atol=1e-14)

# 2. under DDP: averaged parameter gradients == one process on the concatenated batch
def loss_fn(model, x, reduce_cov):
    Z = torch.nn.functional.normalize(model(x), dim=-1)          # (V, n, d)
    align = Z.sum(-1).pow(2).mean()                              # a per-sample term (mean)
    R = coding_rate(Z, eps, reduce_cov=reduce_cov, n_global=W * n)  # the reference is one process
    return align - (w * R).mean()

ref = torch.nn.Linear(k, d).double()
ref.load_state_dict(lin.state_dict())
loss_ref = loss_fn(ref, X, False)
loss_ref.backward()
ddp = dist.wrap_ddp(lin, torch.device("cpu"))
loss = loss_fn(ddp, X[:, mine], True)
loss.backward()
for (name, p), q in zip(lin.named_parameters(), ref.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)
dist.print0("OK", loss_ref.item())
del ddp                                                  # DDP holds the process group: drop it first,
dist.cleanup()                                           # or Gloo may abort at interpreter exit
"""


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_reduce_cov_under_torchrun_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = tmp_path / "ddp_coding_rate.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=ROOT)))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-2000:], r.stderr[-12000:])
