"""Several processes give the run of one: under `torchrun` with Gloo on CPU, each test named
after the defect it guards. Three launches in all (each costs seconds of start-up): two of
2 ranks for training, one of 3 ranks for the k-NN."""
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import eval as eval_lib
from kernels import distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(ranks, script, *args):
    return [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", str(script), *args]


# ----------------------------------------------------------------------------------------------
# Training on 2 ranks. First launch: a DINO run of 6 steps (2 epochs of 3) whose step compares the
# teacher and the centre across ranks (all-gathered) at steps 0 and 3, each rank with a folder of
# its own as on two nodes without a shared file system; then the same run in one shared folder,
# a checkpoint after every step, SIGKILLed by the test at a random step. Second launch: the
# per-rank folders again, which must stop at once; then the killed run, resumed to its end.
# One process group per launch: train() ends it, so the first launch (which ends in SIGKILL)
# keeps it for its second run; none is started twice in a process.
SCRIPT = """
import dataclasses, os, sys
import torch
sys.path.insert(0, {root!r})
import dino, train
from kernels import distributed as dist

class Probe(dino.DINO):
    def forward(self, crops, step):
        if step in (0, 3):
            state = torch.cat([p.detach().flatten() for p in self.teacher.parameters()] + [self.center.flatten()])
            every = dist.all_gather_cat(state[None])
            if dist.is_main():
                print(f"step {{step}}: teacher and centre differ across ranks by {{(every[0] - every[1]).abs().max().item()}}")
        return super().forward(crops, step)

class Short(dino.DINOConfig):
    def epoch_length(self, steps_per_pass):
        return 3

base, resume = sys.argv[1], len(sys.argv) > 2
cfg = train.config_cli(Short, dino.PRESETS, ["--max_steps", "6", "--epochs", "2", "--eval_every", "0", "--device",
                       "cpu", "--batch_size_per_gpu", "8", "--out_dim", "64", "--drop_path_rate", "0.2"])
own = dataclasses.replace(cfg, output_dir=os.path.join(base, "rank" + os.environ["RANK"]))
shared = dataclasses.replace(cfg, output_dir=os.path.join(base, "killed"), checkpoint_minutes=1e-9)
if not resume:                   # fresh everywhere: runs; only rank 0 writes a checkpoint
    dist.cleanup = lambda: None  # the process group outlives the first run
    train.train(own, Probe)
    dist.print0("killable")
    train.train(shared, Probe)   # killed by the test
    sys.exit(0)
try:                             # the same command again: rank 1 has no checkpoint to resume from
    train.train(own, Probe)
except train.ConfigError as e:
    print(f"rank {{os.environ['RANK']}}: error: {{e}}", flush=True)
train.train(shared, Probe)
"""


def leaves(state, path=""):
    """Every tensor, number, flag of a checkpoint by its path, the config left out."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() if key != "config" for k, v in leaves(sub, f"{path}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in leaves(sub, f"{path}[{i}]").items()}
    return {path: state}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The two launches: (output of the first, killed at `kill` steps into the shared run; output of
    the second; the folder)."""
    base = tmp_path_factory.mktemp("ddp")
    script = base / "ddp_probe.py"
    script.write_text(SCRIPT.format(root=ROOT))
    kill = random.Random().randint(2, 5)   # the checkpoint of step 1 at least is on disk
    p = subprocess.Popen(torchrun(2, script, str(base)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=ENV, start_new_session=True)
    first, killable = [], False
    for line in p.stdout:
        first.append(line)
        killable = killable or line.startswith("killable")
        if killable and line.startswith("epoch ") and int(line.split(" step ")[1].split("/")[0]) >= kill:
            os.killpg(p.pid, signal.SIGKILL)   # torchrun and both ranks at once
            break
    p.wait(timeout=60)
    p.stdout.close()
    second = subprocess.run(torchrun(2, script, str(base), "resume"), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=ENV)
    return "".join(first), second.stdout + second.stderr, base, kill


@needs_torchrun
def test_teacher_identical_on_every_rank(two_ranks):
    """The teacher and the centre are the same on both ranks at step 0 and after 3 steps (were:
    the teacher a copy of each rank's differently seeded student)."""
    out = two_ranks[0]
    assert "step 0: teacher and centre differ across ranks by 0.0" in out, out[-3000:]
    assert "step 3: teacher and centre differ across ranks by 0.0" in out, out[-3000:]


@needs_torchrun
def test_output_dir_must_be_shared(two_ranks):
    """A second node's rank without rank 0's checkpoint stops with one line saying the folder must
    be shared (was: it restarted at step 0 and the collectives hung)."""
    _, out, base, _ = two_ranks
    assert (base / "rank0" / "checkpoint.pth").exists() and not (base / "rank1" / "checkpoint.pth").exists()
    assert "is not shared by all ranks" in out and "rank 0: error" in out and "rank 1: error" in out, out[-3000:]


@needs_torchrun
def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(two_ranks):
    """SIGKILL of torchrun and both ranks at a random step, then the same run again: its final
    checkpoint equals the uninterrupted run's (rank0/) in every tensor, bit for bit: student,
    teacher, centre, AdamW's moments and steps, the grad scaler, the step."""
    first, out, base, kill = two_ranks
    assert f"step {kill}/6" in first.split("killable")[1] and "done" not in first.split("killable")[1], first[-3000:]
    assert "resuming from" in out and "done: 6 steps" in out, out[-3000:]
    want, got = (leaves(torch.load(base / d / "checkpoint.pth", weights_only=True)) for d in ("rank0", "killed"))
    assert want.keys() == got.keys() and sum(torch.is_tensor(v) for v in want.values()) > 100
    same = lambda a, b: torch.equal(a, b) if torch.is_tensor(a) else a == b
    assert [k for k in want if not same(want[k], got[k])] == [], kill
    assert any("/optimizer/state/" in k and "exp_avg_sq" in k for k in want) and "/method/center" in want


# ----------------------------------------------------------------------------------------------
# k-NN on 3 ranks: features of datasets whose batches leave some ranks none, and the k-NN with the
# memory bank sharded, equal to one process.
KNN_SCRIPT = """
import sys
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from kernels import distributed as dist
import test_distributed
dist.setup("cpu")
out = test_distributed.shard_results(sys.argv[1])
if dist.is_main():
    torch.save(out, sys.argv[2])
dist.cleanup()
"""


def knn_data(n, seed, classes=10):
    """n images of 3x4x4 pixels around one of 10 class patterns (the same patterns for every seed)."""
    centres = torch.randn(classes, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (128 + 30 * centres[y] + 60 * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 255).to(torch.uint8)
    return data.TensorImages(x, y, classes)


class Pixels(torch.nn.Module):
    """A backbone whose features are the normalised pixels."""
    def forward(self, x):
        return x.flatten(1)


def shard_results(folder):
    """Features and k-NN numbers of small datasets, computed by however many ranks run this (one
    process, or 3 ranks under KNN_SCRIPT). Batches of 4: with 1 or 5 images, 1 or 2 of 3 ranks have
    none; 13 images leave a last batch of 1."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    out = {}
    for n in (1, 5, 9, 13):
        out[f"tensor {n}"] = eval_lib.extract_features(Pixels(), knn_data(n, n), 4, "cpu", batch_size=4)
        out[f"folder {n}"] = eval_lib.extract_features(Pixels(), data.FolderImages(files[:n], [i % 3 for i in range(n)],
                                                                                   3, eval_size=8), 8, "cpu", batch_size=4)
    queries = eval_lib.extract_features(Pixels(), knn_data(120, 1000), 4, "cpu", batch_size=32)
    for n, batch in ((5, 4), (10, 4), (300, 32)):   # bank shards of 0 / 4 / 1, 4 / 4 / 2, 96 / 96 / 108 images
        bank = eval_lib.extract_features(Pixels(), knn_data(n, n), 4, "cpu", batch_size=batch, gather=False)
        out[f"bank sizes {n}"] = dist.all_gather_object(len(bank[0]))
        for k in (1, 7, 20):
            out[f"knn {n} k={k}"] = eval_lib.knn_classify(*bank, *queries, 10, k, T=0.07, chunk=50)
    knn_classify, banks = eval_lib.knn_classify, []   # the bank knn_eval hands to knn_classify
    eval_lib.knn_classify = lambda bank, *rest: banks.append(len(bank)) or knn_classify(bank, *rest)
    try:
        out["knn_eval"] = eval_lib.knn_eval(Pixels(), knn_data(300, 300), knn_data(120, 1000), 4, "cpu", batch_size=32)
    finally:
        eval_lib.knn_classify = knn_classify
    out["bank sizes knn_eval"] = dist.all_gather_object(banks[0])
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    """(shard_results on 3 ranks, in this process)."""
    base = tmp_path_factory.mktemp("knn")
    folder = base / "images"
    folder.mkdir()
    for i, img in enumerate(knn_data(13, 7).images):   # 4x4 PNGs, read at 8x8
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    (base / "knn.py").write_text(KNN_SCRIPT.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(torchrun(3, base / "knn.py", str(folder), str(base / "out.pth")), cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return torch.load(base / "out.pth", weights_only=True), shard_results(str(folder))


@needs_torchrun
def test_knn_features_of_uneven_shards_equal_one_process(three_ranks):
    """Datasets whose last batches leave some of 3 ranks no image: the gathered features and labels
    are those of one process, bit for bit and in the same order (were: an empty batch on the last
    ranks, IndexError in an image folder's collate; the gathered order rank by rank)."""
    ranks, one = three_ranks
    for key in (k for k in one if k.startswith(("tensor", "folder"))):
        (f3, y3), (f1, y1) = ranks[key], one[key]
        assert len(f1) == len(y1) == int(key.split()[1]) and f1.shape[1] in (48, 192), key
        assert f3.shape == f1.shape and torch.equal(f3, f1) and torch.equal(y3, y1), key


@needs_torchrun
def test_sharded_knn_equals_one_process(three_ranks):
    """k-NN with each of 3 ranks holding a third of the bank (one of them none, or fewer than k),
    each rank's k nearest merged: the top-1 and top-5 of one process holding the whole bank."""
    ranks, one = three_ranks
    for n in (5, 10, 300):
        sizes = ranks[f"bank sizes {n}"]
        assert one[f"bank sizes {n}"] == [n] and sum(sizes) == n and max(sizes) < n and (n != 5 or 0 in sizes)
        for k in (1, 7, 20):
            assert ranks[f"knn {n} k={k}"] == one[f"knn {n} k={k}"], (n, k)
    sizes = ranks["bank sizes knn_eval"]   # knn_eval hands knn_classify this rank's shard only
    assert one["bank sizes knn_eval"] == [300] and sum(sizes) == 300 and max(sizes) < 300
    assert ranks["knn_eval"] == one["knn_eval"] == one["knn 300 k=20"]
    assert 50 < one["knn 300 k=20"][0] < one["knn 300 k=20"][1] < 100   # neither chance nor perfect
    assert len({one[f"knn {n} k={k}"] for n in (5, 10, 300) for k in (1, 7, 20)}) > 5


# ----------------------------------------------------------------------------------------------
# Reading checkpoints: memory-mapped, so that the ranks of a node share one copy in the page cache.

def test_checkpoints_are_memory_mapped_not_copied_into_each_rank(tmp_path):
    """A checkpoint in torch.save's zip format is read as a private map of the file (was: each rank
    read the whole file, optimizer included, into its own memory): its tensors lie in the file's
    mapping, and writing them (AdamW updates its moments in place) leaves the file as it was. A file
    of the format before PyTorch 1.6 is still read, whole."""
    state = {"optimizer": {"state": {0: {"exp_avg": torch.arange(4096.0)}}}, "step": 3}
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path, mapped in ((zipped, True), (legacy, False)):
        t = eval_lib.read_checkpoint(str(path))["optimizer"]["state"][0]["exp_avg"]
        ranges = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith(str(path))]
        assert any(int(lo, 16) <= t.data_ptr() < int(hi, 16) for lo, hi in ranges) == mapped, path
        assert torch.equal(t, torch.arange(4096.0))
        t.mul_(2)
        assert torch.equal(torch.load(path, weights_only=True)["optimizer"]["state"][0]["exp_avg"], torch.arange(4096.0))
