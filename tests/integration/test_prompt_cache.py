"""Several processes render into one prompt cache at once (workers starting on a fresh data dir): each gets every
prompt. They used to share the synthesiser's temporary file, so one deleted it under the other
(`prompts.unavailable`: "espeak-ng produced no audio")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_concurrent_renderings_into_one_cache_all_succeed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "gateway", "prompts", "render", "--json", "--data-dir", str(data)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["prompts"] > 0
    assert not list(data.rglob("*.raw.wav")), "temporary files left behind"
