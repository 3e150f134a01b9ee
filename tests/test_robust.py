"""Training that survives: SIGKILL at random steps then resume == never interrupted, bit
for bit; a kill in the middle of a checkpoint write; non-finite loss and gradient guards; the
collapse warning; bad image files. Each test runs the real command line in subprocesses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small image folder (3 classes x 30 PNGs, 27 train + 3 held out each): 81 train images,
    5 steps of 16 per epoch, decoded by DataLoader workers."""
    root = tmp_path_factory.mktemp("folder")
    x, y = data.make_synthetic(300, seed=3)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i, img in enumerate(x[y == c][:30]):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"class{c}" / f"{i:02d}.png")
    return str(root)


def train_args(method, folder, out, workers):
    return [f"{method}.py", "--data", "imagefolder", "--data_path", folder, "--output_dir", out,
            "--device", "cpu", "--batch_size_per_gpu", "16", "--epochs", "3", "--eval_every", "0",
            "--num_workers", str(workers), "--checkpoint_minutes", "1e-9",  # a checkpoint every step
            "--drop_path_rate", "0.4"]              # random draws in the model too (DINOv2: efficient path)


def run_killed_at(args, kill_step):
    """Start training, SIGKILL it once it has printed step `kill_step` (a checkpoint write may be
    under way then), return the steps it printed."""
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    for line in p.stdout:
        if line.startswith("epoch ") and " step " in line:
            seen.append(int(line.split(" step ")[1].split("/")[0]))
            if seen[-1] >= kill_step:
                p.send_signal(signal.SIGKILL)
                break
    p.wait(timeout=60)
    p.stdout.close()
    return seen


def final_state(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


@pytest.mark.parametrize("method", ["dinov2"])  # the most random draws per step: masks, drop path, crops
def test_killed_runs_resume_bit_for_bit(method, folder, tmp_path):
    ref = str(tmp_path / "ref")
    r = run(train_args(method, folder, ref, 0))
    assert r.returncode == 0, r.stderr[-2000:]
    want = final_state(ref)
    assert want["step"] == 15
    rng = random.Random(method)
    for workers in (0, 2):
        out = str(tmp_path / f"killed{workers}")
        kills = sorted(rng.sample(range(1, 14), 2))  # two random steps of the 15
        for k in kills:
            assert run_killed_at(train_args(method, folder, out, workers), k)[-1] >= k
        r = run(train_args(method, folder, out, workers))
        assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
        got = final_state(out)
        assert got["step"] == 15
        for k, v in want["method"].items():
            assert torch.equal(got["method"][k], v), (workers, kills, k)
        for a, b in zip(want["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
            assert all(torch.equal(a[n], b[n]) for n in a), (workers, kills)
        steps = [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))]
        assert steps == [5, 10, 15], steps


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = str(tmp_path / "run")
    common = ["--device", "cpu", "--eval_every", "0", "--batch_size_per_gpu", "16", "--output_dir", out]
    assert run(["dino.py", "--max_steps", "2", *common]).returncode == 0
    ckpt = os.path.join(out, "checkpoint.pth")
    before = open(ckpt, "rb").read()
    writer = ("import sys, torch; sys.path.insert(0, '.'); import train; "
              f"train.save_checkpoint({ckpt!r}, {{'big': torch.ones(400 * 2 ** 20 // 4)}})")
    p = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, env=ENV)
    tmp = ckpt + ".tmp"
    deadline = time.time() + 60
    while not (os.path.exists(tmp) and os.path.getsize(tmp) > 2 ** 20) and time.time() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.getsize(tmp) < 400 * 2 ** 20, "the write finished before the kill"
    assert open(ckpt, "rb").read() == before           # the previous checkpoint, untouched
    r = run(["dino.py", "--max_steps", "4", *common])  # and the run resumes from it
    assert r.returncode == 0 and "resuming from" in r.stdout and "at step 2" in r.stdout, r.stderr[-2000:]
    assert final_state(out)["step"] == 4


def test_truncated_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    out = str(tmp_path / "run")
    common = ["--device", "cpu", "--eval_every", "0", "--batch_size_per_gpu", "16", "--output_dir", out]
    assert run(["dino.py", "--max_steps", "2", *common]).returncode == 0
    ckpt = os.path.join(out, "checkpoint.pth")
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    log = open(os.path.join(out, "log.jsonl")).read()
    r = run(["dino.py", "--max_steps", "4", *common])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "cannot read checkpoint" in r.stderr and "move it away" in r.stderr
    assert open(os.path.join(out, "log.jsonl")).read() == log


