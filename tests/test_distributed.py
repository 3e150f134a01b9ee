"""Several processes give the run of one: under `torchrun --nproc_per_node=2` with Gloo on CPU,
each test named after the defect it guards."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")

# Run in each of 2 processes, with a folder of its own per rank, as on two nodes without a shared
# file system: a DINO run whose step compares the teacher and the centre across ranks
# (all-gathered) at the first and the last step; then (with "resume") the same command again,
# which must stop at once. One process group per launch: none is started twice in a process.
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

base, resume = sys.argv[1], len(sys.argv) > 2
cfg = train.config_cli(dino.DINOConfig, dino.PRESETS, ["--max_steps", "4", "--eval_every", "0", "--device", "cpu",
                       "--batch_size_per_gpu", "16", "--out_dim", "64"])
own = dataclasses.replace(cfg, output_dir=os.path.join(base, "rank" + os.environ["RANK"]))
if not resume:                   # fresh everywhere: runs; only rank 0 writes a checkpoint
    train.train(own, Probe)
    sys.exit(0)
try:                             # the same command again: rank 1 has no checkpoint to resume from
    train.train(dataclasses.replace(own, max_steps=6), Probe)
except train.ConfigError as e:
    print(f"rank {{os.environ['RANK']}}: error: {{e}}", flush=True)
    sys.exit(3)
"""


@needs_torchrun
def test_teacher_identical_on_every_rank_and_output_dir_must_be_shared(tmp_path):
    """(1) The teacher and the centre are the same on both ranks at step 0 and after 3 steps
    (were: the teacher a copy of each rank's differently seeded student). (2) A second node's rank
    without rank 0's checkpoint stops with one line saying the folder must be shared (was: it
    restarted at step 0 and the collectives hung)."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(SCRIPT.format(root=ROOT))
    run = lambda *extra: subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
                                         *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                        env=dict(os.environ, OMP_NUM_THREADS="1"))
    r = run()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "step 0: teacher and centre differ across ranks by 0.0" in out, out[-3000:]
    assert "step 3: teacher and centre differ across ranks by 0.0" in out, out[-3000:]
    assert (tmp_path / "rank0" / "checkpoint.pth").exists() and not (tmp_path / "rank1" / "checkpoint.pth").exists()
    r = run("resume")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "is not shared by all ranks" in out and "rank 0: error" in out, out[-3000:]
