"""Classroom exercises: re-implement one piece of a method, checked by the project's own tests.

    python tools/exercises.py                 # the list
    python tools/exercises.py 3               # exercise 3: writes your copy (once), then runs its tests
    python tools/exercises.py 3 --show        # the statement only
    python tools/exercises.py 3 --reset       # start exercise 3 over (your copy is replaced)
    python tools/exercises.py 3 --solution    # the same tests on the project's own code
    python tools/exercises.py --verify        # every stub fails its tests, every solution passes (CI)

`python tools/exercises.py N` copies the project (its .py files and tests) to exercises/NN_name/ with
the body of one function replaced by `raise NotImplementedError`; its docstring stays. Write the
body there, in place, and run the same command again until the tests pass. The copy is a whole
project: `cd exercises/01_dino_loss && python dino.py` trains with your code. docs/READING.md
says what to read before each exercise.
"""
import argparse
import ast
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
COPIED = ("*.py", "kernels/*.py", "tools/*.py", "tests/*.py")   # what a student copy holds


@dataclass
class Exercise:
    name: str
    path: str            # file, relative to the project root
    function: str        # qualified name in that file: "f" or "Class.method"
    reference: str       # where the paper writes it
    statement: str       # what to implement, with the shapes
    tests: tuple         # pytest node ids that fail on the stub and pass on the solution


def _in(test_file, *names):
    """pytest node ids: the tests `names` of tests/`test_file`."""
    return tuple(f"tests/{test_file}::{name}" for name in names)