INJECT = """
import sys; sys.path.insert(0, '.')
import dino, train
what = sys.argv.pop(1)
class Injected(dino.DINO):
    def forward(self, crops, step):
        loss, logs = super().forward(crops, step)
        if step == 3 and what == "loss":
            loss, logs["dino_loss"] = loss * float("nan"), float("nan")
        if step == 3 and what == "grad":  # finite loss, NaN gradient: 0 * d sqrt|x| / dx at 0
            x = self.student.backbone.patch_embed.proj.weight.sum() * 0
            loss = loss + 0 * x.abs().sqrt()
        return loss, logs
train.main(train.Recipe("dino", dino.DINOConfig, Injected, dino.PRESETS))
"""


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_stops_with_one_line_and_keeps_the_last_good_checkpoint(what, tmp_path):
    out = str(tmp_path / "run")
    r = run(["-c", INJECT, what, "--max_steps", "6", "--device", "cpu", "--eval_every", "0",
             "--batch_size_per_gpu", "16", "--checkpoint_minutes", "1e-9", "--output_dir", out])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "step 3" in lines[0], r.stderr[-2000:]
    if what == "loss":
        assert "non-finite loss (dino_loss = nan)" in lines[0]
    else:
        assert "non-finite gradient in backbone.patch_embed.proj.weight" in lines[0]
    assert final_state(out)["step"] == 3  # the state after step 2 (0-based), the last good one


def test_collapse_warning(tmp_path):
    """DINO without centring (the centre stays 0) collapses: every image to one point (60 steps
    with a fast teacher: feat_std 0.025, measured)."""
    out = str(tmp_path / "run")
    r = run(["dino.py", "--center_momentum", "1.0", "--max_steps", "60", "--batch_size_per_gpu", "32",
             "--warmup_epochs", "0", "--freeze_last_layer", "0", "--momentum_teacher", "0.9",
             "--eval_every", "0", "--device", "cpu", "--output_dir", out])
    assert r.returncode == 0, r.stderr[-2000:]
    rec = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))][-1]
    assert rec["feat_std"] < 0.05 and "warning: epoch 0: the teacher's features look collapsed" in r.stdout


def test_bad_image_is_named_or_skipped(folder, tmp_path):
    import shutil
    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    (root / "class1" / "05.png").write_bytes(b"\x89PNG broken")     # a train image: PNG magic, then garbage
    (root / "class1" / "09.png").write_bytes(b"not an image")      # a held-out one
    args = ["dino.py", "--data", "imagefolder", "--data_path", str(root), "--batch_size_per_gpu", "16",
            "--max_steps", "5", "--eval_every", "0", "--device", "cpu", "--num_workers", "0"]
    r = run([*args, "--output_dir", str(tmp_path / "a")])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot read image" in r.stderr and "class1" in r.stderr and "--skip_bad_images" in r.stderr
    r = run([*args, "--output_dir", str(tmp_path / "b"), "--skip_bad_images", "true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: skipping unreadable image" in r.stderr and "09.png" in r.stderr


def test_grey_alpha_and_16_bit_images_are_converted(tmp_path):
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 255).astype(np.uint8), "L").save(tmp_path / "l.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "i16.png")
    rgba = np.dstack([(ramp * 255).astype(np.uint8)] * 3 + [np.full((8, 8), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for name in ("l.png", "i16.png", "rgba.png"):
        im = data.read_rgb(tmp_path / name)
        a = np.asarray(im)
        assert im.mode == "RGB" and a.shape == (8, 8, 3), name
        assert abs(int(a[..., 0].max()) - 255) <= 1 and a[..., 0].min() == 0, name  # full range kept


def test_overwrite_flag_replaces_a_run_with_another_config(tmp_path):
    out = str(tmp_path / "run")
    common = ["--device", "cpu", "--eval_every", "0", "--batch_size_per_gpu", "16", "--output_dir", out]
    assert run(["dino.py", "--max_steps", "2", *common]).returncode == 0
    r = run(["dino.py", "--max_steps", "2", "--lr", "0.001", *common])
    assert r.returncode != 0 and "--overwrite true" in r.stderr
    r = run(["dino.py", "--max_steps", "2", "--lr", "0.001", "--overwrite", "true", *common])
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stderr[-2000:]
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [2]
    assert json.load(open(os.path.join(out, "config.json")))["lr"] == 0.001


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(tmp_path):
    import train
    marker, path = tmp_path / "ran", tmp_path / "checkpoint.pth"
    torch.save({"method": RunsCode(marker)}, path)
    with pytest.raises(train.ConfigError, match="could run code"):
        train.load_checkpoint(path)
    assert not marker.exists()
