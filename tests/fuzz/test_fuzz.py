"""A short fuzzing run of every target (`make fuzz` runs the long one): atheris, coverage-guided, seeded with
the RFC 4475 torture messages and the seeds beside this file. A crash fails the test with its traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
TORTURE = HERE.parents[2] / "shared" / "rfc4475"
SEEDS = {"sip_message": "sip", "sip_stack": "sip", "sip_uri": "sip", "sdp": "sdp", "digest": "digest", "rtp": "rtp",
         "info": "info", "janus_events": "janus_events"}
RUNS = int(os.environ.get("FUZZ_RUNS", "3000"))


def corpus(target: str, tmp: Path) -> Path:
    """A scratch corpus: the target's seeds (and the torture messages for SIP); libFuzzer adds what it finds."""
    folder = tmp / target
    shutil.copytree(HERE / "seeds" / SEEDS[target], folder)
    if SEEDS[target] == "sip" and TORTURE.is_dir():
        for dat in TORTURE.glob("*.dat"):
            shutil.copy(dat, folder / dat.name)
    return folder


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    cmd = [sys.executable, str(HERE / "run.py"), target, f"-runs={RUNS}", "-max_len=4096", "-timeout=10",
           f"-artifact_prefix={tmp_path}/", str(corpus(target, tmp_path))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=HERE.parents[1])
    crashes = sorted(tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, (
        f"{target}: {[c.read_bytes()[:300] for c in crashes]}\n{done.stderr[-4000:]}")
