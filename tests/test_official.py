"""Faithfulness against the official code, run on the same inputs. Needs a checkout of
facebookresearch/dino outside this repository: NANODINO_OFFICIAL_DINO=/path/to/dino pytest ...
(skipped otherwise; CI has no network to fetch it)."""
import os
import subprocess
import sys

import pytest

OFFICIAL = os.environ.get("NANODINO_OFFICIAL_DINO", "")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, "main_dino.py")),
                    reason="set NANODINO_OFFICIAL_DINO to a facebookresearch/dino checkout")
def test_dino_steps_match_the_official_code():
    r = subprocess.run([sys.executable, os.path.join(HERE, "official_dino.py"), OFFICIAL, "20"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
