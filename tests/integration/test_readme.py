"""The README cannot drift from the code (issue 17): its quick start is run, command by command, against a gateway
this test starts; every `gateway ...` line of its shell blocks parses with the real command-line parser; every
setting it names (`[section] key`, `section.key`, `GATEWAY_*`, the configuration table) exists; the systemd unit it
describes verifies and runs the gateway as an unprivileged user.

Convention: a ```sh block right after the line `<!-- tested: quick-start -->` is run. Commands run from the
repository's folder with the test gateway's data directory (GATEWAY_DATA_DIR), `.venv/bin/gateway` as this
interpreter's `-m gateway`, and the default addresses replaced by the test gateway's ports. Placeholders take the
value an earlier command printed (ROOM_ID: the `room_id` line of `rooms create`) or the newest call (VOICE_ID).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from gateway.cli import parser
from gateway.config import NOT_SETTINGS, Config
from tests.conftest import ROOT, Gateway, free_port, media_block, start_gateway, stop_gateway

README = (ROOT / "README.md").read_text()
MARK = "<!-- tested: quick-start -->"
GATEWAY = re.compile(r"^(?:.*/)?gateway$")  # .venv/bin/gateway, /opt/gateway/.venv/bin/gateway, gateway
SAMPLES = {"VOICE_ID": "0c3d5b52-8a52-4c43-9d5e-9a1f0f0a0001", "ROOM_ID": "0" * 32, "PROJECT": "demo",
           "NUMBER": "+15550109999", "NAME": "w1"}


def blocks(text: str = README) -> list[tuple[str, str, int]]:
    """(language, body, line number) of each fenced block; language "sh+tested" for a block after MARK."""
    out: list[tuple[str, str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        tested = start > 0 and lines[start - 1].strip() == MARK
        out.append((fence.group(1) + ("+tested" if tested else ""), "\n".join(lines[start + 1 : i]), start + 2))
        i += 1
    return out


def commands(body: str) -> list[list[str]]:
    """The shell lines of a block (continuations joined, comments and comment lines dropped), as argv lists."""
    out = []
    pending = ""
    for line in body.replace("\\\n", " ").splitlines():
        pending += line
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quoted string goes on to the next line, as in the shell
            pending += "\n"
            continue
        pending = ""
        if argv:
            out.append(argv)
    assert not pending, f"an unclosed quote: {pending}"
    return out


COMMANDS = {"run", "drain", "cluster", "calls", "cdr", "rooms", "projects", "prompts", "certs"}


def gateway_args(argv: list[str]) -> list[str] | None:
    """The arguments after the gateway executable (past `sudo -u USER`, `env`, VAR=value), or None."""
    for i, word in enumerate(argv):
        if GATEWAY.match(word) and i + 1 < len(argv) and argv[i + 1] in COMMANDS:
            return argv[i + 1 :]
        if word == "-m" and i + 1 < len(argv) and argv[i + 1] == "gateway":
            return argv[i + 2 :]
    return None


def test_the_readme_marks_quick_start_blocks_and_they_have_the_line_test() -> None:
    tested = [body for lang, body, _ in blocks() if lang == "sh+tested"]
    assert len(tested) == 2, "the quick start's two blocks are marked"
    assert "sipp -sf config/sipp/echo-test.xml -s 15550100001 127.0.0.1:5060" in tested[0]
    assert (ROOT / "config/sipp/echo-test.xml").exists() and (ROOT / "config/sipp/echo-test.ul").stat().st_size > 0


def test_every_gateway_line_of_the_readme_parses() -> None:
    """Each `gateway ...` line of every sh block, with its placeholders filled, is accepted by the real parser (the
    same argument types: a room id, numbers, names)."""
    seen = 0
    for lang, body, line in blocks():
        if not lang.startswith("sh"):
            continue
        for argv in commands(body):
            args = gateway_args(argv)
            if args is None:
                continue
            filled = [SAMPLES.get(a, a) for a in args]
            try:
                parser().parse_args(filled)
            except SystemExit as exc:
                raise AssertionError(f"README.md:{line}: {shlex.join(argv)}: the parser refuses it") from exc
            seen += 1
    assert seen >= 12, seen  # the blocks were found


def settings() -> dict[str, set[str]]:
    """Every section of the configuration with its keys; nested tables as "section.key" (trunks.outbound)."""

    def dataclass_in(hint: typing.Any) -> typing.Any:
        return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)

    out: dict[str, set[str]] = {}
    for section, hint in typing.get_type_hints(Config).items():
        cls = dataclass_in(hint)
        if cls is None:
            continue
        for key, inner in typing.get_type_hints(cls).items():
            out.setdefault(section, set()).add(key)
            nested = dataclass_in(inner)
            if nested is not None:
                out[f"{section}.{key}"] = set(typing.get_type_hints(nested))
    return out


FILE_SUFFIXES = {"sqlite", "json", "toml", "py", "wav", "xml", "ul", "log", "pem", "cfg", "service"}


def log_events() -> set[str]:
    """The `event` names the gateway logs, read from its source (`log.event(logger, "call.refused", ...)`)."""
    found: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text()
        for at in re.finditer(r"log\.event\(", text):  # the name, or names (`"a.b" if failed else "a.c"`)
            name_end = text.find(",", text.find(",", at.end()) + 1)
            found.update(re.findall(r'"([a-z_]+\.[a-z_.]+)"', text[at.end() : name_end]))
        found.update(re.findall(r'logger\.(?:debug|info|warning|error)\(\s*"([a-z_]+\.[a-z_.]+)"', text))
        # a call's events, logged as f"call.{state}": Call.record("x", ...) and the forward leg's event(caller, "x")
        found.update(f"call.{state}" for state in re.findall(r'(?:\.record|\bevent)\((?:[a-z_.]+, )?"([a-z_]+)"', text))
    found.update(f"call.{state}" for state in ("initiated", "ringing", "answered", "media_updated", "disconnected"))
    return found  # the last: Call.record logs f"call.{state}" for the CDR's states


def test_the_log_events_the_readme_quotes_are_logged() -> None:
    """Troubleshooting and Logs quote log lines by their `event`: each is one the code logs."""
    events = log_events()
    assert {"call.refused", "rtp.dropped", "sip.rate_limited", "sip.malformed", "call.auth_failed"} <= events
    quoted = set(re.findall(r"`((?:call|rtp|sip|dtmf|rooms|room|cdr|media|register|api|webhook|recording)\.[a-z_]+)`",
                            README))
    known = settings()
    quoted = {q for q in quoted if q.partition(".")[2] not in known.get(q.partition(".")[0], set()) | FILE_SUFFIXES}
    assert quoted - events == set(), sorted(quoted - events)


def test_every_setting_the_readme_names_exists() -> None:
    known = settings()
    missing = []
    for section, key in re.findall(r"`\[\[?([a-z_.]+)\]?\] ([a-z_]+)`", README):  # `[janus] public_ip`
        if key not in known.get(section, set()):
            missing.append(f"[{section}] {key}")
    events = log_events()
    for section, key in re.findall(r"`([a-z_]+)\.([a-z_]+)`", README):  # `api.trusted_proxies`, or a log event
        if section in known and key not in known[section] and f"{section}.{key}" not in events \
                and key not in FILE_SUFFIXES:
            missing.append(f"{section}.{key}")
    for section, keys in re.findall(r"^\| `\[\[?([a-z_.]+)\]?\]` \| (.*) \|$", README, re.M):  # the table
        nested = set().union(*(v for k, v in known.items() if k.startswith(section + ".")))
        for key in re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", keys)):
            if key not in known.get(section, set()) | nested:
                missing.append(f"table [{section}] {key}")
    every = {f"GATEWAY_{s}_{k}".upper() for s, keys in known.items() if "." not in s for k in keys}
    misspelt_on_purpose = {"GATEWAY_HTPP_PORT"}  # the README's example of the warning
    for name in set(re.findall(r"\bGATEWAY_[A-Z0-9_]+\b", README)) - misspelt_on_purpose - NOT_SETTINGS:
        if name not in every:
            missing.append(name)
    assert not missing, f"the README names settings the configuration does not have: {sorted(set(missing))}"


def test_the_systemd_unit_runs_the_gateway_unprivileged_and_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "config/systemd/gateway.service").read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert directives["User"] == "gateway" and directives["NoNewPrivileges"] == "yes"
    assert directives["ProtectSystem"] == "strict" and directives["ReadWritePaths"] == "/var/lib/gateway"
    assert directives["CapabilityBoundingSet"] == "" and directives["KillMode"] == "mixed"
    assert directives["Environment"] == "GATEWAY_DATA_DIR=/var/lib/gateway"
    exec_start = shlex.split(directives["ExecStart"])
    assert gateway_args(exec_start) is not None and parser().parse_args(gateway_args(exec_start)).command == "run"
    drain = int(directives["TimeoutStopSec"])
    assert drain > Config().cluster.drain_timeout_s, "systemd must wait for the drain"
    assert "u gateway " in (ROOT / "config/systemd/gateway.sysusers").read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here")
    copy = tmp_path / "gateway.service"  # the executable must exist for verify: this interpreter stands in
    copy.write_text(unit.replace(exec_start[0], sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def substituted(argv: list[str], gw: Gateway, sipp_ports: tuple[int, int]) -> list[str]:
    out: list[str] = []
    if argv and GATEWAY.match(argv[0]):
        out = [sys.executable, "-m", "gateway"]
        argv = argv[1:]
    for word in argv:
        word = word.replace("127.0.0.1:5060", gw.sip).replace("127.0.0.1:8080", f"127.0.0.1:{gw.http_port}")
        out.append(word.replace("127.0.0.1:8090", f"127.0.0.1:{gw.rooms_port}"))
    if out and out[0] == "sipp":  # ports of the test's own; bounded in time
        out += ["-p", str(sipp_ports[0]), "-mp", str(sipp_ports[1]), "-nostdin", "-timeout", "30s", "-timeout_error"]
    if out and out[0] == "curl":
        out[1:1] = ["--max-time", "10", "--fail"]
    return out


@pytest.mark.timeout(240)
def test_the_quick_start_runs_and_the_line_test_echoes(tmp_path: Path) -> None:
    """The README's quick start, line by line, on a gateway with the shipped configuration: the line test's call
    completes and what the gateway sends back holds the shipped tones, frame for frame; `calls` shows the call,
    `cdr` its media counters; a room is created, listed with the running service's links, and deleted through it."""
    from gateway.media.rtp import RtpPacket
    from tests.integration.media_tools import Capture

    gw = start_gateway(tmp_path)  # no --config: config/gateway.toml of the repository, as `make run`
    env = {**os.environ, "GATEWAY_DATA_DIR": str(gw.data_dir)}
    sipp_ports = (free_port(), media_block())
    lo, hi = gw.rtp_range
    cap = Capture(tmp_path / "echo.pcap", f"udp and dst port {sipp_ports[1]} and src portrange {lo}-{hi}")
    printed: dict[str, str] = {}
    try:
        for lang, body, line in blocks():
            if lang != "sh+tested":
                continue
            for argv in commands(body):
                if "VOICE_ID" in argv:
                    newest = json.loads(subprocess.run([sys.executable, "-m", "gateway", "calls", "--json"], env=env,
                                                       cwd=ROOT, capture_output=True, timeout=30, check=True).stdout)
                    printed["VOICE_ID"] = newest[0]["voice_id"]
                argv = [printed.get(a, a) for a in argv]
                cmd = substituted(argv, gw, sipp_ports)
                out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, f"README.md:{line}: {shlex.join(argv)}\n{out.stdout[-2000:]}{out.stderr}"
                args = gateway_args(argv) or []
                if argv[0] == "sipp":
                    cap.stop()  # the call is over: everything the gateway sent back is in the capture
                elif args == ["calls"]:
                    header, row = out.stdout.splitlines()[:2]
                    assert header.startswith("STARTED ") and " 15550100001 " in row and "remote_bye" in row, out.stdout
                elif args == ["cdr", printed.get("VOICE_ID", "")]:
                    received = re.search(r"disconnected .*rtp_sent=(\d+) rtp_received=(\d+)", out.stdout)
                    assert received and int(received.group(2)) >= 110, out.stdout  # 2.4 s: 120 packets
                elif args[:2] == ["rooms", "create"]:
                    fields = dict(x.split(None, 1) for x in out.stdout.splitlines()[1:])
                    printed["ROOM_ID"] = fields["room_id"]
                    assert fields["join"] == f"http://127.0.0.1:{gw.rooms_port}/rooms/{fields['room_id']}", fields
                elif args == ["rooms", "list"]:
                    assert f"http://127.0.0.1:{gw.rooms_port}/rooms/{printed['ROOM_ID']}" in out.stdout
                elif args[:2] == ["rooms", "delete"]:
                    assert "deleted by the room service" in out.stdout, out.stdout
        assert {"VOICE_ID", "ROOM_ID"} <= set(printed), "the quick start ran the line test and made a room"
    finally:
        cap.stop()
        stop_gateway(gw)
    # what came back: every frame of the shipped file that is not silence, in order (the echo of the tones)
    tones = (ROOT / "config/sipp/echo-test.ul").read_bytes()
    silence = b"\xff" * 160
    frames = [f for f in (tones[i : i + 160] for i in range(0, len(tones), 160)) if f != silence]
    echoed = [RtpPacket.parse(p).payload for _, _, _, p in cap.udp_payloads()]
    heard = [f for f in echoed if f in frames]
    print(f"line test: {len(heard)} of {len(frames)} tone frames came back ({len(echoed)} packets)", printed)
    assert heard == frames, f"{len(heard)} of {len(frames)} tone frames came back ({len(echoed)} packets)"
