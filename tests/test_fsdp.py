"""--fsdp true (FSDP2, kernels/distributed.wrap_fsdp) against DDP under `torchrun
--nproc_per_node=2` with Gloo on CPU: the same losses and clipping norms, checkpoints in the same
full layout with the same values, and a checkpoint of either resumed by the other. One launch of
four DINOv2 runs (DINOv2: the teacher's teacher_forward entry point, the clip of one norm per
submodule); one run in this process, without torchrun."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dinov2
import train
from test_distributed import leaves  # every value of a checkpoint by its path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY = ["--eval_every", "0", "--device", "cpu", "--precision", "fp32", "--batch_size_per_gpu", "4",
        "--out_dim", "64", "--local_crops_number", "2", "--clip_grad", "0.5", "--head_hidden_dim", "64",
        "--head_bottleneck_dim", "32", "--drop_path_rate", "0.1"]

# Each run prints one line: its per-step losses and per-parameter gradient norms (before clipping).
# The 3-step checkpoints are kept as ddp3/ and fsdp3/; then the FSDP checkpoint is resumed without
# --fsdp and the DDP one with it, one step each.
SCRIPT = """
import json, os, shutil, sys
sys.path.insert(0, {root!r})
import dinov2, train
from kernels import distributed as dist
import torch

base, tiny = sys.argv[1], {tiny!r}
dist.cleanup = lambda: None  # one process group for the four runs
losses, norms = [], []
clip_groups = train.clip_groups
def record_norms(groups, clip):
    out = clip_groups(groups, clip)
    norms.append([n.item() for n in out])
    return out
train.clip_groups = record_norms
def method(cfg, steps_per_epoch):
    m = dinov2.RECIPE.Method(cfg, steps_per_epoch)
    forward = m.forward
    def recording(crops, step):
        loss, logs = forward(crops, step)
        losses.append(loss.item())
        return loss, logs
    m.forward = recording
    return m
for run, fsdp, steps in (("ddp", "false", 3), ("fsdp", "true", 3), ("fsdp", "false", 4), ("ddp", "true", 4)):
    losses.clear(), norms.clear()
    argv = tiny + ["--output_dir", os.path.join(base, run), "--fsdp", fsdp, "--max_steps", str(steps)]
    train.train(train.config_cli(dinov2.RECIPE.Config, dinov2.RECIPE.presets, argv), method)
    if dist.is_main():
        print("RUN " + json.dumps(dict(run=run, fsdp=fsdp, steps=steps, losses=losses, norms=norms)), flush=True)
        if steps == 3:
            shutil.copytree(os.path.join(base, run), os.path.join(base, run + "3"))
    torch.distributed.barrier()  # the checkpoint on disk before the next run looks for it
"""


def mismatches(a, b, tol):
    """Paths whose values differ: tensors beyond tol (or in dtype, shape), anything else at all."""
    def same(x, y):
        if torch.is_tensor(x) and torch.is_tensor(y):
            return x.dtype == y.dtype and x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=tol, atol=tol)
        return x == y
    return [k for k in a if not same(a[k], b[k])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    script = base / "fsdp_probe.py"
    script.write_text(SCRIPT.format(root=ROOT, tiny=TINY))
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(base)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    found = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("RUN ")]
    assert len(found) == 4, out[-4000:]
    load = lambda d: leaves(torch.load(base / d / "checkpoint.pth", weights_only=True))
    return found, {d: load(d) for d in ("ddp3", "fsdp3", "ddp", "fsdp")}, out


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_fsdp_steps_equal_ddp_steps(runs):
    """The same 3 losses and the same per-parameter gradient norms as DDP: the FSDP2 norms are the
    full parameters' (the clip acts as under DDP), not a rank's shard's."""
    (ddp, fsdp, *_), _, _ = runs
    assert len(ddp["losses"]) == len(fsdp["losses"]) == 3 and len(set(ddp["losses"])) == 3
    assert ddp["losses"] == pytest.approx(fsdp["losses"], rel=1e-5, abs=1e-6), (ddp["losses"], fsdp["losses"])
    assert len(ddp["norms"][0]) == len(fsdp["norms"][0]) > 30
    assert sum(n * n for n in ddp["norms"][0]) ** 0.5 > 0.5  # the clip (0.5) acts
    for a, b in zip(ddp["norms"], fsdp["norms"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_fsdp_checkpoint_is_full_and_equal_to_ddp(runs):
    """The checkpoint written under FSDP: the keys, dtypes and shapes of the DDP one (student,
    teacher, centres, AdamW's moments), full tensors on rank 0, the same values within 1e-4."""
    _, ckpt, _ = runs
    want, got = ckpt["ddp3"], ckpt["fsdp3"]
    assert want.keys() == got.keys() and sum(torch.is_tensor(v) for v in want.values()) > 100
    assert [k for k in want if torch.is_tensor(want[k]) and want[k].shape != got[k].shape] == []
    assert mismatches(want, got, 1e-4) == []
    assert "/student/backbone.blocks.0.attn.qkv.weight" in want and "/method/center_patch" in want
    assert any("/optimizer/state/" in k and "exp_avg_sq" in k for k in want)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_checkpoints_resume_across_fsdp_and_ddp(runs):
    """The FSDP checkpoint resumed by DDP and the DDP one by FSDP, one step each: both resume (not
    "another config") and end equal: the same 4th loss, the same checkpoint within 1e-4."""
    (_, _, ddp_from_fsdp, fsdp_from_ddp), ckpt, out = runs
    assert out.count("resuming from") == 2 and out.count("at step 3") == 2, out[-4000:]
    assert len(ddp_from_fsdp["losses"]) == len(fsdp_from_ddp["losses"]) == 1
    assert ddp_from_fsdp["losses"] == pytest.approx(fsdp_from_ddp["losses"], rel=1e-5)
    assert ckpt["fsdp"]["/step"] == ckpt["ddp"]["/step"] == 4
    assert mismatches(ckpt["ddp"], ckpt["fsdp"], 1e-4) == []


def test_fsdp_in_one_process_trains_unsharded(tmp_path):
    """--fsdp true without torchrun: nothing to shard, the run trains as without the flag (plain
    parameters, no process group asked for) and writes its checkpoint."""
    argv = TINY + ["--max_steps", "1", "--batch_size_per_gpu", "2", "--fsdp", "true", "--output_dir", str(tmp_path)]
    method = train.train(train.config_cli(dinov2.RECIPE.Config, dinov2.RECIPE.presets, argv), dinov2.RECIPE.Method)
    assert all(type(p) is torch.nn.Parameter for p in [*method.student.parameters(), *method.teacher.parameters()])
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 1
