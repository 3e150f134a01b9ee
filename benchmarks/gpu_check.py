"""GPU check: one command that tests and measures nanodino on one CUDA GPU and writes a report.

    python benchmarks/gpu_check.py                         # one H100 / H200: at most --budget_s 480 s
    python benchmarks/gpu_check.py --official DIR          # also the official DINO / SimDINO step next to ours
    python benchmarks/gpu_check.py --fashion_mnist DIR     # Fashion-MNIST from DIR (default: Debian's path)
    python benchmarks/gpu_check.py --parts kernels methods # only some parts (the others are recorded as skipped)
    python benchmarks/gpu_check.py --cpu                   # the same parts at tiny sizes on CPU (< 1 minute)

The report, OUTPUT_DIR/report.md and OUTPUT_DIR/report.json (default runs/gpu_check), holds the
parts in this order, each with its status (ok | failed | timed out | skipped) and seconds:

  1. environment    GPU name, driver, CUDA, cuDNN, torch and triton versions, bf16 support, device count.
  2. kernels        kernels/attention.py's `triton` backend against `math` (output, dQ, dK, dV; fp32 and
                    bf16; N 5 to 257, head dims 32 / 64 / 128), every SDPA backend (flash, efficient,
                    cuDNN, math: torch.nn.attention.sdpa_kernel) the same way, kernels/coding_rate.py
                    against float64 torch.logdet, and one ViT forward + backward per attention backend.
                    The criterion is tests/test_attention.py's: against float64, a backend's error in a
                    dtype is at most twice that of `math` run in the same dtype, plus a floor.
  3. methods        each method's real command line for 50 steps (`python dino.py --preset official
                    --data synthetic --device cuda --precision bf16 --arch vit_small --patch_size 16
                    --global_crops_size 224 --local_crops_size 96 --local_crops_number 10
                    --batch_size_per_gpu 64 --max_steps 50 --eval_every 0`), and the first of --methods
                    (DINO) once more with --compile true: finite losses (log.jsonl), median step time,
                    peak memory.
  4. benchmarks     `python benchmarks/bench.py --device cuda` (ViT-S/16 and ViT-B/16: images/s, MFU,
                    memory) and `python -m kernels.attention` (triton against SDPA, forward + backward).
  5. official       `python benchmarks/bench_official.py --official DIR`, only with --official DIR
                    (passing --device cuda once it has that flag: today both sides run on the CPU).
  6. fashion_mnist  with the time left: the four methods on Fashion-MNIST (28 px, ViT-pico/7, k-NN at
                    the end of each run), and `python eval.py knn --checkpoint ... --baselines` once
                    (raw pixels, random ViT, and that run's k-NN again). CPU mode: only with
                    --fashion_mnist DIR, 2 steps (tests/test_gpu_check.py gives it a tiny fake copy).

The CPU mode (--cpu) runs the same code at tiny sizes: triton under TRITON_INTERPRET=1 (fp32 only),
the methods as vit_pico/8 on 2x32 + 2x16 px crops, batch 16, 3 steps, two runs at a time, no
compile; bench.py's small CPU config; subprocesses with OMP_NUM_THREADS=1.

Every part runs in subprocesses with time limits; a part that crashes or times out is recorded as
such and the next one runs. The report is rewritten after every part, so a crash keeps what was
done. Later parts get what is left of --budget_s. Subprocess outputs go to OUTPUT_DIR/logs/.
A run is measured by running the method file's __main__ inside this script (`--worker train`):
the same code as `python dino.py ...`, plus a clock at each step's end (the EMA update, its last
call) and the peak memory at exit. tests/test_gpu_check.py runs the CPU mode.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
METHODS = ("dino", "simdino", "dinov2", "simdinov2")

# Part 3: one method's command line, without --output_dir. GPU: the official recipe (heads, drop
# path, schedules) on ViT-S/16 at batch 64; CPU: the default synthetic recipe, shrunk.
GPU_TRAIN = ["--preset", "official", "--data", "synthetic", "--device", "cuda", "--precision", "bf16",
             "--arch", "vit_small", "--patch_size", "16", "--global_crops_size", "224",
             "--local_crops_size", "96", "--local_crops_number", "10", "--batch_size_per_gpu", "64",
             "--max_steps", "50", "--eval_every", "0"]
CPU_TRAIN = ["--data", "synthetic", "--device", "cpu", "--precision", "fp32", "--arch", "vit_pico",
             "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
             "--local_crops_number", "2", "--batch_size_per_gpu", "16", "--max_steps", "3", "--eval_every", "0"]
# Part 6: the README's Fashion-MNIST command (ViT-pico/7, 2x28 + 4x14 crops), on the GPU in bf16.
FASHION_TRAIN = ["--data", "fashion-mnist", "--global_crops_size", "28", "--local_crops_size", "14",
                 "--patch_size", "7", "--checkpoint_minutes", "0.5"]
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# tests/test_attention.py's floors on max|x − ref| / max|ref|
FLOOR = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


# ----------------------------------------------------------------------------------------------
# Running subprocesses

def run(args, cmd, timeout, log_name, env=None):
    """cmd (a list) from the repository root, in its own process group, killed as a group after
    `timeout` seconds; `env` adds variables (None: removes one). Its output goes to
    OUTPUT_DIR/logs/<log_name>.txt. Returns a dict."""
    t0 = time.time()
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    if args.cpu:  # one thread each: measured on a shared 2-core machine, a 0.17 s step of one
        env.setdefault("OMP_NUM_THREADS", "1")  # thread took 2 to 12 s with two while other jobs ran
    shown = " ".join("python" if c == sys.executable else c for c in cmd)
    print(f"    $ {shown}  (limit {timeout:.0f} s)", flush=True)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started (compile workers)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes
                out, err = "", "(output lost: the pipes stayed open after the kill)"
            timed_out = True
    seconds = time.time() - t0
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    with open(os.path.join(args.output_dir, "logs", f"{log_name}.txt"), "w") as f:
        f.write(f"$ {shown}\nrc {proc.returncode}, {seconds:.1f} s{', timed out' if timed_out else ''}\n"
                f"--- stdout\n{out}\n--- stderr\n{err}\n")
    print(f"      -> rc {proc.returncode}, {seconds:.1f} s{', timed out' if timed_out else ''}", flush=True)
    return {"command": shown, "rc": proc.returncode, "timed_out": timed_out,
            "seconds": round(seconds, 1), "stdout": out, "stderr": err}


def tail(text, n=1500):
    return text if len(text) <= n else "..." + text[-n:]


def left(deadline):
    return deadline - time.time()


def status_of(r):
    """ok | failed | timed out, from a run's return code."""
    return "timed out" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")


