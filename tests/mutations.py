"""Mutation check of the fast tests: would a plausible one-line bug be noticed?

A development check, not part of the suite (pytest collects test_*.py only; CI does not run it).
It never touches the checkout it reads: the repository's files are copied to a temporary folder,
one mutation at a time is applied there (file, exact old text -> new text), the test files named
for it run there with `pytest -x -q`, and the file is restored. A mutation is

    killed     a test failed: the bug is noticed
    survived   every test passed: the bug goes unnoticed
    stale      none of its old texts is in the file (the code changed: update the list)

Score = killed / (killed + survived). Before the mutations, all the targets run once unmutated
(once per deselection); a failure there marks the mutations "baseline fails" (not scored).

    python tests/mutations.py                       # this checkout's files as they are on disk
    python tests/mutations.py --rev HEAD            # the files of a commit (git archive)
    python tests/mutations.py --repo /tmp/old       # another checkout (e.g. a git worktree)
    python tests/mutations.py --only knn,sinkhorn   # the mutations whose id contains a word
    python tests/mutations.py --list                # the list, nothing run

The same copy can instead be handed to mutmut (PyPI `mutmut`, 3.x; a development tool, not in
requirements.txt), which mutates every expression of the named files and runs, for each mutant,
the fast tests that cover the function it is in:

    python -m pip install mutmut==3.8.1
    python tests/mutations.py --mutmut                              # MUTMUT_FILES x MUTMUT_TESTS
    python tests/mutations.py --mutmut --rev 025bf41 --mutmut_files dinov2.py

Its score is killed / (killed + survived); mutants in functions no selected test runs are counted
apart ("no tests"). Many of its survivors are equivalent (dim=-1 -> dim=+1 on a 2-D tensor).

Test targets that do not exist in the copy (a test file added later, when scoring an older commit)
are dropped; a mutation left with none is scored against nothing, i.e. it survives. Slow tests in
the named files (torchrun, subprocess runs) are deselected (DESELECT) unless a mutation's targets
carry their own "-k EXPR" (the global-batch ones run the torchrun tests).
A run of the whole list takes 20-40 minutes on 2 busy cores.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

DESELECT = "not torchrun and not bad_dinov2_flags and not one_line"
D = "tests/test_details.py::"

# test targets per area: the files that should notice a wrong detail there
CROPS = ["tests/test_data.py", D + "test_each_crop_gets_the_official_probabilities",
         D + "test_each_crop_gets_the_official_strengths", D + "test_recorded_operations_are_the_ones_applied",
         D + "test_solarize_inverts_at_or_above_128"]
VIT = ["tests/test_vit.py", "tests/test_dinov2.py", D + "test_pos_embed_resize_is_the_official_one",
       D + "test_token_layout_is_dinov2s", D + "test_token_init",
       D + "test_layer_norms_have_the_official_eps"]
FREEZE = ["tests/test_train.py", "tests/test_dino.py", D + "test_last_layer_is_frozen_for_the_first_epochs_only"]
KNN = ["tests/test_checkpoints.py", D + "test_knn_votes_are_exp_of_cosine_over_T", D + "test_knn_equals_the_official_classifier"]
V2LOSS = ["tests/test_dinov2.py", D + "test_sinkhorn_knopp_is_the_official_three_iterations",
          D + "test_koleo_on_duplicated_points_is_the_officials", D + "test_koleo_in_fp32_under_autocast",
          D + "test_ibot_weights_are_one_over_the_masked_count_of_each_image"]
MASKS = ["tests/test_dinov2.py", D + "test_block_masks_are_the_official_generator", D + "test_sample_masks_are_the_official_collate"]
GLOBAL = ["tests/test_simdino.py", "tests/test_dino.py", "tests/test_dinov2.py", "tests/test_coding_rate.py",
          D + "test_simdino_gamma_and_alpha_count_the_global_batch", D + "test_global_batch_counts_with_identical_ranks",
          D + "test_simdino_expansion_under_torchrun", "-k not bad_dinov2_flags and not one_line"]   # torchrun runs too
LOSS = ["tests/test_dino.py", "tests/test_simdino.py", "tests/test_dinov2.py", "tests/test_coding_rate.py"]
LOOP = ["tests/test_train.py", "tests/test_dino.py"]

# (id, file, [(old, new), ...] the first old text found is replaced, test targets)
MUTATIONS = [
    # -- multi-crop recipe (data.py) --------------------------------------------------------------
    ("crop-jitter-p-1.0", "data.py", [('coin("jitter", 0.8)', 'coin("jitter", 1.0)'), ("coin(0.8)", "coin(1.0)")], CROPS),
    ("crop-grey-p-0.1", "data.py", [('coin("grey", 0.2)', 'coin("grey", 0.1)'), ("coin(0.2)", "coin(0.1)")], CROPS),
    ("crop-global1-blur-p-0.5", "data.py", [("groups[0], g, blur_p=1.0", "groups[0], g, blur_p=0.5")], CROPS),
    ("crop-global2-blur-p-0.9-as-dinov2s-code", "data.py", [("groups[1], g, blur_p=0.1", "groups[1], g, blur_p=0.9")], CROPS),
    ("crop-global2-solarize-p-0.1", "data.py", [("blur_p=0.1, solarize_p=0.2", "blur_p=0.1, solarize_p=0.1")], CROPS),
    ("crop-solarize-on-global1", "data.py", [("blur_p=1.0, solarize_p=0.0", "blur_p=1.0, solarize_p=0.2")], CROPS),
    ("crop-local-blur-p-1.0", "data.py", [("groups[2], g, blur_p=0.5", "groups[2], g, blur_p=1.0")], CROPS),
    ("crop-flip-p-0.25", "data.py", [("flips = torch.rand(B * count, generator=g) < 0.5",
                                      "flips = torch.rand(B * count, generator=g) < 0.25")], CROPS),
    ("crop-local-scale-is-global", "data.py", [("(self.local_size, self.local_scale, self.local_number)",
                                                "(self.local_size, self.global_scale, self.local_number)")], CROPS),
    ("jitter-saturation-0.4", "data.py", [("saturation=0.2, hue=0.1", "saturation=0.4, hue=0.1")], CROPS),
    ("jitter-hue-0.5", "data.py", [("saturation=0.2, hue=0.1", "saturation=0.2, hue=0.5")], CROPS),
    ("blur-sigma-max-1.0", "data.py", [("blur_sigma=(0.1, 2.0)", "blur_sigma=(0.1, 1.0)")], CROPS),
    ("blur-where-inverted", "data.py", [('coin("blur", blur_p), gaussian_blur(x, sigma, self.blur_radius), x)',
                                         'coin("blur", blur_p), x, gaussian_blur(x, sigma, self.blur_radius))'),
                                        ('coin("blur", blur_p), gaussian_blur(x, sigma), x)', 'coin("blur", blur_p), x, gaussian_blur(x, sigma))'),
                                        ("coin(blur_p), gaussian_blur(x, sigma), x)", "coin(blur_p), x, gaussian_blur(x, sigma))")], CROPS),
    ("solarize-strictly-above-128", "data.py", [("torch.where(x >= 128 / 255, 1 - x, x)", "torch.where(x > 128 / 255, 1 - x, x)")], CROPS),
    ("contrast-mean-of-rgb", "data.py", [("(1 - c) * grey(x).mean((2, 3), keepdim=True)", "(1 - c) * x.mean((2, 3), keepdim=True)")], CROPS),
    # -- ViT tokens (vit.py) ----------------------------------------------------------------------
    ("pos-offset-default-0", "vit.py", [("interpolate_offset=0.1, interpolate_antialias=False,", "interpolate_offset=0.0, interpolate_antialias=False,")], VIT),
    ("pos-offset-dropped", "vit.py", [("scale_factor=((h + off) / side, (w + off) / side)", "scale_factor=(h / side, w / side)")], VIT),
    ("pos-h-w-swapped", "vit.py", [("scale_factor=((h + off) / side, (w + off) / side)", "scale_factor=((w + off) / side, (h + off) / side)")], VIT),
    ("pos-bilinear", "vit.py", [('F.interpolate(patch_pos.float(), mode="bicubic"', 'F.interpolate(patch_pos.float(), mode="bilinear"')], VIT),
    ("pos-antialias-default-on", "vit.py", [("interpolate_offset=0.1, interpolate_antialias=False,", "interpolate_offset=0.1, interpolate_antialias=True,")], VIT),
    ("pos-cls-loses-position", "vit.py", [("return torch.cat([pos[:, :1], patch_pos], dim=1)", "return torch.cat([0 * pos[:, :1], patch_pos], dim=1)")], VIT),
    ("registers-get-cls-position", "vit.py", [("self.register_tokens.expand(B, -1, -1), x[:, 1:]]", "(self.register_tokens + self.pos_embed[:, :1]).expand(B, -1, -1), x[:, 1:]]")], VIT),
    ("registers-after-patches", "vit.py", [("x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)",
                                            "x = torch.cat([x, self.register_tokens.expand(B, -1, -1)], dim=1)")], VIT),
    ("registers-init-0.02", "vit.py", [("nn.init.normal_(self.register_tokens, std=1e-6)", "nn.init.trunc_normal_(self.register_tokens, std=0.02)")], VIT),
    ("mask-token-init-random", "vit.py", [("nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token", "nn.Parameter(0.02 * torch.randn(1, embed_dim)) if use_mask_token")], VIT),
    ("final-norm-eps-1e-5", "vit.py", [("self.norm = nn.LayerNorm(embed_dim, eps=1e-6)", "self.norm = nn.LayerNorm(embed_dim, eps=1e-5)")], VIT),
    # -- last-layer freeze (train.py, the methods' param groups) -----------------------------------
    ("freeze-by-step-not-epoch", "train.py", [("if epoch < cfg.freeze_last_layer:", "if step < cfg.freeze_last_layer:")], FREEZE),
    ("freeze-never", "train.py", [("if epoch < cfg.freeze_last_layer:", "if epoch < 0:")], FREEZE),
    ("freeze-one-epoch-too-many", "train.py", [("if epoch < cfg.freeze_last_layer:", "if epoch <= cfg.freeze_last_layer:")], FREEZE),
    ("freeze-modes-swapped", "train.py", [('g.get("freeze", "grad") == "grad"', 'g.get("freeze", "grad") == "lr"')], FREEZE),
    ("freeze-lr-mode-no-op", "train.py", [('            g["lr"] = 0.0\n', '            g["lr"] = g["lr"]\n')], FREEZE),
    ("dinov2-freezes-by-gradient", "dinov2.py", [('freeze="lr")', 'freeze="grad")')], FREEZE),
    ("last-layer-untagged", "dino.py", [('last = "last_layer" in name', "last = False"),
                                        ('"last_layer" in name, lr_mult(name)', "False, lr_mult(name)")], FREEZE),
    ("last-layer-only-weight-v", "dino.py", [('last = "last_layer" in name', 'last = name.endswith("last_layer.weight_v")'),
                                             ('"last_layer" in name, lr_mult(name)', 'name.endswith("last_layer.weight_v"), lr_mult(name)')], FREEZE),
    # -- k-NN (eval.py) ---------------------------------------------------------------------------
    ("knn-majority-vote", "eval.py", [("labels[:, :k], (sim[:, :k] / T).exp())", "labels[:, :k], torch.ones_like(sim[:, :k]))")], KNN),
    ("knn-linear-weights", "eval.py", [("labels[:, :k], (sim[:, :k] / T).exp())", "labels[:, :k], sim[:, :k] / T)")], KNN),
    ("knn-no-temperature", "eval.py", [("labels[:, :k], (sim[:, :k] / T).exp())", "labels[:, :k], sim[:, :k].exp())")], KNN),
    ("knn-train-not-normalised", "eval.py", [("train_features = F.normalize(train_features, dim=1)", "train_features = train_features.float()")], KNN),
    ("knn-test-not-normalised", "eval.py", [("test_features = F.normalize(test_features, dim=1)", "test_features = test_features.float()")], KNN),
    ("knn-farthest-neighbours", "eval.py", [("(q @ train_features.T).topk(min(k, len(train_features)), dim=1)", "(q @ train_features.T).topk(min(k, len(train_features)), dim=1, largest=False)")], KNN),
    ("knn-top5-is-top3", "eval.py", [("votes.topk(min(5, num_classes), dim=1)", "votes.topk(min(3, num_classes), dim=1)")], KNN),
    # -- DINOv2's losses (dinov2.py) --------------------------------------------------------------
    ("sinkhorn-5-iterations", "dinov2.py", [("def sinkhorn_knopp(logits, teacher_temp, n_iterations=3):", "def sinkhorn_knopp(logits, teacher_temp, n_iterations=5):")], V2LOSS),
    ("sinkhorn-columns-first", "dinov2.py", [("Q /= dist.all_reduce_sum(Q.sum(dim=1, keepdim=True))", "Q /= dist.all_reduce_sum(Q.sum(dim=0, keepdim=True))")], V2LOSS),
    ("sinkhorn-temperature-multiplies", "dinov2.py", [("torch.exp(logits.float() / teacher_temp).T", "torch.exp(logits.float() * teacher_temp).T")], V2LOSS),
    ("koleo-no-eps-in-distance", "dinov2.py", [("(x - x[nn_index] + eps).norm(dim=-1)", "(x - x[nn_index]).norm(dim=-1)")], V2LOSS),
    ("koleo-no-eps-in-log", "dinov2.py", [("-torch.log(distance + eps).mean()", "-torch.log(distance).mean()")], V2LOSS),
    ("koleo-self-as-neighbour", "dinov2.py", [("dots.fill_diagonal_(-1)", "dots.fill_diagonal_(0)")], V2LOSS),
    ("koleo-under-autocast", "dinov2.py", [("with torch.autocast(x.device.type, enabled=False):\n        x = F.normalize",
                                            "with torch.autocast(x.device.type, enabled=True):\n        x = F.normalize")], V2LOSS),
    ("koleo-not-normalised", "dinov2.py", [("x = F.normalize(x.float(), dim=-1, eps=eps)", "x = x.float()")], V2LOSS),
    ("ibot-weights-global-count", "dinov2.py", [("(1.0 / masks.sum(-1).clamp(min=1))", "(1.0 / masks.sum().clamp(min=1))")], V2LOSS),
    ("ibot-weights-uniform", "dinov2.py", [("(1.0 / masks.sum(-1).clamp(min=1))", "(1.0 + 0 * masks.sum(-1))")], V2LOSS),
    ("ibot-mean-over-patches", "dinov2.py", [("(teacher_patch_probs * log_ps).sum(dim=-1)).sum() / n_images", "(teacher_patch_probs * log_ps).sum(dim=-1)).mean()")], V2LOSS),
    # -- block masks (data.py) --------------------------------------------------------------------
    ("mask-min-aspect-0.5", "data.py", [("min_patches=4, max_patches=None, min_aspect=0.3", "min_patches=4, max_patches=None, min_aspect=0.5")], MASKS),
    ("mask-aspect-only-tall", "data.py", [("log_aspect = (math.log(min_aspect), -math.log(min_aspect))", "log_aspect = (math.log(min_aspect), 0.0)")], MASKS),
    ("mask-min-patches-1", "data.py", [("min_patches=4, max_patches=None, min_aspect=0.3", "min_patches=1, max_patches=None, min_aspect=0.3")], MASKS),
    ("mask-block-may-fill-grid", "data.py", [("if bw < w and bh < h:", "if bw <= w and bh <= h:")], MASKS),
    ("mask-one-try", "data.py", [("        for _ in range(10):\n            area, aspect", "        for _ in range(1):\n            area, aspect")], MASKS),
    ("mask-overlap-unbounded", "data.py", [("if 0 < new <= room:", "if 0 < new:")], MASKS),
    ("mask-room-ignores-cap", "data.py", [("room = min(n_mask - count, max_patches)", "room = n_mask - count")], MASKS),
    ("mask-cap-whole-grid", "data.py", [("max_patches=int(0.5 * N)", "max_patches=N")], MASKS),
    ("mask-ratio-not-sliced", "data.py", [("ratio = edges[i] + (edges[i + 1] - edges[i]) * torch.rand", "ratio = edges[0] + (edges[-1] - edges[0]) * torch.rand")], MASKS),
    # -- the global batch under DDP ---------------------------------------------------------------
    ("simdino-gamma-local-batch", "simdino.py", [("n = dist.world_size() * B", "n = B")], GLOBAL),
    ("coding-rate-alpha-local-batch", "kernels/coding_rate.py", [("n_global = n * dist.world_size()", "n_global = n")], GLOBAL),
    ("center-local-count", "dino.py", [("batch_sum / (teacher_out.shape[0] * dist.world_size())", "batch_sum / teacher_out.shape[0]")], GLOBAL),
    ("patch-center-summed-over-ranks", "dinov2.py", [("x.float().mean(dim=0, keepdim=True)) / dist.world_size()", "x.float().mean(dim=0, keepdim=True))")], GLOBAL),
    ("sinkhorn-rows-not-reduced", "dinov2.py", [("Q /= dist.all_reduce_sum(Q.sum(dim=1, keepdim=True))", "Q /= Q.sum(dim=1, keepdim=True)")], GLOBAL),
    # -- loss formulas, EMA, schedules, clipping (guarded before this list was written) ------------
    ("dino-center-added", "dino.py", [("((teacher_out.float() - center) / teacher_temp)", "((teacher_out.float() + center) / teacher_temp)")], LOSS),
    ("dino-same-view-pairs-counted", "dino.py", [("if s == t:  # the same view: skipped", "if s == t and False:")], LOSS),
    ("center-momentum-swapped", "dino.py", [("center * momentum + batch_center * (1 - momentum)", "center * (1 - momentum) + batch_center * momentum")], LOSS),
    ("simdino-same-view-pairs-counted", "simdino.py", [("if s == t:  # the same view: skipped", "if s == t and False:")], LOSS),
    ("simdino-gamma-inverted", "simdino.py", [("gamma = (d + n) / (d * n)", "gamma = (d * n) / (d + n)")], LOSS),
    ("simdino-expa-mean-not-halved", "simdino.py", [("z = (z + teacher_out.detach().view(2, B, d)) / 2", "z = z + teacher_out.detach().view(2, B, d)")], LOSS),
    ("coding-rate-eps-squared", "kernels/coding_rate.py", [("alpha = d / (n_global * eps)", "alpha = d / (n_global * eps ** 2)")], LOSS),
    ("ema-momentum-swapped", "train.py", [("torch._foreach_lerp_(t, s, 1.0 - momentum)", "torch._foreach_lerp_(t, s, momentum)")], LOOP),
    ("cosine-half-period", "train.py", [("return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))", "return final + 0.5 * (base - final) * (1 + math.cos(0.5 * math.pi * t))")], LOOP),
    ("warmup-endpoint", "train.py", [("(step / (warmup_steps - 1) if warmup_steps > 1 else 0.0)", "(step / warmup_steps if warmup_steps > 1 else 0.0)")], LOOP),
    ("lr-scaling-512", "train.py", [("cfg.lr * batch / 256", "cfg.lr * batch / 512")], LOOP),
    ("clip-min-not-max", "train.py", [("torch.clamp(clip / (n + 1e-6), max=1.0)", "torch.clamp(clip / (n + 1e-6), min=1.0)")], LOOP),
    ("teacher-temp-warmup-endpoint", "train.py", [("(epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0)", "(epoch / warmup_epochs if warmup_epochs > 1 else 0.0)")], LOOP),
]


# mutmut: the files it mutates and the fast tests it may run (each mutant: those covering it)
# (not tests/test_coding_rate.py: mutmut 3.8 re-selects tests by id and mangles its non-ASCII ids
# "n×n-side", so every mutant it runs them on counts as killed; kernels/coding_rate.py goes with it)
MUTMUT_FILES = ["data.py", "vit.py", "dino.py", "simdino.py", "dinov2.py"]
MUTMUT_TESTS = ["tests/test_data.py", "tests/test_vit.py", "tests/test_dino.py", "tests/test_simdino.py",
                "tests/test_dinov2.py", "tests/test_train.py", "tests/test_details.py"]


def run_mutmut(args, root):
    """mutmut run in the copy (its mutants/ folder is made there), then its per-mutant results."""
    files = args.mutmut_files.split(",") if args.mutmut_files else MUTMUT_FILES
    tests = [t for t in MUTMUT_TESTS if os.path.exists(os.path.join(root, t))]
    others = sorted(p for p in os.listdir(root) if (p.endswith(".py") and p not in files) or
                    (os.path.isdir(os.path.join(root, p)) and p not in ("tests", ".ci") and not p.startswith(".")))
    block = lambda items: "".join(f"\n    {x}" for x in items)
    with open(os.path.join(root, "setup.cfg"), "w") as f:
        f.write(f"[mutmut]\nsource_paths={block(files)}\nalso_copy={block(others)}\n"
                f"pytest_add_cli_args_test_selection={block(tests)}\n"
                f"pytest_add_cli_args={block(['-p', 'no:cacheprovider', '-k', DESELECT])}\n")
    mutmut = [args.mutmut_bin] if args.mutmut_bin else [sys.executable, "-m", "mutmut"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    try:
        subprocess.run([*mutmut, "run", "--max-children", str(args.jobs)], cwd=root, env=env,
                       stdout=subprocess.DEVNULL, timeout=args.mutmut_timeout or None)
    except subprocess.TimeoutExpired:   # the mutants not reached stay "not checked"
        print(f"mutmut stopped after {args.mutmut_timeout:.0f} s", flush=True)
    out = subprocess.run([*mutmut, "results", "--all", "true"], cwd=root, env=env, capture_output=True, text=True).stdout
    status = {}
    for line in out.splitlines():
        name, _, result = line.strip().rpartition(": ")
        if name:
            status[name] = result
    counts = {}
    for name, result in status.items():
        module = name.split(".x")[0]
        counts.setdefault(module, {}).setdefault(result, 0)
        counts[module][result] += 1
    print(f"| module | killed | survived | no tests | other |\n|---|---|---|---|---|")
    total = {}
    for module, c in sorted(counts.items()):
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "no tests"))
        print(f"| {module} | {c.get('killed', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | {other} |")
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    killed, survived = total.get("killed", 0), total.get("survived", 0)
    print(f"\nmutmut score: {killed}/{killed + survived} killed ({100 * killed / max(killed + survived, 1):.0f} %); "
          f"{total.get('no tests', 0)} mutants in code no selected test runs; other: "
          f"{ {k: v for k, v in total.items() if k not in ('killed', 'survived', 'no tests')} }; {time.time() - t0:.0f} s")
    print("tests: " + " ".join(tests))


def copy_repo(args, dest):
    """The files to mutate, into dest: a commit's (git archive) or a checkout's tracked files."""
    if args.rev:
        archive = subprocess.run(["git", "-C", args.repo, "archive", args.rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        return
    files = subprocess.run(["git", "-C", args.repo, "ls-files", "-z"], check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(args.repo, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def existing(root, targets):
    """The targets present in root ("-k EXPR" entries kept: they choose the deselection)."""
    return [t for t in targets if t.startswith("-k ") or os.path.exists(os.path.join(root, t.split("::")[0]))]


def run_tests(root, targets, timeout):
    """pytest -x -q on the targets in root -> (every test passed, the test that failed)."""
    select = next((t[3:] for t in targets if t.startswith("-k ")), DESELECT)
    targets = [t for t in targets if not t.startswith("-k ")]
    if not targets:
        return True, ""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", select, *targets]
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"   # a mutation that hangs the tests is noticed
    if r.returncode == 0 or r.returncode == 5 and "deselected" in r.stdout:   # 5: all deselected
        return True, ""
    failed = [line.split()[1] for line in r.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return False, failed[0] if failed else f"pytest exit {r.returncode}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--rev", default="", help="mutate the files of this commit instead of the checkout")
    parser.add_argument("--only", default="", help="comma-separated words: the mutations whose id contains one")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    parser.add_argument("--mutmut", action="store_true", help="run mutmut on the copy instead of the list")
    parser.add_argument("--mutmut_files", default="", help="comma-separated files for mutmut (default MUTMUT_FILES)")
    parser.add_argument("--mutmut_bin", default="", help="the mutmut executable (default: python -m mutmut)")
    parser.add_argument("--jobs", type=int, default=2, help="mutmut's parallel workers")
    parser.add_argument("--mutmut_timeout", type=float, default=0, help="stop mutmut after this many seconds")
    args = parser.parse_args()
    if args.mutmut:
        with tempfile.TemporaryDirectory(prefix="nanodino-mutmut-") as root:
            copy_repo(args, root)
            run_mutmut(args, root)
        return
    words = [w for w in args.only.split(",") if w]
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    if args.list:
        for mid, path, _, targets in chosen:
            print(f"{mid:42s} {path:24s} {' '.join(t.replace(D, 'details::') for t in targets)}")
        return
    with tempfile.TemporaryDirectory(prefix="nanodino-mutations-") as root:
        copy_repo(args, root)
        union = {}   # -k expression -> every target run with it: one unmutated run each
        for _, _, _, targets in chosen:
            targets = existing(root, targets)
            select = next((t for t in targets if t.startswith("-k ")), "")
            union.setdefault(select, {}).update(dict.fromkeys(t for t in targets if not t.startswith("-k ")))
        clean = {}
        for select, files in union.items():
            clean[select], failed = run_tests(root, [*files, select] if select else list(files), args.timeout)
            if not clean[select]:
                print(f"baseline fails ({failed}): {' '.join(union[select])} {select}", flush=True)
        baseline = lambda targets: clean[next((t for t in targets if t.startswith("-k ")), "")]
        rows, t0 = [], time.time()
        for mid, path, edits, targets in chosen:
            file = os.path.join(root, path)
            source = open(file).read() if os.path.exists(file) else ""
            found = [(old, new) for old, new in edits if source.count(old) == 1]
            targets = existing(root, targets)
            failed = ""
            if not found:
                status = "ambiguous" if any(source.count(old) > 1 for old, _ in edits) else "stale"
            elif not baseline(targets):
                status = "baseline fails"
            else:
                old, new = found[0]
                with open(file, "w") as f:
                    f.write(source.replace(old, new))
                try:
                    passed, failed = run_tests(root, targets, args.timeout)
                    status = "survived" if passed else "killed"
                finally:
                    with open(file, "w") as f:
                        f.write(source)
            rows.append((mid, path, status, failed))
            print(f"{status:14s} {mid:42s} {path:22s} {failed}", flush=True)
    killed = sum(r[2] == "killed" for r in rows)
    survived = [r for r in rows if r[2] == "survived"]
    print("\n| mutation | file | result | first failing test |\n|---|---|---|---|")
    for mid, path, status, failed in rows:
        print(f"| {mid} | {path} | {status} | {failed.replace('tests/', '')} |")
    scored = killed + len(survived)
    print(f"\nscore: {killed}/{scored} killed ({100 * killed / max(scored, 1):.0f} %); "
          f"{sum(r[2] in ('stale', 'ambiguous') for r in rows)} stale or ambiguous, "
          f"{sum(r[2] == 'baseline fails' for r in rows)} with failing baselines; {time.time() - t0:.0f} s")
    if survived:
        print("survived: " + ", ".join(r[0] for r in survived))


if __name__ == "__main__":
    main()
