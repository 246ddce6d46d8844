"""A misspelt GATEWAY_* variable is said, with the setting it probably meant (issue 17), not silently ignored;
one naming a section's unknown key stays an error at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, unknown_variables

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    env = {"GATEWAY_SPI_PORT": "5070", "GATEWAY_FOO": "1", "GATEWAY_HTTP_PORT": "8081", "GATEWAY_WORKER_NAME": "w2",
           "PATH": "/bin"}
    assert unknown_variables(env) == ["GATEWAY_FOO: not a setting, ignored",
                                      "GATEWAY_SPI_PORT: not a setting, ignored (did you mean GATEWAY_SIP_PORT?)"]
    with pytest.raises(ConfigError, match="sip.portt: unknown key"):
        load_config(None, {"GATEWAY_SIP_PORTT": "5070"})


def test_every_command_says_them(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "calls", "--data-dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=30, cwd=ROOT, env={**os.environ, "GATEWAY_HTPP_PORT": "9000"})
    assert out.returncode == 0 and "GATEWAY_HTPP_PORT: not a setting, ignored (did you mean GATEWAY_HTTP_PORT?)" \
        in out.stderr, out.stderr


def test_calls_says_when_the_data_dir_holds_no_cdr_store(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "calls", "--data-dir", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]" and "no CDR store in" in out.stderr, out