def worst(statuses):
    """A part's status from its items': failed > timed out > ok > skipped."""
    for s in ("failed", "timed out", "ok"):
        if s in statuses:
            return s
    return "skipped"


def json_lines(text, prefix=""):
    """The JSON objects printed one per line (after `prefix`) in text."""
    found = []
    for line in text.splitlines():
        if line.startswith(prefix + "{"):
            try:
                found.append(json.loads(line[len(prefix):]))
            except ValueError:
                pass
    return found


def self_command(*argv):
    return [sys.executable, os.path.abspath(__file__), *argv]


# ----------------------------------------------------------------------------------------------
# Part 1: the environment

def worker_env(argv):
    """--worker env: versions and devices, one JSON line."""
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda (torch built with)": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda available": torch.cuda.is_available(), "device count": torch.cuda.device_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable ({e})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "compute capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "gpu memory GiB": round(p.total_memory / 2 ** 30, 1),
                     "bf16 supported": torch.cuda.is_bf16_supported()})
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
        info["driver"] = smi.stdout.split(",")[1].strip() if smi.stdout.count(",") >= 2 else None
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        info["driver's CUDA"] = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else None
    print(json.dumps(info), flush=True)


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def part_environment(args, deadline):
    r = run(args, self_command("--worker", "env"), min(60, left(deadline)), "environment")
    found = json_lines(r["stdout"])
    result = {"status": status_of(r), "info": {"commit": git_commit(), **(found[-1] if found else {})}}
    if r["rc"] != 0 or not found:
        result.update(status="failed" if result["status"] == "ok" else result["status"], error=tail(r["stderr"]))
    elif not args.cpu and not result["info"].get("cuda available"):
        result.update(status="failed", error="no CUDA GPU visible to torch (use --cpu for the CPU mode)")
    return result


# ----------------------------------------------------------------------------------------------
# Part 2: kernels against their references (runs in `--worker kernels`, one JSON line per check)

def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def bound_of(math_errors, dtype):
    """tests/test_attention.py's criterion: error ≤ 2 × error of `math` in the same dtype + floor."""
    return {name: 2 * e + FLOOR[dtype] for name, e in math_errors.items()}


def emit_compared(check, errors, bound, **fields):
    """One check's line: ok when every error is within its bound."""
    ok = all(errors[name] <= bound[name] for name in errors)
    emit(check, "ok" if ok else "failed", errors=errors, bound=bound, **fields)


def attention_errors(fn, B, H, N, d, dtype, strided, device):
    """Relative errors of fn(q, k, v) against float64 `math`, for O and dQ, dK, dV, on inputs laid
    out as vit.py makes them (strided: three views of one qkv tensor) or contiguous."""
    import torch
    from kernels.attention import math_attention
    g = torch.Generator().manual_seed(N * d + B)
    dt = getattr(torch, dtype)
    if strided:
        qkv = torch.randn(B, N, 3, H, d, generator=g).to(device, dt).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, d)
        do = torch.randn(B, N, H, d, generator=g).to(device, dt).transpose(1, 2)
    else:
        q, k, v, do = (t.to(device, dt) for t in torch.randn(4, B, H, N, d, generator=g).unbind(0))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = math_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    return {name: rel_err(x, r) for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}


_previous_emit = [time.perf_counter()]


def emit(check, status, **fields):
    """One `CHECK {json}` line, with the seconds since the previous one (every check ends in
    .item() calls, so on a GPU its kernels have finished)."""
    now = time.perf_counter()
    fields["seconds"], _previous_emit[0] = round(now - _previous_emit[0], 3), now
    print("CHECK " + json.dumps({"check": check, "status": status, **fields}), flush=True)


