"""The command-line and output-file contract (docs/DESIGN.md), end to end in subprocesses: smoke run,
exact resume, one-line errors on bad input, torchrun with Gloo."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def records(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]


def test_smoke_run_writes_the_contract_files(tmp_path):
    """The smoke command; a healthy run raises no collapse alarm (train.py's watch)."""
    out = str(tmp_path / "run")
    r = run(["dino.py", "--max_steps", "20", "--output_dir", out, "--device", "cpu"])
    assert r.returncode == 0 and "collapsed" not in r.stdout, r.stderr[-2000:]
    for f in ("checkpoint.pth", "config.json", "log.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    rec = records(out)[-1]
    assert rec["step"] == 20 and {"epoch", "train_loss", "dino_loss", "lr", "knn_top1"} <= set(rec)
    assert rec["feat_std"] > 0.1 and rec["feat_rank"] > 10
    assert json.load(open(os.path.join(out, "config.json")))["arch"] == "vit_pico"


def test_resume_is_exact(tmp_path):
    """4 steps, stop, then resume to 8 == 8 steps uninterrupted, bit for bit on CPU."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--device", "cpu", "--eval_every", "0", "--batch_size_per_gpu", "32"]
    assert run(["dino.py", "--max_steps", "4", "--output_dir", a, *common]).returncode == 0
    r = run(["dino.py", "--max_steps", "8", "--output_dir", a, *common])
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    assert run(["dino.py", "--max_steps", "8", "--output_dir", b, *common]).returncode == 0
    assert [x["step"] for x in records(a)] == [4, 8]
    ca = torch.load(os.path.join(a, "checkpoint.pth"), weights_only=False)
    cb = torch.load(os.path.join(b, "checkpoint.pth"), weights_only=False)
    assert ca["step"] == cb["step"] == 8
    for k, v in cb["method"].items():
        assert torch.equal(ca["method"][k], v), k


def test_resume_refuses_a_different_config(tmp_path):
    out = str(tmp_path / "run")
    assert run(["dino.py", "--max_steps", "2", "--output_dir", out, "--eval_every", "0"]).returncode == 0
    before = open(os.path.join(out, "log.jsonl")).read()
    r = run(["dino.py", "--max_steps", "4", "--output_dir", out, "--lr", "0.1"])
    assert r.returncode != 0 and "different config (lr)" in r.stderr
    assert open(os.path.join(out, "log.jsonl")).read() == before


@pytest.mark.parametrize("flags,message", [
    (["--data", "imagefolder", "--data_path", "/nonexistent"], "does not exist"),
    (["--global_crops_size", "30"], "not divisible by --patch_size"),
    (["--arch", "vit_enormous"], "unknown --arch"),
    (["--batch_size_per_gpu", "-1"], "--batch_size_per_gpu must be positive"),
])
def test_bad_flags_one_line_error(tmp_path, flags, message):
    out = tmp_path / "run"
    r = run(["dino.py", "--output_dir", str(out), *flags], timeout=120)
    assert r.returncode != 0
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def _tree(root):
    from PIL import Image
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (36, 36), (i * 10, 50 if c == "a" else 200, 0)).save(root / c / f"{i}.png")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run(["dino.py", "--data", "imagefolder", "--data_path", str(tmp_path / "empty"),
             "--output_dir", str(tmp_path / "o1")], timeout=120)
    assert r.returncode != 0 and "no images found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a corrupt image: tests/test_robust.py::test_bad_image_is_named_or_skipped


def test_image_folder_training_and_knn_cli(tmp_path):
    _tree(tmp_path / "imgs")
    out = str(tmp_path / "run")
    r = run(["dino.py", "--data", "imagefolder", "--data_path", str(tmp_path / "imgs"), "--batch_size_per_gpu", "4",
             "--num_workers", "1", "--max_steps", "3", "--output_dir", out])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(["eval.py", "knn", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--baselines"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"top1", "top5", "raw_pixels_top1", "random_vit_top1"} <= set(result)
    r = run(["eval.py", "knn", "--checkpoint", str(tmp_path / "nope.pth")])
    assert r.returncode != 0 and "nope.pth does not exist" in r.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = str(tmp_path / "ddp")
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "dino.py", "--device", "cpu",
                        "--max_steps", "10", "--batch_size_per_gpu", "32", "--output_dir", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "world size 2" in r.stdout
    rec = records(out)
    assert rec[-1]["step"] == 10 and "knn_top1" in rec[-1]