EXERCISES = [
    Exercise("dino_loss", "dino.py", "cross_entropy_pairs", "DINO Eq. 3 and Algorithm 1",
             "The multi-crop cross-entropy: for each teacher global view t (2) and each student view s ≠ t (V), the "
             "batch mean of H(P_t, P_s) = −Σ_k P_t·log P_s with P_s = softmax(s/τ_s), averaged over the 2V−2 pairs. "
             "student_out (V·B, K) logits, views stacked; teacher_probs (2·B, K), already centred and sharpened; "
             "returns a scalar. No gradient may reach the teacher.",
             _in("test_dino.py", "test_dino_loss_matches_the_paper_formula", "test_dino_loss_skips_same_view_pairs",
                 "test_teacher_gets_no_gradient_and_student_does")),
    Exercise("center", "dino.py", "update_center", "DINO Eq. 4",
             "The centre's EMA: C ← m·C + (1−m)·(1/B)·Σᵢ g_θt(xᵢ), the mean over the global batch, i.e. summed over "
             "all ranks with dist.all_reduce_sum and divided by the batch of all ranks. center (1, K), teacher_out "
             "(n, K); returns the new centre (1, K), in fp32.",
             _in("test_dino.py", "test_center_update", "test_step_updates_center_and_returns_logs")),
    Exercise("ema", "train.py", "ema_update", "DINO §3.1, teacher network",
             "The momentum teacher: θ_t ← λ·θ_t + (1−λ)·θ_s for every parameter, in place, without autograd. "
             "student, teacher: two modules with the same parameters; λ = momentum.",
             _in("test_train.py", "test_ema_update")),
    Exercise("cosine_schedule", "train.py", "cosine_schedule", "DINO §3.2 (implementation details); official "
             "utils.cosine_scheduler",
             "The value of a schedule at one step: a linear warm-up from warmup_start to base over warmup_steps "
             "(np.linspace endpoints: step warmup_steps−1 is exactly base), then a half cosine from base to final "
             "over the remaining steps: final + ½·(base − final)·(1 + cos(π·t/T)). Returns a float.",
             _in("test_train.py", "test_cosine_schedule_matches_official", "test_schedules_scale_lr_with_batch")),
    Exercise("multicrop_forward", "dino.py", "MultiCropNet.forward", "DINO §3.1, multi-crop; official "
             "MultiCropWrapper",
             "One backbone forward per run of consecutive crops of the same size (the 2 global crops together, then "
             "the local crops together), then one head forward on all CLS features. crops: list of V tensors "
             "(B, 3, S, S); returns (V·B, K), views in order.",
             _in("test_dino.py", "test_multicrop_forward_groups_by_resolution",
                 "test_step_updates_center_and_returns_logs")),
    Exercise("pos_embed", "vit.py", "VisionTransformer.interpolate_pos_encoding", "DINO §3.2 / official "
             "interpolate_pos_encoding",
             "The learned position embedding (1, 1 + side², D) resized to an h×w patch grid: the class token's "
             "embedding unchanged, the side×side grid resized bicubically (with self.interpolate_offset added to "
             "the target size in the scale factor, or the exact size when it is 0; antialias = "
             "self.interpolate_antialias). Returns (1, 1 + h·w, D).",
             _in("test_vit.py", "test_pos_embed_interpolation", "test_output_shapes_at_any_input_size")),
    Exercise("alignment", "simdino.py", "alignment", "SimDINO: the alignment term of the SimDINO loss "
             "(official MCRLoss)",
             "The alignment term: the mean cosine similarity between teacher global view t and student view s ≠ t, "
             "averaged over the batch and over the 2V−2 pairs. student_out (V·B, d), teacher_out (2·B, d); returns "
             "a scalar; the teacher gets no gradient.",
             _in("test_simdino.py", "test_alignment_matches_the_formula_and_skips_same_view",
                 "test_teacher_features_get_no_gradient")),
    Exercise("expansion", "simdino.py", "expansion", "SimDINO: the γ·R_ε term of the SimDINO loss",
             "The expansion term γ·R over the two global views: Z = the student's global features (2, B, d), or "
             "with expa_type 1 their mean with the (detached) teacher's; R = coding_rate(Z, eps, reduce_cov), "
             "averaged over the 2 views; γ = (d + N·m)/(d·N·m) with N·m = world_size·B. Returns (γ·R, R).",
             _in("test_simdino.py", "test_expansion_gamma_and_expa_type",
                 "test_step_loss_is_the_sum_of_its_logged_terms")),
    Exercise("coding_rate", "kernels/coding_rate.py", "_CodingRate.forward", "SimDINO: the coding rate R_ε "
             "(MCR², Yu et al. 2020)",
             "R = ½·logdet(I + α·G) per leading index of Z (..., n, d), by Cholesky: M = L·Lᵀ, ½·logdet M = Σ log "
             "Lᵢᵢ. G = Z·Zᵀ (n×n, Sylvester) when n < d and not reduce_cov, else Zᵀ·Z (d×d), all-reduced when "
             "reduce_cov. R is NaN where the factorisation fails (non-finite input): no host check. Save Z and L, set "
             "ctx.alpha, ctx.n_side, ctx.reduce_cov for the backward. Returns R (...).",
             _in("test_coding_rate.py", "test_value_and_gradient_match_logdet_reference",
                 "test_sylvester_side_equals_d_side", "test_rank_one_input_is_finite",
                 "test_non_finite_input_gives_nan_without_a_host_sync")),
    Exercise("coding_rate_backward", "kernels/coding_rate.py", "_CodingRate.backward", "d(½·logdet M) = "
             "½·tr(M⁻¹·dM); kernels/coding_rate.py docstring",
             "The analytic gradient, one cholesky_solve against the saved L: dR/dZ = α·Z·M⁻¹ (d×d side) or α·M⁻¹·Z "
             "(n×n side), times the incoming g (...) broadcast over the last two dims; with reduce_cov, g is first "
             "summed over ranks. Returns (dZ, None, None).",
             _in("test_coding_rate.py", "test_gradcheck_analytic_backward",
                 "test_value_and_gradient_match_logdet_reference")),
    Exercise("online_softmax", "kernels/attention.py", "_online_softmax_step", "FlashAttention-2 (Dao 2023) "
             "Algorithm 1, the loop over key blocks",
             "One step of the online softmax, in Triton (runs in its CPU interpreter): given the scores s = "
             "Sᵢⱼ·log₂e (B_r, B_c), the values v (B_c, d), the running row max m (B_r,), row sum ℓ (B_r,) and "
             "unnormalised output Õ (B_r, d), return the new (m, ℓ, Õ). Use tl.exp2 (scores are in base 2) and "
             "tl.dot(p.to(v.dtype), v, input_precision=PRECISION).",
             _in("test_attention.py", "test_triton_interpreted_matches_math_out_and_grads")),
    Exercise("sinkhorn_knopp", "dinov2.py", "sinkhorn_knopp", "DINOv2 §4, Sinkhorn-Knopp centering "
             "(SwAV, Caron et al. 2020)",
             "Teacher targets: Q = exp(logits/τ_t)ᵀ (K, n), normalised to total mass 1, then n_iterations times: "
             "each prototype row to mass 1/K, each sample column to 1/B; every sum over samples all-reduced "
             "(B counts all ranks). logits (n, K); returns (n, K) with rows summing to 1.",
             _in("test_dinov2.py", "test_sinkhorn_knopp_marginals")),
    Exercise("koleo", "dinov2.py", "koleo_loss", "DINOv2 §4, KoLeo regularizer (Sablayrolles et al. 2019)",
             "L_koleo = −(1/n)·Σᵢ log(d_n,i), d_n,i = ‖xᵢ − x_nn(i)‖ the distance to the nearest other point, on "
             "L2-normalised x (n, D), in fp32, eps as PairwiseDistance. Returns a scalar.",
             _in("test_dinov2.py", "test_koleo_against_its_formula")),
    Exercise("block_mask", "data.py", "block_mask", "DINOv2 §4, patch-level objective (iBOT's masking, BEiT's "
             "blockwise masking)",
             "An (h, w) bool mask of about n_mask patches made of random rectangles: area uniform in [min_patches, "
             "room], log-aspect uniform in [log min_aspect, −log min_aspect], a rectangle kept only when it adds "
             "1..room new patches, 10 tries per block, stop when none fits. All randomness from the generator g.",
             _in("test_dinov2.py", "test_block_masks_stay_in_bounds", "test_blocks_have_the_official_aspect_bounds")),
    Exercise("ibot_loss", "dinov2.py", "ibot_loss", "DINOv2 §4, patch-level objective",
             "L_iBOT over the masked patches: −Σ_masked w·Σ_k P_t·log P_s with P_s = softmax(s/τ_s), w = 1/#masked "
             "patches of the patch's image, divided by n_images. student_patch_out (M, K) logits, "
             "teacher_patch_probs (M, K), weights (M,). Scalar.",
             _in("test_dinov2.py", "test_ibot_loss_against_a_transcription")),
    Exercise("patch_alignment", "simdinov2.py", "patch_alignment", "SimDINO: SimDINOv2's patch term",
             "SimDINOv2's patch term: the cosine similarity between student and (detached) teacher head outputs at "
             "each masked patch, weighted by w = 1/#masked of its image, summed and divided by n_images. "
             "student/teacher_patch_out (M, d), weights (M,). Scalar.",
             _in("test_simdinov2.py", "test_patch_loss_against_a_transcription",
                 "test_step_is_cls_loss_plus_patch_loss")),
    Exercise("drop_add_residual", "vit.py", "drop_add_residual", "DINOv2 §5, efficient stochastic depth "
             "(official drop_add_residual_stochastic_depth)",
             "x + branch(x) with stochastic depth at rate p, the branch run only on the kept samples: k = "
             "max(⌊B(1−p)⌋, 1) samples drawn with torch.randperm, their branch output scaled by B/k and added to "
             "their rows (torch.index_add); the other samples pass unchanged. x (B, T, D); branch maps (k, T, D) to "
             "(k, T, D). Same expectation as DropPath.",
             _in("test_vit.py", "test_efficient_drop_path_has_the_plain_expectation",
                 "test_efficient_drop_path_equals_plain_on_the_kept_samples")),
]