def guarded(check, fn):
    """Runs one check; an exception is that check's failure, not the worker's."""
    try:
        fn()
    except Exception as e:
        emit(check, "failed", error=f"{type(e).__name__}: {e}"[:800])


def check_triton(cpu):
    """`triton` against `math` in the same dtype, both against float64."""
    import kernels.attention as A
    if A.triton is None:
        return emit("triton", "skipped", note=f"triton is not importable: {A._TRITON_IMPORT_ERROR}")
    if cpu and not A._INTERPRETED:
        return emit("triton", "skipped", note="no GPU, and not under TRITON_INTERPRET=1")
    device = "cpu" if cpu else "cuda"
    if cpu:  # the interpreter: two small cases (a few seconds)
        cases = [((1, 2, 17, 32), "float32", True), ((1, 1, 37, 64), "float32", False),
                 ((1, 2, 17, 32), "bfloat16", True)]
    else:  # N 5..257 (197: a ViT/16 global crop, 37: a local crop), head dims 32, 64, 128
        shapes = [(2, 3, 5, 32), (2, 3, 17, 32), (4, 6, 37, 64), (2, 6, 65, 64), (4, 6, 197, 64),
                  (2, 6, 257, 64), (2, 4, 37, 128), (2, 4, 197, 128)]
        cases = [(s, dt, True) for dt in ("float32", "bfloat16") for s in shapes]
        cases += [((4, 6, 197, 64), dt, False) for dt in ("float32", "bfloat16")]
    for (B, H, N, d), dtype, strided in cases:
        name = f"triton B{B} H{H} N{N} d{d} {dtype} {'strided' if strided else 'contiguous'}"
        if A._INTERPRETED and dtype == "bfloat16":
            emit(name, "skipped", note="Triton's interpreter cannot run bfloat16 (kernels/attention.py refuses it)")
            continue

        def one():
            triton = lambda q, k, v: A.attention(q, k, v, "triton")  # noqa: E731
            errs = attention_errors(triton, B, H, N, d, dtype, strided, device)
            math_errs = attention_errors(A.math_attention, B, H, N, d, dtype, strided, device)
            emit_compared(name, errs, bound_of(math_errs, dtype), math_errors=math_errs)
        guarded(name, one)


def check_sdpa(cpu):
    """Each SDPA backend alone (sdpa_kernel), against `math` in the same dtype; a backend that
    does not serve a dtype or shape is recorded as `not available`, with PyTorch's reason."""
    import warnings
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.attention import math_attention
    device = "cpu" if cpu else "cuda"
    shapes = ([(1, 2, 17, 32), (1, 2, 37, 64)] if cpu else
              [(4, 6, 197, 64), (8, 6, 37, 64), (2, 4, 257, 128), (2, 3, 5, 32)])
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        for dtype in ("float32", "bfloat16"):
            for B, H, N, d in shapes:
                name = f"sdpa {backend.lower()} B{B} H{H} N{N} d{d} {dtype}"

                def one():
                    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([getattr(SDPBackend, backend)]):
                        warnings.simplefilter("always")
                        try:
                            errs = attention_errors(F.scaled_dot_product_attention, B, H, N, d, dtype, True, device)
                        except RuntimeError as e:
                            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                                raise
                            why = "; ".join(str(w.message).splitlines()[0] for w in caught)[:300]
                            return emit(name, "not available", note=why or str(e).splitlines()[0])
                    math_errs = attention_errors(math_attention, B, H, N, d, dtype, True, device)
                    emit_compared(name, errs, bound_of(math_errs, dtype), math_errors=math_errs)
                guarded(name, one)


