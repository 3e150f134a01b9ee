"""kernels/attention.py: the `triton` and `sdpa` backends against the `math` reference, for the
output and for dQ, dK, dV, and the errors the `triton` backend raises instead of falling back.

Accuracy criterion (as in the FlashAttention repository's tests): with float64 `math` as the
truth, a backend's error in a dtype is at most twice the error of `math` itself run in that dtype,
plus a small floor. A wrong mask, scale or rescaling gives errors of order 1.

Triton 3.x decides when `@triton.jit` wraps a kernel, i.e. when kernels.attention is imported,
whether the kernel is compiled for a GPU or run by its CPU interpreter (TRITON_INTERPRET=1).
Other test modules import kernels.attention (through vit.py) without that variable, and this
pytest process should stay as it is for them, so the interpreted comparisons run in one
subprocess that imports this file with TRITON_INTERPRET=1 and prints its errors as JSON
(`interpreter_results`, about 10 s on 2 CPU cores). With a CUDA GPU the same comparisons also run
compiled, in fp32, fp16 and bf16.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import kernels.attention as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}  # on max|x − ref| / max|ref|

# name: (B, H, N, d, dtype, strided, shift). The kernels' tiles are 64 rows, or 32 when a row is
# wider than 128 bytes (fp32 at d ≥ 64): N = 5, 17, and 37 in fp16, fill one block partly; the
# others span several blocks, the last one partial.
INTERPRETER_CASES = {
    "N5-d16-fp32": (1, 2, 5, 16, "float32", True),
    "N17-d32-fp32": (2, 3, 17, 32, "float32", True),  # vit_pico, patch 8 on 32²
    "N37-d64-fp32-contiguous": (2, 2, 37, 64, "float32", False),  # a ViT/16 local crop: 2 blocks
    "N97-d32-fp32": (1, 2, 97, 32, "float32", True),  # online softmax across 2 key blocks
    "N197-d64-fp32": (1, 1, 197, 64, "float32", True),  # a ViT/16 global crop: 7 blocks
    "N65-d128-fp32": (1, 1, 65, 128, "float32", True),  # 32-row tiles: 3 blocks
    "N37-d64-fp16": (1, 2, 37, 64, "float16", True),
    "N97-d32-fp16": (1, 2, 97, 32, "float16", True),
    "N17-d16-fp32-scores-near-minus-100": (1, 2, 17, 16, "float32", True, 20.0),
    "N37-d32-fp32-scores-near-minus-100": (1, 2, 37, 32, "float32", False, 24.0),
}


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def backend_errors(backend, B, H, N, d, dtype, strided=True, shift=0.0, device="cpu"):
    """Relative errors of `backend` against float64 `math`, for O and for dQ, dK, dV.
    shift > 0 moves q and k apart along one axis: every score ≈ −shift²/√d, so exp(S) underflows
    and padding keys (score 0) would get P = exp(0 − L) = ∞ unless they are masked."""
    g = torch.Generator().manual_seed(N * d + B)
    dtype = getattr(torch, dtype)
    if strided:  # q, k, v as vit.py makes them: three views of one qkv tensor; dO strided too
        qkv = torch.randn(B, N, 3, H, d, generator=g)
        qkv[:, :, 0, :, 0] += shift
        qkv[:, :, 1, :, 0] -= shift
        qkv = qkv.to(device, dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        do = torch.randn(B, N, H, d, generator=g).to(device, dtype).transpose(1, 2)
    else:
        q, k, v, do = torch.randn(4, B, H, N, d, generator=g).unbind(0)
        q[..., 0] += shift
        k[..., 0] -= shift
        q, k, v, do = (t.to(device, dtype) for t in (q, k, v, do))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = A.attention(q, k, v, backend)
    grads = torch.autograd.grad(out, (q, k, v), do)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = A.math_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    return {name: rel_err(x, r) for name, x, r in
            zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}


def assert_as_accurate_as_math(errors, math_errors, dtype):
    bad = {name: (e, math_errors[name]) for name, e in errors.items()
           if not e <= 2 * math_errors[name] + FLOOR[dtype]}
    assert not bad, f"(error, error of math in {dtype}): {bad}"


def vit_errors(device):
    """One vit_pico with 2 registers (T = 19 tokens, d = 32), its attention switched per block:
    sdpa and triton against math, for the output and the gradient w.r.t. the image."""
    from vit import build_vit
    torch.manual_seed(0)
    model = build_vit("vit_pico", patch_size=8, img_size=32, num_register_tokens=2)
    model = model.to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    w = torch.randn(2, 96, device=device)  # loss Σ out·w (Σ out² is ≈ constant after LayerNorm)
    results = {}
    for backend in A.BACKENDS:
        for block in model.blocks:
            block.attn.backend = backend
        xb = x.clone().requires_grad_()
        out = model(xb)
        results[backend] = out, torch.autograd.grad((out * w).sum(), xb)[0]
    return {f"{b}-{what}": rel_err(results[b][i], results["math"][i])
            for b in ("sdpa", "triton") for i, what in enumerate(("out", "grad"))}


def interpreter_worker():
    """Runs in the subprocess, under TRITON_INTERPRET=1: every comparison, as one JSON dict."""
    res = {"interpreted": A._INTERPRETED,
           "triton": {name: backend_errors("triton", *c) for name, c in INTERPRETER_CASES.items()},
           "math": {name: backend_errors("math", *c) for name, c in INTERPRETER_CASES.items()}}
    calls, flash_attention = [], A.flash_attention
    A.flash_attention = lambda *a: calls.append(1) or flash_attention(*a)  # count the ViT's calls
    res["vit"], res["vit_triton_calls"] = vit_errors("cpu"), len(calls)
    q = torch.randn(1, 1, 5, 16, dtype=torch.bfloat16)
    try:
        A.attention(q, q, q, "triton")
        res["bf16_error"] = None
    except RuntimeError as e:
        res["bf16_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    code = "import json, test_attention as t; print(json.dumps(t.interpreter_worker()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_triton = pytest.mark.skipif(A.triton is None, reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_triton_interpreted_matches_math_out_and_grads(interpreter_results, name):
    assert interpreter_results["interpreted"]  # the kernels really ran in Triton's interpreter
    assert_as_accurate_as_math(interpreter_results["triton"][name],
                               interpreter_results["math"][name], INTERPRETER_CASES[name][4])


@needs_triton
def test_vit_forward_and_grad_same_for_all_backends(interpreter_results):
    assert interpreter_results["vit_triton_calls"] == 4  # vit_pico has 4 blocks
    errors = interpreter_results["vit"]
    assert all(e < 1e-5 for e in errors.values()), errors


@needs_triton
def test_triton_interpreter_refuses_bfloat16(interpreter_results):
    # Triton 3.8's interpreter multiplies bfloat16 as raw uint16 bits: an error, not garbage
    assert "bfloat16 under TRITON_INTERPRET=1" in interpreter_results["bf16_error"]


@pytest.mark.parametrize("strided", [True, False])
def test_sdpa_matches_math_out_and_grads(strided):
    case = (2, 3, 17, 32, "float32", strided)
    errors, math_errors = backend_errors("sdpa", *case), backend_errors("math", *case)
    assert_as_accurate_as_math(errors, math_errors, "float32")


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 2, 5, 48), torch.float32, "head dim 48"),
    ((1, 2, 5, 8), torch.float32, "head dim 8"),
    ((1, 2, 5, 256), torch.float32, "head dim 256"),
    ((1, 2, 5, 32), torch.float64, "torch.float64"),
    ((1, 2, 5, 32), torch.int32, "torch.int32"),
])
def test_triton_rejects_unsupported_head_dim_and_dtype(shape, dtype, message):
    q = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        A.attention(q, q, q, "triton")


def test_triton_rejects_mixed_dtypes_and_shapes():
    q = torch.zeros(1, 2, 5, 32)
    with pytest.raises(ValueError, match="one for q, k, v"):
        A.attention(q, q.half(), q, "triton")
    with pytest.raises(ValueError, match="one shape"):
        A.attention(q, q[:, :, :4], q[:, :, :4], "triton")


@needs_triton
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(A, "_INTERPRETED", False)  # as without TRITON_INTERPRET (a no-op then)
    q = torch.zeros(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU \(or TRITON_INTERPRET=1"):
        A.attention(q, q, q, "triton")


def test_without_triton_module_imports_and_triton_backend_raises():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
            "import torch, vit, kernels.attention as A\n"
            "q = torch.randn(1, 2, 5, 16)\n"
            "assert (A.attention(q, q, q, 'sdpa') - A.attention(q, q, q, 'math')).abs().max() < 1e-6\n"
            "try:\n    A.attention(q, q, q, 'triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "attention backend 'triton' needs the triton package" in proc.stdout


gpu = pytest.mark.skipif(not torch.cuda.is_available() or A.triton is None or A._INTERPRETED,
                         reason="needs a CUDA GPU, triton, and compiled (not interpreted) kernels")


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("B, H, N, d, shift", [
    (1, 2, 5, 16, 0.0), (2, 3, 17, 32, 0.0), (8, 6, 37, 64, 0.0), (4, 6, 197, 64, 0.0),
    (2, 12, 201, 64, 0.0), (2, 4, 197, 128, 0.0), (2, 3, 37, 32, 24.0)])
def test_triton_compiled_on_gpu_matches_math(B, H, N, d, shift, dtype):
    for strided in (True, False):
        case = (B, H, N, d, dtype, strided, shift)
        assert_as_accurate_as_math(backend_errors("triton", *case, device="cuda"),
                                   backend_errors("math", *case, device="cuda"), dtype)


@gpu
def test_vit_same_for_all_backends_on_gpu():
    errors = vit_errors("cuda")
    assert all(e < 1e-4 for e in errors.values()), errors
