"""Faithfulness against the official code, run on the same inputs. Each test needs a checkout
outside this repository (skipped otherwise; CI has no network to fetch them):

    NANODINO_OFFICIAL_DINO=/path/to/facebookresearch/dino        (DINO)
    NANODINO_OFFICIAL_DINOV2=/path/to/facebookresearch/dinov2    (DINOv2)
    NANODINO_OFFICIAL_SIMDINO=/path/to/RobinWu218/SimDINO         (SimDINO: simdino/, SimDINOv2: simdinov2/)

Each runs a script of tests/ (official_<method>.py: 20 AdamW steps of both sides from the same
weights on the same crops and masks) and asserts its exit status: 0 when every loss and weight
equals ours to float32 noise. The scripts print the step-by-step table and, run by hand without
--matched, what each known difference changes."""
import os
import subprocess
import sys

import pytest

OFFICIAL = os.environ.get("NANODINO_OFFICIAL_DINO", "")
DINOV2 = os.environ.get("NANODINO_OFFICIAL_DINOV2", "")
SIMDINO = os.environ.get("NANODINO_OFFICIAL_SIMDINO", "")
HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, checkout, *args, timeout=1800):
    r = subprocess.run([sys.executable, os.path.join(HERE, script), checkout, "20", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, "main_dino.py")),
                    reason="set NANODINO_OFFICIAL_DINO to a facebookresearch/dino checkout")
def test_dino_steps_match_the_official_code():
    run("official_dino.py", OFFICIAL, timeout=600)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SIMDINO, "simdino", "main_dino.py")),
                    reason="set NANODINO_OFFICIAL_SIMDINO to a RobinWu218/SimDINO checkout")
def test_simdino_steps_match_the_official_code():
    run("official_simdino.py", SIMDINO)


@pytest.mark.skipif(not os.path.isfile(os.path.join(DINOV2, "dinov2", "train", "ssl_meta_arch.py")),
                    reason="set NANODINO_OFFICIAL_DINOV2 to a facebookresearch/dinov2 checkout")
def test_dinov2_steps_match_the_official_code():
    run("official_dinov2.py", DINOV2, "--matched")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SIMDINO, "simdinov2", "train", "ssl_meta_arch_sim.py")),
                    reason="set NANODINO_OFFICIAL_SIMDINO to a RobinWu218/SimDINO checkout")
def test_simdinov2_steps_match_the_official_code():
    run("official_simdinov2.py", SIMDINO, "--matched")