def check_coding_rate(cpu):
    """kernels/coding_rate.py against float64 torch.logdet (coding_rate_reference, on the CPU):
    float64 on the device at tests/test_coding_rate.py's tolerances; float32 within twice the
    reference's own float32 error (+ 1e-6); fp32 under bf16 autocast equal to fp32 (rtol 1e-6,
    as the test); the d×d side (reduce_cov) equal to the n×n side (Sylvester)."""
    import torch
    import torch.nn.functional as F
    from kernels.coding_rate import coding_rate, coding_rate_reference
    device = "cpu" if cpu else "cuda"
    cases = [(16, 32, 0.5), (48, 32, 0.05)] if cpu else [(64, 256, 0.5), (512, 256, 0.05), (256, 256, 0.5)]

    def value_and_grad(fn, Z, w):
        Z = Z.detach().requires_grad_()
        R = fn(Z)
        return R.detach(), torch.autograd.grad((w.to(R.dtype) * R).sum(), Z)[0]

    for n, d, eps in cases:
        g = torch.Generator().manual_seed(n + d)
        Z = F.normalize(torch.randn(2, n, d, generator=g, dtype=torch.float64), dim=-1)  # 2 views of unit vectors
        w = torch.randn(2, generator=g, dtype=torch.float64)  # a different weight per view
        R_ref, g_ref = value_and_grad(lambda z: coding_rate_reference(z, eps), Z, w)
        R_ref, g_ref = R_ref.to(device), g_ref.to(device)
        Zd, wd = Z.to(device), w.to(device)
        shape = f"V2 n{n} d{d} eps{eps}"

        def fp64():
            R, gr = value_and_grad(lambda z: coding_rate(z, eps), Zd, wd)
            errs = {"R": rel_err(R, R_ref), "grad": rel_err(gr, g_ref)}
            emit_compared(f"coding_rate {shape} float64", errs, {"R": 1e-12, "grad": 1e-10})

        def fp32():
            R, gr = value_and_grad(lambda z: coding_rate(z, eps), Zd.float(), wd)
            Rr, grr = value_and_grad(lambda z: coding_rate_reference(z, eps), Zd.float(), wd)
            errs = {"R": rel_err(R, R_ref), "grad": rel_err(gr, g_ref)}
            ref_errs = {"R": rel_err(Rr, R_ref), "grad": rel_err(grr, g_ref)}
            emit_compared(f"coding_rate {shape} float32", errs, bound_of(ref_errs, "float32"),
                          logdet_fp32_errors=ref_errs)

        def autocast():
            R32 = coding_rate(Zd.float(), eps)
            with torch.autocast(device, dtype=torch.bfloat16):
                R = coding_rate(Zd.float(), eps)
            errs = {"R": rel_err(R, R32) if R.dtype == torch.float32 else math.inf}  # bf16 R: a failure
            emit_compared(f"coding_rate {shape} float32 under bf16 autocast", errs, {"R": 1e-6}, dtype=str(R.dtype))

        def sides():
            R_n, g_n = value_and_grad(lambda z: coding_rate(z, eps), Zd, wd)
            R_d, g_d = value_and_grad(lambda z: coding_rate(z, eps, reduce_cov=True), Zd, wd)
            errs = {"R": rel_err(R_d, R_n), "grad": rel_err(g_d, g_n)}
            emit_compared(f"coding_rate {shape} float64 d×d side (reduce_cov) = default side", errs,
                          {"R": 1e-12, "grad": 1e-10})
        for name, fn in (("float64", fp64), ("float32", fp32), ("autocast", autocast), ("sides", sides)):
            guarded(f"coding_rate {shape} {name}", fn)


