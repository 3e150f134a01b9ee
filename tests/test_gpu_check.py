"""benchmarks/gpu_check.py in its CPU mode (--cpu), run as subprocesses into tmp_path: the report
(report.json and report.md) has every part in order with a status, the kernel checks passed, the
four methods ran with finite losses, a part forced to fail (--fail_part) is recorded as failed
while the parts after it still run, and Fashion-MNIST (a tiny fake copy in its file format) ends
in k-NN numbers next to the two baselines. The two runs go side by side: about 35 s on 2 cores."""
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

PART_NAMES = ["environment", "kernels", "methods", "benchmarks", "official", "fashion_mnist"]


def write_idx(path, array):
    """The idx format of the Fashion-MNIST files (big-endian dims after a 4-byte magic), gzipped."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def start_cpu_mode(out, *flags):
    return subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--output_dir", str(out), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, out):
    stdout, stderr = proc.communicate(timeout=300)
    report = json.loads((out / "report.json").read_text())
    return {"rc": proc.returncode, "stdout": stdout + stderr, "report": report, "md": (out / "report.md").read_text()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two CPU-mode runs at once: all parts with the first one forced to fail, and Fashion-MNIST
    alone (SimDINO) on 64 + 32 random images."""
    base = tmp_path_factory.mktemp("gpu_check")
    fake = base / "fashion"
    fake.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(fake / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(fake / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    whole = start_cpu_mode(base / "whole", "--fail_part", "environment")
    fashion = start_cpu_mode(base / "fashion_only", "--parts", "fashion_mnist", "--methods", "simdino",
                             "--fashion_mnist", str(fake))
    return {"whole": finish(whole, base / "whole"), "fashion": finish(fashion, base / "fashion_only")}


def test_every_part_in_order_with_a_status(runs):
    report, md = runs["whole"]["report"], runs["whole"]["md"]
    assert [p["name"] for p in report["parts"]] == PART_NAMES
    assert all(p["status"] in ("ok", "failed", "timed out", "skipped") for p in report["parts"])
    assert report["mode"] == "cpu" and report["elapsed_s"] > 0
    for i, p in enumerate(report["parts"], 1):  # the markdown has each part's row and section
        assert f"| {i}. {p['name']} | {p['status']} |" in md
        assert f"## {i}. {p['title']}: {p['status']}" in md


def test_forced_failure_is_recorded_and_later_parts_still_run(runs):
    run = runs["whole"]
    parts = {p["name"]: p for p in run["report"]["parts"]}
    assert parts["environment"]["status"] == "failed"
    assert "forced failure of part environment" in parts["environment"]["error"]
    assert run["rc"] == 1 and "failed or timed out: environment" in run["stdout"]
    assert [parts[n]["status"] for n in ("kernels", "methods", "benchmarks")] == ["ok", "ok", "ok"], run["stdout"]
    assert "no --official DIR" in parts["official"]["note"]
    assert "only with --fashion_mnist DIR" in parts["fashion_mnist"]["note"]  # none given to this run


def test_kernel_checks_ran_and_passed(runs):
    checks = {c["check"]: c for c in runs["whole"]["report"]["parts"][1]["checks"]}
    kinds = {name.split()[0] for name, c in checks.items() if c["status"] == "ok"}
    assert kinds == {"triton", "sdpa", "coding_rate", "vit"}, checks.keys()  # triton: interpreted
    assert not [n for n, c in checks.items() if c["status"] == "failed"]
    for name, c in checks.items():
        if c["status"] == "ok":
            assert all(c["errors"][k] <= c["bound"][k] for k in c["errors"]), name
    # on a CPU the fused SDPA kernels for CUDA are not there: recorded, not failed
    assert checks["sdpa efficient_attention B1 H2 N17 d32 float32"]["status"] == "not available"


def test_four_methods_ran_with_finite_losses(runs):
    part = runs["whole"]["report"]["parts"][2]
    for method in ("dino", "simdino", "dinov2", "simdinov2"):
        r = part["runs"][method]
        assert r["status"] == "ok" and r["step"] == 3, (method, r)
        assert r["losses"]["train_loss"] and all(math.isfinite(v) for v in r["losses"].values())
        assert r["steps_timed"] == 3 and r["median_step_s"] > 0 and r["max_rss_MiB"] > 0
    assert "coding_rate" in part["runs"]["simdino"]["losses"] and "ibot_loss" in part["runs"]["dinov2"]["losses"]
    assert part["runs"]["dino --compile true"]["status"] == "skipped"


def test_benchmarks_output_captured(runs):
    part = runs["whole"]["report"]["parts"][3]
    assert part["bench"]["rows"][0]["method"] == "dino" and part["bench"]["rows"][0]["median_step_s"] > 0
    assert part["attention"]["status"] == "skipped" and "no CPU path" in part["attention"]["note"]


def test_fashion_mnist_knn_next_to_baselines(runs):
    report, md = runs["fashion"]["report"], runs["fashion"]["md"]
    assert [p["status"] for p in report["parts"]] == ["skipped"] * 5 + ["ok"], runs["fashion"]["stdout"]
    part = report["parts"][5]
    run = part["runs"]["simdino"]
    assert 0 <= run["knn"]["top1"] <= run["knn"]["top5"] <= 100
    assert run["eval_py_knn"] == run["knn"]  # eval.py on the checkpoint: the run's own k-NN again
    assert 0 <= part["raw_pixels_top1"] <= 100 and 0 <= part["random_vit_top1"] <= 100
    assert f"raw pixels {gpu_check.fmt(part['raw_pixels_top1'])}" in md


def test_environment_worker_reports_the_versions(capsys):
    import torch
    gpu_check.worker_env([])
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["cuda available"] == torch.cuda.is_available()