# ----------------------------------------------------------------------------------------------
# Stubs: the function's body replaced, its signature, decorators and docstring kept.

def find_function(tree, qualname):
    """The FunctionDef of `qualname` ("f" or "Class.method"), also inside `if` blocks."""
    def members(body):   # a body's statements, those of its `if` blocks included
        for node in body:
            yield from members(node.body + node.orelse) if isinstance(node, ast.If) else [node]
    node = tree
    for name in qualname.split("."):
        node = next((m for m in members(node.body) if isinstance(m, (ast.FunctionDef, ast.ClassDef))
                     and m.name == name), None)
        if node is None:
            break
    if not isinstance(node, ast.FunctionDef):
        raise LookupError(f"no function {qualname}")
    return node


def stub_source(source, ex, number):
    """The file's source with ex.function's body (after its docstring) replaced by a raise."""
    fn = find_function(ast.parse(source), ex.function)
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body   # the statements to remove
    indent = " " * fn.body[0].col_offset
    stub = (f"{indent}# Exercise {number} ({ex.name}): write this body. `python tools/exercises.py {number} --show`\n"
            f"{indent}raise NotImplementedError(\"exercise {number}: {ex.function} is yours to write\")\n")
    lines = source.splitlines(keepends=True)
    start = body[0].lineno - 1 if body else fn.end_lineno   # 0-based first line of the body
    return "".join(lines[:start]) + stub + "".join(lines[fn.end_lineno:])