def check_vit(cpu):
    """One ViT forward + backward (gradient w.r.t. the image) per attention backend, against
    `math`: fp32 within 1e-4 (tests/test_attention.py's GPU bound); bf16 autocast against fp32
    `math`, within twice `math`'s own bf16 error + 1e-2."""
    import torch
    import kernels.attention as A
    from vit import ARCHS, build_vit
    device = "cpu" if cpu else "cuda"
    arch, patch, size, batch, registers = ("vit_pico", 8, 32, 2, 2) if cpu else ("vit_small", 16, 224, 4, 0)
    torch.manual_seed(0)
    model = build_vit(arch, patch, img_size=size, num_register_tokens=registers).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    w = torch.randn(batch, ARCHS[arch][0], device=device)  # loss Σ out·w

    def forward_backward(backend, bf16):
        for block in model.blocks:
            block.attn.backend = backend
        xb = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = model(xb).float()
        return out, torch.autograd.grad((out * w).sum(), xb)[0]

    ref = forward_backward("math", False)
    math_bf16 = forward_backward("math", True)
    math_errs = {"out": rel_err(math_bf16[0], ref[0]), "grad": rel_err(math_bf16[1], ref[1])}
    tokens = 1 + registers + (size // patch) ** 2
    emit(f"vit {arch}/{patch} {size}px T{tokens} batch {batch} math bfloat16", "reference", errors=math_errs,
         note="the reference's own bf16 error, against itself in fp32")
    for backend in [b for b in A.BACKENDS if b != "math"]:
        for dtype in ("float32", "bfloat16"):
            name = f"vit {arch}/{patch} {size}px T{tokens} batch {batch} {backend} {dtype}"
            if backend == "triton" and (A.triton is None or (cpu and not A._INTERPRETED)):
                emit(name, "skipped", note="no triton here (no GPU, or not importable)")
                continue
            if backend == "triton" and A._INTERPRETED and dtype == "bfloat16":
                emit(name, "skipped", note="Triton's interpreter cannot run bfloat16")
                continue

            def one():
                out, grad = forward_backward(backend, dtype == "bfloat16")
                errs = {"out": rel_err(out, ref[0]), "grad": rel_err(grad, ref[1])}
                bound = {"out": 1e-4, "grad": 1e-4} if dtype == "float32" else bound_of(math_errs, "bfloat16")
                emit_compared(name, errs, bound)
            guarded(name, one)


def worker_kernels(argv):
    """--worker kernels [--cpu]: every check of part 2, one `CHECK {json}` line each."""
    import torch  # noqa: F401  (imported before the first check's clock starts)
    import kernels.attention  # noqa: F401
    cpu = "--cpu" in argv
    _previous_emit[0] = time.perf_counter()
    for check in (check_triton, check_sdpa, check_coding_rate, check_vit):
        guarded(check.__name__, lambda: check(cpu))


def part_kernels(args, deadline):
    env = {"TRITON_INTERPRET": "1" if args.cpu else None}  # CPU: the interpreter, on before the import
    r = run(args, self_command("--worker", "kernels", *(["--cpu"] if args.cpu else [])),
            min(150 if not args.cpu else 60, left(deadline)), "kernels", env)
    checks = json_lines(r["stdout"], "CHECK ")
    result = {"status": worst([c["status"] for c in checks] + [status_of(r)]), "checks": checks}
    if r["rc"] != 0 or not checks:  # a crash or a time-out: the checks printed before it are kept
        result.update(status="failed" if result["status"] == "ok" else result["status"],
                      error=tail(r["stderr"]) or "no checks ran")
    return result


# ----------------------------------------------------------------------------------------------
# Part 3: the four methods' command lines (each in `--worker train`)

def worker_train(argv):
    """--worker train METHOD.py FLAGS: runs the method file's __main__ with FLAGS in this process,
    as `python METHOD.py FLAGS` would; prints `STATS {json}` at exit: the time at the end of each
    step (when train.ema_update, the step's last call, returns; CUDA synchronised) and the peak
    memory (CUDA: max allocated; CPU: process max RSS)."""
    import resource
    import runpy
    import torch
    import train
    ends, ema_update, start = [], train.ema_update, time.perf_counter()

    def timed_ema_update(*a, **kw):
        ema_update(*a, **kw)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    train.ema_update = timed_ema_update
    sys.argv = argv
    try:
        runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    finally:
        cuda = torch.cuda.is_initialized()
        print("STATS " + json.dumps({
            "step_ends": ends, "start_to_first_step_s": round(ends[0] - start, 2) if ends else None,
            "peak_cuda_allocated_MiB": round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None,
            "peak_cuda_reserved_MiB": round(torch.cuda.max_memory_reserved() / 2 ** 20) if cuda else None,
            "max_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)


def train_run(args, method, out, flags, timeout, log_name):
    """One method run into `out` (emptied first: train.py resumes a finished run and would not
    train again): status, the last log.jsonl record's losses, step time and memory."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [f"{method}.py", *flags, "--output_dir", out]
    r = run(args, self_command("--worker", "train", *argv), timeout, log_name)
    res = {"status": status_of(r), "command": "python " + " ".join(argv), "seconds": r["seconds"]}
    stats = (json_lines(r["stdout"], "STATS ") or [{}])[-1]
    ends = stats.get("step_ends", [])
    steps = [b - a for a, b in zip(ends, ends[1:])][(len(ends) - 1) // 5:]  # the first fifth is warm-up
    res.update(steps_timed=len(ends), median_step_s=round(statistics.median(steps), 4) if steps else None,
               **{k: v for k, v in stats.items() if k != "step_ends"})
    if res["median_step_s"]:
        batch = int(flags[flags.index("--batch_size_per_gpu") + 1]) if "--batch_size_per_gpu" in flags else None
        res["images_per_s"] = round(batch / res["median_step_s"], 1) if batch else None
    log = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    if records:
        last = records[-1]
        skip = {"epoch", "step", "lr", "wd", "momentum", "global_crops_size", "time", "feat_std", "feat_rank",
                "knn_top1", "knn_top5"}
        res["step"], res["log_time_s"] = last["step"], last.get("time")
        res["losses"] = {k: v for k, v in last.items() if k not in skip and isinstance(v, (int, float))}
        res["feat_std"], res["feat_rank"] = last.get("feat_std"), last.get("feat_rank")
        if "knn_top1" in last:
            res["knn"] = {"top1": last["knn_top1"], "top5": last.get("knn_top5")}
    if res["status"] == "ok" and not ends:
        res["note"] = "no step clock: train.ema_update was never called (renamed?)"
    if res["status"] == "ok":
        bad = [k for k, v in res.get("losses", {}).items() if not math.isfinite(v)]
        if not records or bad:
            res.update(status="failed", error=f"non-finite {', '.join(bad)}" if bad else f"no log.jsonl in {out}")
    if res["status"] != "ok":
        res["error"] = res.get("error") or ((f"timed out after {timeout:.0f} s\n" if r["timed_out"] else "")
                                            + tail(r["stderr"]))
    return res


def part_methods(args, deadline):
    flags = CPU_TRAIN if args.cpu else GPU_TRAIN
    runs = [(m, m, flags) for m in args.methods]
    compiled = args.methods[0]
    if not args.cpu:  # on CPU a compile takes minutes: the GPU run only
        runs.append((f"{compiled} --compile true", compiled, flags + ["--compile", "true"]))

    def one(name, method, fl):
        if left(deadline) < 5:
            return {"status": "skipped", "note": "the part's time limit was reached"}
        cap = 180 if "--compile" in fl else 120  # the first run also draws the synthetic data (~10 s)
        out = os.path.join(args.output_dir, "methods", name.replace(" --compile true", "_compile"))
        print(f"  {name}", flush=True)
        res = train_run(args, method, out, fl, min(60 if args.cpu else cap, left(deadline)),
                        f"methods_{os.path.basename(out)}")
        for f in os.listdir(out) if os.path.isdir(out) else []:  # ~0.7 GB each on the GPU: not needed
            if f.endswith(".pth"):
                os.remove(os.path.join(out, f))
        return res
    # one by one on the GPU (the runs are timed); two at a time on a CPU, whose times mean little
    with concurrent.futures.ThreadPoolExecutor(2 if args.cpu else 1) as pool:
        futures = {name: pool.submit(one, name, method, fl) for name, method, fl in runs}
    result = {"runs": {name: f.result() for name, f in futures.items()}}
    if args.cpu:
        result["runs"][f"{compiled} --compile true"] = {"status": "skipped",
                                                        "note": "CPU mode: a compile takes minutes"}
    result["status"] = worst([r["status"] for r in result["runs"].values()])
    return result


# ----------------------------------------------------------------------------------------------
# Part 4: benchmarks/bench.py and kernels/attention.py's benchmark

def part_benchmarks(args, deadline):
    if args.cpu:
        bench = [sys.executable, "benchmarks/bench.py", "--device", "cpu", "--config", "default", "--steps", "1",
                 "--threads", "1"]
    else:
        bench = [sys.executable, "benchmarks/bench.py", "--device", "cuda"]
    r = run(args, bench, min(150 if not args.cpu else 60, left(deadline)), "benchmarks_bench")
    rows = json_lines(r["stdout"])
    result = {"bench": {"status": status_of(r), "command": r["command"], "rows": rows}}
    if r["rc"] != 0 or not rows:
        result["bench"].update(status="failed" if status_of(r) == "ok" else status_of(r), error=tail(r["stderr"]))
    if left(deadline) < 5:
        result["attention"] = {"status": "skipped", "note": "the part's time limit was reached"}
    else:
        r = run(args, [sys.executable, "-m", "kernels.attention"], min(120, left(deadline)), "benchmarks_attention")
        result["attention"] = {"status": status_of(r), "command": r["command"], "output": tail(r["stdout"], 4000)}
        if r["rc"] == 0 and "needs a CUDA GPU" in r["stdout"]:
            result["attention"].update(status="skipped", note="kernels/attention.py's __main__ has no CPU path")
        if r["rc"] != 0:
            result["attention"]["error"] = tail(r["stderr"])
    result["status"] = worst([result["bench"]["status"], result["attention"]["status"]])
    return result


# ----------------------------------------------------------------------------------------------
# Part 5: the official code's step next to ours

def part_official(args, deadline):
    if not args.official:
        return {"status": "skipped", "note": "no --official DIR (checkouts of facebookresearch/dino and "
                                             "RobinWu218/SimDINO) given"}
    cmd = [sys.executable, "benchmarks/bench_official.py", "--official", os.path.abspath(args.official),
           "--steps", "3" if args.cpu else "5", "--warmup", "1", "--threads", str(min(8, os.cpu_count() or 1))]
    with open(os.path.join(ROOT, "benchmarks", "bench_official.py")) as f:
        has_device_flag = '"--device"' in f.read()
    note = None
    if not args.cpu:
        if has_device_flag:
            cmd += ["--device", "cuda"]
        else:
            note = "bench_official.py has no --device flag: both sides ran on the CPU, not on the GPU"
    r = run(args, cmd, min(150, left(deadline)), "official")
    result = {"status": status_of(r), "command": r["command"], "output": tail(r["stdout"], 4000)}
    if note:
        result["note"] = note
    missing = r["stdout"].count("skipped: no main_dino.py")
    if missing:
        result["note"] = "; ".join(filter(None, [note, f"{missing} of 2 checkouts missing"]))
        if missing == 2 and r["rc"] == 0:
            result["status"] = "skipped"
    if r["rc"] != 0:
        result["error"] = tail(r["stderr"])
    return result


# ----------------------------------------------------------------------------------------------
# Part 6: Fashion-MNIST, k-NN against the baselines

def fashion_dir(args):
    """The folder holding the four Fashion-MNIST files (data.py reads DIR or DIR/FashionMNIST/raw)."""
    roots = [args.fashion_mnist] if args.fashion_mnist else ["/usr/share/datasets/fashion-mnist"]
    for root in roots:
        for d in (root, os.path.join(root, "FashionMNIST", "raw")):
            if all(os.path.isfile(os.path.join(d, f)) for f in FASHION_FILES):
                return d
    return None


def eval_knn(args, ckpt, device, baselines, timeout, log_name):
    """`python eval.py knn --checkpoint CKPT [--baselines]`: its JSON line, or {} and the error."""
    cmd = [sys.executable, "eval.py", "knn", "--checkpoint", ckpt, "--device", device]
    cmd += ["--baselines"] if baselines else []
    r = run(args, cmd, timeout, log_name)
    found = json_lines(r["stdout"])
    if found and r["rc"] == 0:
        return found[-1], None
    return {}, f"{r['command']}: {status_of(r)}\n{tail(r['stderr'], 600)}"


def part_fashion(args, deadline):
    if args.cpu and not args.fashion_mnist:
        return {"status": "skipped", "note": "CPU mode: only with --fashion_mnist DIR (on a CPU the k-NN over "
                                             "the 70,000 images of the real set takes minutes)"}
    path = fashion_dir(args)
    if path is None:
        where = args.fashion_mnist or "/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)"
        return {"status": "skipped", "note": f"no Fashion-MNIST files in {where}; give --fashion_mnist DIR"}
    device = "cpu" if args.cpu else "cuda"
    epochs = str(args.fmnist_epochs)
    flags = FASHION_TRAIN + ["--data_path", os.path.abspath(path), "--device", device, "--epochs", epochs,
                             "--eval_every", epochs]  # k-NN once, at the end of the run
    flags += (["--precision", "fp32", "--max_steps", "2", "--batch_size_per_gpu", "16", "--local_crops_number", "2"]
              if args.cpu else ["--precision", "bf16"])
    result = {"data": path, "epochs": args.fmnist_epochs, "runs": {}}
    for i, method in enumerate(args.methods):
        share = left(deadline) / (len(args.methods) - i)  # an equal share of what is left, k-NN included
        if share < 20:
            result["runs"][method] = {"status": "skipped", "note": "the time budget is spent"}
            continue
        print(f"  {method}", flush=True)
        out = os.path.join(args.output_dir, "fashion_mnist", method)
        t0 = time.time()
        res = train_run(args, method, out, flags, min(0.8 * share, 300), f"fashion_{method}")
        ckpt = os.path.join(out, "checkpoint.pth")
        # eval.py on the checkpoint: once for the baselines (and its k-NN again, next to the run's
        # own), and for a run that timed out before its k-NN (its checkpoint is at most 30 s old)
        need_baselines = "raw_pixels_top1" not in result
        if os.path.exists(ckpt) and (need_baselines or "knn" not in res):
            knn, error = eval_knn(args, ckpt, device, need_baselines, max(10, share - (time.time() - t0)),
                                  f"fashion_{method}_knn")
            res["eval_py_knn"] = {k: knn[k] for k in ("top1", "top5") if k in knn}
            res.setdefault("knn", res["eval_py_knn"])
            result.update({k: v for k, v in knn.items() if k.startswith(("raw_pixels", "random_vit"))})
            if error:
                res.update(status=worst([res["status"], "failed"]), error=res.get("error") or error)
        if "top1" not in res.get("knn", {}) and res["status"] == "ok":
            res.update(status="failed", error="no k-NN result")
        result["runs"][method] = res
    result["status"] = worst([r["status"] for r in result["runs"].values()])
    return result


# ----------------------------------------------------------------------------------------------
# The report

PARTS = [  # name, title, function
    ("environment", "Environment", part_environment),
    ("kernels", "GPU tests: Triton attention, SDPA backends, coding rate, ViT per backend", part_kernels),
    ("methods", "The methods' command lines: losses, step time, memory; one with --compile true", part_methods),
    ("benchmarks", "benchmarks/bench.py and python -m kernels.attention", part_benchmarks),
    ("official", "The official DINO / SimDINO step next to ours (benchmarks/bench_official.py)", part_official),
    ("fashion_mnist", "Fashion-MNIST: the four methods, k-NN against the baselines", part_fashion),
]
PART_LIMITS_S = {"environment": 60, "kernels": 150, "methods": 300, "benchmarks": 200, "official": 150,
                 "fashion_mnist": 10 ** 6}  # GPU; on CPU each part at most 90 s


def fmt(x, digits=4):
    if isinstance(x, float):
        return f"{x:.2e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5) else f"{x:.{digits}g}"
    return "" if x is None else str(x)


def errors_cell(c):
    """`out 1.2e-07 (2.1e-06), dq ...`: each error with its bound, or the check's note / error."""
    bound = c.get("bound", {})
    cell = ", ".join(f"{k} {fmt(v, 2)}" + (f" ({fmt(bound[k], 2)})" if k in bound else "")
                     for k, v in c.get("errors", {}).items())
    return "; ".join(filter(None, [cell, c.get("note"), c.get("error")]))


def knn_cell(r):
    """The run's k-NN top-1, and eval.py's on its checkpoint where that ran."""
    cell = fmt(r.get("knn", {}).get("top1"))
    if "top1" in r.get("eval_py_knn", {}):
        cell += f" (eval.py {fmt(r['eval_py_knn']['top1'])})"
    return cell


def markdown_part(name, p):
    lines = []
    if name == "environment":
        lines += ["| | |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in p.get("info", {}).items()]
    elif name == "kernels":
        counts = {}
        for c in p.get("checks", []):
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        lines += [", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
                  "| check | status | max rel. error (bound) | s |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['status']} | {errors_cell(c)} | {fmt(c.get('seconds'), 2)} |"
                  for c in p.get("checks", [])]
    elif name in ("methods", "fashion_mnist") and p.get("runs"):
        if name == "fashion_mnist":
            lines += [f"Data: `{p['data']}`, {p['epochs']} epoch(s) per method; baselines (k-NN top-1): raw pixels "
                      f"{fmt(p.get('raw_pixels_top1'))}, random ViT {fmt(p.get('random_vit_top1'))}.", ""]
        lines += ["| run | status | steps | losses (last log.jsonl record) | median step s | images/s | "
                  "peak CUDA MiB | max RSS MiB | start to step 1 s | k-NN top-1 | wall s |", "|---" * 11 + "|"]
        for run_name, r in p.get("runs", {}).items():
            losses = ", ".join(f"{k} {fmt(v)}" for k, v in r.get("losses", {}).items())
            lines.append(f"| {run_name} | {r['status']} | {fmt(r.get('step'))} | {losses} | "
                         f"{fmt(r.get('median_step_s'))} | "
                         f"{fmt(r.get('images_per_s'))} | {fmt(r.get('peak_cuda_allocated_MiB'))} | "
                         f"{fmt(r.get('max_rss_MiB'))} | {fmt(r.get('start_to_first_step_s'))} | {knn_cell(r)} | "
                         f"{fmt(r.get('seconds'))} |")
        for run_name, r in p.get("runs", {}).items():
            if r.get("command"):
                lines += ["", f"`{r['command']}`"]
            if r.get("note"):
                lines += ["", f"{run_name}: {r['note']}"]
            if r.get("error"):
                lines += ["", f"{run_name}:", "```", r["error"].rstrip(), "```"]
    elif name == "benchmarks":
        b = p.get("bench", {})
        lines += [f"`{b.get('command', '')}`: {b.get('status', '')}", ""]
        keys = ["method", "arch", "crops", "batch", "precision", "median_step_s", "images_per_s", "peak_memory_MiB",
                "matmul_peak_TFLOPs", "MFU", "coding_rate_percent_of_step"]
        if b.get("rows"):
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in b["rows"]]
        if b.get("error"):
            lines += ["```", b["error"], "```"]
        a = p.get("attention", {})
        lines += ["", f"`{a.get('command', 'python -m kernels.attention')}`: {a.get('status', '')} "
                      f"{a.get('note', '')}", "```", a.get("output", "").rstrip(), a.get("error", ""), "```"]
    elif name == "official":
        if p.get("command"):
            lines += [f"`{p['command']}`", "```", p.get("output", "").rstrip(), "```"]
    if p.get("note"):
        lines += ["", f"Note: {p['note']}"] if lines else [f"Note: {p['note']}"]
    if p.get("error"):
        lines += ["", "Error:", "```", p["error"].rstrip(), "```"]
    return lines


def write_report(args, report):
    """report.json (everything) and report.md (the same, as tables), rewritten after every part."""
    os.makedirs(args.output_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(report, indent=1)), ("md", markdown(report))):
        tmp = os.path.join(args.output_dir, f"report.{ext}.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(args.output_dir, f"report.{ext}"))


def markdown(report):
    lines = [f"# nanodino GPU check ({report['mode']} mode)", "",
             f"`{report['command']}` at {report['started']}, {report['elapsed_s']:.0f} s of a "
             f"{report['budget_s']:g} s budget.",
             "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {i}. {p['name']} | {p['status']} | {fmt(p.get('seconds'))} |"
              for i, p in enumerate(report["parts"], 1)]
    for i, p in enumerate(report["parts"], 1):
        lines += ["", f"## {i}. {p['title']}: {p['status']} ({p['seconds']:.0f} s)", ""]
        lines += markdown_part(p["name"], p)
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--worker"]:  # a part's subprocess: --worker env | kernels | train ...
        return {"env": worker_env, "kernels": worker_kernels, "train": worker_train}[sys.argv[2]](sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what tests/test_gpu_check.py runs)")
    p.add_argument("--output_dir", default="runs/gpu_check", help="report.md, report.json, logs/, the runs")
    p.add_argument("--budget_s", type=float, default=480, help="total seconds; later parts get what is left")
    names = [name for name, _, _ in PARTS]
    p.add_argument("--parts", nargs="+", default=names, choices=names, help="the parts to run (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="the methods of parts 3 and 6 (the first one also runs with --compile true)")
    p.add_argument("--official", default="", help="folder with the official checkouts dino/ and SimDINO/")
    p.add_argument("--fashion_mnist", default="", help="folder with the Fashion-MNIST .gz files "
                                                       "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--fmnist_epochs", type=int, default=2, help="Fashion-MNIST epochs per method")
    p.add_argument("--fail_part", default="", help=argparse.SUPPRESS)  # tests: this part raises at its start
    args = p.parse_args()
    args.output_dir = os.path.abspath(args.output_dir)
    t0 = time.time()
    command = " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]])
    report = {"mode": "cpu" if args.cpu else "gpu", "command": command,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": args.budget_s,
              "elapsed_s": 0.0, "parts": []}
    write_report(args, report)
    for name, title, fn in PARTS:
        budget_left = args.budget_s - (time.time() - t0)
        limit = max(0.0, min(PART_LIMITS_S[name] if not args.cpu else 90, budget_left))
        print(f"[{time.time() - t0:5.0f} s] part {name}: {title} (limit {limit:.0f} s)", flush=True)
        start = time.time()
        if name not in args.parts:
            result = {"status": "skipped", "note": "not in --parts"}
        elif limit < 10:
            result = {"status": "skipped", "note": f"the budget (--budget_s {args.budget_s:g}) is spent"}
        else:
            try:
                if name == args.fail_part:
                    raise RuntimeError(f"forced failure of part {name} (--fail_part)")
                result = fn(args, start + limit)
            except Exception:
                result = {"status": "failed", "error": tail(traceback.format_exc())}
        result = {"name": name, "title": title, **result, "seconds": round(time.time() - start, 1)}
        print(f"[{time.time() - t0:5.0f} s] part {name}: {result['status']}", flush=True)
        report["parts"].append(result)
        report["elapsed_s"] = round(time.time() - t0, 1)
        write_report(args, report)
    print(f"report: {os.path.join(args.output_dir, 'report.md')} and report.json ({report['elapsed_s']:.0f} s)")
    failed = [p["name"] for p in report["parts"] if p["status"] in ("failed", "timed out")]
    if failed:
        print(f"failed or timed out: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
