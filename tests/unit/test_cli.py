"""The CLI for people (issue 17): a misspelt GATEWAY_* variable is said, with the setting it probably meant (one
naming a section's unknown key stays an error at start); `calls` says when there is no CDR store; a project's
numbers are added and removed by command."""

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


def gateway_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(data)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_projects_numbers_add_and_remove(tmp_path: Path) -> None:
    """The demo project gets a number to call from (issue 17: "call a phone" on the demo room needed one); an
    inbound number belongs to one project; a malformed one is refused with the rule."""
    import json

    added = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "+15550109999", "--outbound-only")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["numbers"] == [{"number": "+15550109999", "in": False, "out": True}]
    assert gateway_cli(tmp_path, "projects", "create", "--name", "acme").returncode == 0
    taken = gateway_cli(tmp_path, "projects", "numbers", "add", "acme", "15550108888")
    assert taken.returncode == 0
    clash = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "+15550108888")
    assert clash.returncode == 1 and json.loads(clash.stderr)["error"]["code"] == "conflict", clash.stderr
    bad = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "155501\u00b2\u00b2")
    assert bad.returncode == 2 and "6 to 15 digits" in bad.stderr, bad.stderr
    removed = gateway_cli(tmp_path, "projects", "numbers", "remove", "demo", "15550109999")
    assert removed.returncode == 0 and json.loads(removed.stdout)["numbers"] == []
    again = gateway_cli(tmp_path, "projects", "numbers", "remove", "demo", "15550109999")
    assert again.returncode == 1 and json.loads(again.stderr)["error"]["code"] == "not_found"