def copy_project(dest, number=None):
    """The project's files (COPIED) into dest; with `number`, that exercise's function stubbed."""
    for pattern in COPIED:
        for src in glob.glob(os.path.join(ROOT, pattern)):
            rel = os.path.relpath(src, ROOT)
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    if number is not None:
        ex = EXERCISES[number - 1]
        path = Path(dest, ex.path)
        path.write_text(stub_source(path.read_text(encoding="utf-8"), ex, number), encoding="utf-8")


def run_tests(tests, cwd, quiet=False, threads=None):
    """pytest on the given node ids inside `cwd`; returns (passed, output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the copy's modules, not ours
    if threads:   # runs side by side: OpenMP threads that outnumber the cores spin and stall each other
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=quiet, text=True)
    return proc.returncode == 0, (proc.stdout or "") + (proc.stderr or "")


# ----------------------------------------------------------------------------------------------
# Commands

def describe(number):
    ex = EXERCISES[number - 1]
    return (f"Exercise {number}: {ex.name} — {ex.path}:{ex.function}\n"
            f"Paper: {ex.reference}\n\n{textwrap.fill(ex.statement, 96)}\n\nTests:\n  " + "\n  ".join(ex.tests))


def verify_one(number):
    """Why exercise `number` fails the check, or "": each of its tests must fail on the stub, with the
    stub's own NotImplementedError."""
    ex = EXERCISES[number - 1]
    with tempfile.TemporaryDirectory() as tmp:
        copy_project(tmp, number)
        stub_passed, out = run_tests(ex.tests, tmp, quiet=True, threads=1)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if stub_passed or " passed" in summary:
        return f"exercise {number} ({ex.name}): a test passes on the stub: {summary}"
    if f"exercise {number}:" not in out:
        return f"exercise {number} ({ex.name}): the stub fails for another reason:\n{out[-2000:]}"
    return ""


def verify(numbers):
    """Every stub fails its tests (with its own NotImplementedError); all solutions pass."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        failures = [why for why in pool.map(verify_one, numbers) if why]
    tests = sorted({t for n in numbers for t in EXERCISES[n - 1].tests})
    with tempfile.TemporaryDirectory() as tmp:
        copy_project(tmp)
        solutions_pass, out = run_tests(tests, tmp, quiet=True)
    if not solutions_pass:
        failures.append(f"the solutions fail their tests:\n{out[-3000:]}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("number", nargs="?", type=int, help="the exercise (1..%d)" % len(EXERCISES))
    p.add_argument("--show", action="store_true", help="print the statement only")
    p.add_argument("--reset", action="store_true", help="replace your copy by a fresh stub")
    p.add_argument("--solution", action="store_true", help="run the tests on the project's own code")
    p.add_argument("--verify", action="store_true", help="check every exercise: stub fails, solution passes")
    args = p.parse_args(argv)

    if args.verify:
        failures = verify(range(1, len(EXERCISES) + 1))
        print("\n".join(failures) or f"all {len(EXERCISES)} exercises: the stub fails, the solution passes")
        return 1 if failures else 0
    if args.number is None:
        for i, ex in enumerate(EXERCISES, 1):
            print(f"{i:3d}  {ex.name:22s} {ex.path + ':' + ex.function:48s} {ex.reference}")
        print("\npython tools/exercises.py N    writes exercises/NN_name/ (once) and runs exercise N's tests there")
        return 0
    if not 1 <= args.number <= len(EXERCISES):
        p.error(f"no exercise {args.number}: choose 1..{len(EXERCISES)}")
    n, ex = args.number, EXERCISES[args.number - 1]
    if args.show:
        print(describe(n))
        return 0
    if args.solution:
        return 0 if run_tests(ex.tests, ROOT)[0] else 1
    dest = os.path.join(ROOT, "exercises", f"{n:02d}_{ex.name}")
    yours = os.path.relpath(os.path.join(dest, ex.path))
    if args.reset and os.path.isdir(dest):
        shutil.rmtree(dest)
    if not os.path.isdir(dest):
        copy_project(dest, n)
        print(describe(n))
        print(f"\nYour copy: {os.path.relpath(dest)}/ — write the body of {ex.function} in {yours}, "
              f"then run this command again.\n")
    passed = run_tests(ex.tests, dest)[0]
    print(f"\nexercise {n} ({ex.name}): " + ("solved — the tests pass" if passed else
          f"not yet — edit {yours} and run `python tools/exercises.py {n}` again"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
