"""The CLI for people (issue 17): a misspelt GATEWAY_* variable is said, with the setting it probably meant (one
naming a section's unknown key stays an error at start); `calls` says when there is no CDR store; a project's
numbers are added and removed by command; tables and blocks with local ISO-8601 times by default and today's JSON
with --json; `rooms list` with links, `rooms delete`, links from the running room service; the Video API's rules
for room names in the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

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
    out = subprocess.run([sys.executable, "-m", "gateway", "calls", "--json", "--data-dir", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]" and "no CDR store in" in out.stderr, out
    human = gateway_cli(tmp_path / "nowhere", "calls")
    assert human.stdout.strip() == "no calls" and "no CDR store in" in human.stderr, human


def gateway_cli(data: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(data)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env={**os.environ, **(env or {})})


def test_projects_numbers_add_and_remove(tmp_path: Path) -> None:
    """The demo project gets a number to call from (issue 17: "call a phone" on the demo room needed one); an
    inbound number belongs to one project; a malformed one is refused with the rule."""
    added = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "+15550109999", "--outbound-only", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["numbers"] == [{"number": "+15550109999", "in": False, "out": True}]
    assert gateway_cli(tmp_path, "projects", "create", "--name", "acme").returncode == 0
    taken = gateway_cli(tmp_path, "projects", "numbers", "add", "acme", "15550108888")
    assert taken.returncode == 0
    clash = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "+15550108888", "--json")
    assert clash.returncode == 1 and json.loads(clash.stderr)["error"]["code"] == "conflict", clash.stderr
    bad = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "155501\u00b2\u00b2")
    assert bad.returncode == 2 and "6 to 15 digits" in bad.stderr, bad.stderr
    removed = gateway_cli(tmp_path, "projects", "numbers", "remove", "demo", "15550109999", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["numbers"] == []
    again = gateway_cli(tmp_path, "projects", "numbers", "remove", "demo", "15550109999", "--json")
    assert again.returncode == 1 and json.loads(again.stderr)["error"]["code"] == "not_found"
    human = gateway_cli(tmp_path, "projects", "numbers", "remove", "demo", "15550109999")
    assert human.returncode == 1 and human.stderr.strip() == "gateway: 15550109999 is not a number of 'demo'", human


# -- tables by default, JSON with --json

KOLKATA = {"TZ": "Asia/Kolkata"}  # +05:30 all year: the times are the machine's local zone, with its offset


def a_call(data: Path, voice_id: str, start: float, **fields: str) -> None:
    """One finished call in a CDR store, written by the gateway's own writer."""
    from gateway.store.cdr import CdrStore

    store = CdrStore(data)
    store.open_call(voice_id, "inbound", **{"from": "15551230000", "to": "15550100001", "did": "15550100001",
                                            "trunk": "local", "project": "demo", **fields})
    store.event(voice_id, "answered", ts=start + 1, media_encryption="none")
    store.event(voice_id, "disconnected", ts=start + 73.4, reason="remote_bye", code=200, by="caller")
    store.flush()
    store.close()


def test_calls_and_cdr_print_tables_with_local_times_and_json_on_request(tmp_path: Path) -> None:
    def kolkata(ts: float, timespec: str = "seconds") -> str:
        return datetime.fromtimestamp(ts, ZoneInfo("Asia/Kolkata")).isoformat(timespec=timespec)

    voice_id = "0c3d5b52-8a52-4c43-9d5e-9a1f0f0a0001"
    start = time.time()
    a_call(tmp_path, voice_id, start, **{"from": "\x1b[31mevil\u202e"})  # a caller's From: an escape, a bidi override
    calls = gateway_cli(tmp_path, "calls", env=KOLKATA)
    assert calls.returncode == 0, calls.stderr
    lines = calls.stdout.splitlines()
    assert lines[0].split() == ["STARTED", "VOICE_ID", "DIRECTION", "FROM", "TO", "STATE", "TALK", "END", "CODE",
                                "PROJECT"]
    row = lines[1].split()
    assert row[1:] == [voice_id, "inbound", "\\x1b[31mevil\\u202e", "15550100001", "disconnected", "1:12", "remote_bye",
                       "200", "demo"], lines
    started = row[0]  # the open_call's own clock: local ISO-8601 to the second, with the offset
    assert len(started) == 25 and started[10] == "T" and started.endswith("+05:30"), started
    assert "\x1b" not in calls.stdout and "\u202e" not in calls.stdout
    assert lines[-1] == "1 call, newest first; 'gateway cdr VOICE_ID' for one"
    as_json = gateway_cli(tmp_path, "calls", "--json")
    rows = json.loads(as_json.stdout)
    assert rows[0]["voice_id"] == voice_id and isinstance(rows[0]["started_at"], float)  # today's JSON, epochs
    assert rows[0]["ended_at"] == start + 73.4

    one = gateway_cli(tmp_path, "cdr", voice_id, env=KOLKATA)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(f"call {voice_id}\n"), one.stdout
    assert f"  answered   {kolkata(start + 1)}\n" in one.stdout and "  state      disconnected (remote_bye, 200)" \
        in one.stdout and "  talk       1:12\n" in one.stdout, one.stdout
    assert f"{kolkata(start + 73.4, 'milliseconds')}  disconnected  reason=remote_bye code=200 by=caller" in one.stdout
    assert row[0] in (kolkata(start), kolkata(start + 1))  # open_call reads the clock itself
    assert json.loads(gateway_cli(tmp_path, "cdr", voice_id, "--json").stdout)["events"][-1]["reason"] == "remote_bye"
    missing = gateway_cli(tmp_path, "cdr", "nope")
    assert missing.returncode == 1 and missing.stderr == "gateway: no call nope\n", missing
    missing_json = gateway_cli(tmp_path, "cdr", "nope", "--json")
    assert json.loads(missing_json.stderr) == {"error": {"code": "not_found", "message": "no call nope"}}


def test_projects_show_their_credentials_once_and_clearly(tmp_path: Path) -> None:
    made = gateway_cli(tmp_path, "projects", "create", "--name", "acme", "--number", "+15550109999")
    assert made.returncode == 0, made.stderr
    lines = dict(line.split(None, 1) for line in made.stdout.splitlines()[1:] if not line.startswith("  key "))
    assert made.stdout.startswith("project acme (created)\n")
    assert lines["app_key"].endswith("<- SECRET, shown only now: store it"), made.stdout
    assert lines["webhook_secret"].endswith("<- SECRET, shown only now: store it")
    assert lines["numbers"] == "+15550109999 (in/out)"
    assert "shown only now" in made.stderr and "gateway projects reset-key acme" in made.stderr
    listed = gateway_cli(tmp_path, "projects", "list")
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "APP_ID", "KEY", "NUMBERS", "NOTIFICATION_URL"]
    assert sorted(r.split()[0] for r in rows) == ["acme", "demo"]
    assert lines["app_key"].split()[0] not in listed.stdout  # a fingerprint only
    as_json = json.loads(gateway_cli(tmp_path, "projects", "list", "--json").stdout)
    assert {p["name"] for p in as_json} == {"acme", "demo"} and all("app_key" not in p for p in as_json)
    reset = gateway_cli(tmp_path, "projects", "reset-key", "acme", "--json")
    fresh = json.loads(reset.stdout)
    assert fresh["app_key"] and fresh["app_key"] != lines["app_key"].split()[0] and fresh["webhook_secret"]


def test_room_names_meeting_ids_and_numbers_follow_the_apis_rules(tmp_path: Path) -> None:
    from gateway.store.rooms import NAME_MAX, meeting_id_problem, name_problem

    for bad, why in [("", "1-64 characters"), ("   ", "not only spaces"), ("x" * (NAME_MAX + 1), "1-64"),
                     ("a\tb", "control characters"), ("a\nb", "control characters"), ("\ud800", "Unicode text")]:
        assert why in (name_problem(bad) or ""), bad
        if "\ud800" not in bad:  # a lone surrogate cannot be an argument
            out = gateway_cli(tmp_path, "rooms", "create", "--name", bad)
            assert out.returncode == 2 and f"argument --name: {name_problem(bad)}" in out.stderr, out.stderr
    assert name_problem("x" * NAME_MAX) is None and name_problem("Réunion ☕") is None
    assert meeting_id_problem("1234") is None and meeting_id_problem("12\u00b234") == "4 to 16 digits (0-9)"
    for bad_id in ("123", "1" * 17, "12a4", "\u0661\u0662\u0663\u0664"):  # Arabic-Indic digits pass isdigit()
        out = gateway_cli(tmp_path, "rooms", "create", "--name", "x", "--meeting-id", bad_id)
        assert out.returncode == 2 and "argument --meeting-id: 4 to 16 digits" in out.stderr, out.stderr
    out = gateway_cli(tmp_path, "projects", "create", "--name", "acme", "--number", "12345")
    assert out.returncode == 2 and "6 to 15 digits" in out.stderr
    out = gateway_cli(tmp_path, "rooms", "delete", "../video")
    assert out.returncode == 2 and "a room id is 32 hex digits" in out.stderr
    assert not (tmp_path / "rooms.sqlite").exists()  # nothing was created by a refused command


def test_rooms_list_and_delete_without_a_running_service(tmp_path: Path) -> None:
    made = gateway_cli(tmp_path, "rooms", "create", "--name", "Standup", "--meeting-id", "4242424242", env=KOLKATA)
    assert made.returncode == 0, made.stderr
    fields = dict(line.split(None, 1) for line in made.stdout.splitlines()[1:])
    room_id = fields["room_id"]
    assert made.stdout.startswith("Standup\n") and fields["dial-in"].startswith("meeting ID 4242424242, PIN ")
    assert fields["join"] == f"http://127.0.0.1:8090/rooms/{room_id}"
    assert fields["host"].startswith(f"http://127.0.0.1:8090/rooms/{room_id}?host=") and "+05:30)" in fields["host"]
    assert fields["created"].endswith("+05:30")
    assert "the room service is not running" in made.stderr and "links from the configuration" in made.stderr
    assert "'gateway projects numbers add demo NUMBER --outbound-only'" in made.stderr  # issue 17: "call a phone"
    added = gateway_cli(tmp_path, "projects", "numbers", "add", "demo", "+15550109998", "--outbound-only")
    assert added.returncode == 0, added.stderr
    assert "numbers add" not in gateway_cli(tmp_path, "rooms", "create", "--name", "Board").stderr
    gateway_cli(tmp_path, "rooms", "create", "--name", "Quiet", "--no-sip")
    listed = gateway_cli(tmp_path, "rooms", "list")
    assert listed.stdout.count("\n  join ") == 3 and "dial-in   off" in listed.stdout, listed.stdout
    rooms = json.loads(gateway_cli(tmp_path, "rooms", "list", "--json").stdout)
    assert [r["name"] for r in rooms] == ["Standup", "Board", "Quiet"]
    assert rooms[0]["links"]["join"] == fields["join"] and rooms[0]["sip"]["meeting_id"] == "4242424242"
    gone = gateway_cli(tmp_path, "rooms", "delete", room_id)
    assert gone.returncode == 0 and "deleted from the store (the room service is not running" in gone.stdout, gone
    again = gateway_cli(tmp_path, "rooms", "delete", room_id, "--json")
    assert again.returncode == 1 and json.loads(again.stderr)["error"]["code"] == "not_found"
    left = json.loads(gateway_cli(tmp_path, "rooms", "list", "--json").stdout)
    assert [r["name"] for r in left] == ["Board", "Quiet"]


def test_links_come_from_the_running_room_service_and_delete_goes_through_it(tmp_path: Path) -> None:
    """The service listens on a port its configuration file does not name (a flag, as `gateway run` passes it):
    `rooms create` and `rooms list` link to where it listens; `rooms delete` goes through its Video API (which
    refuses the same names the CLI refuses); once it stops, the CLI says the links come from the configuration."""
    from tests.conftest import free_port, stop_process, wait_until

    port = free_port()
    data = tmp_path / "data"
    log_file = (tmp_path / "rooms.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "rooms", "serve", "--port", str(port), "--data-dir",
                             str(data)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_until(lambda: proc.poll() is None and (data / "room-service.running.json").exists(), 30,
                   "the room service's running file")
        made = gateway_cli(data, "rooms", "create", "--name", "Standup", "--json")
        room = json.loads(made.stdout)
        assert room["links"]["join"] == f"http://127.0.0.1:{port}/rooms/{room['room_id']}", room["links"]
        human = gateway_cli(data, "rooms", "list")
        assert f"links from the room service running at http://127.0.0.1:{port}" in human.stderr, human.stderr
        with urllib.request.urlopen(room["links"]["join"], timeout=10) as page:  # the link works
            assert page.status == 200
        key = json.loads((data / "room-service.json").read_text())["api_key"]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/video/v1/rooms", method="POST",
                                         data=json.dumps({"name": "a\tb"}).encode(),
                                         headers={"Authorization": "Basic " + base64.b64encode(
                                             f"demo:{key}".encode()).decode()})
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("the API took a name with a tab")
        except urllib.error.HTTPError as refused:
            from gateway.store.rooms import name_problem

            assert refused.code == 400 and json.loads(refused.read())["error"]["message"] == \
                f"name: {name_problem('a	b')}"
        deleted = gateway_cli(data, "rooms", "delete", room["room_id"], "--json")
        assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"room_id": room["room_id"],
                                                                         "state": "deleted", "via": "room_service"}
        assert '"room.deleted"' in (tmp_path / "rooms.log").read_text()  # the service did it
        missing = gateway_cli(data, "rooms", "delete", room["room_id"])
        assert missing.returncode == 1 and "no room" in missing.stderr
    finally:
        stop_process(proc)
        log_file.close()
    assert not (data / "room-service.running.json").exists()  # taken away at a clean stop
    after = gateway_cli(data, "rooms", "create", "--name", "Later")
    assert "the room service is not running" in after.stderr and "127.0.0.1:8090" in after.stdout


def test_every_command_that_prints_takes_json() -> None:
    """--json on every command that answers with data: scripts need not guess which ones do."""
    from gateway.cli import parser

    p = parser()
    for argv in (["calls"], ["cdr", "x"], ["rooms", "create", "--name", "x"], ["rooms", "list"],
                 ["rooms", "delete", "0" * 32], ["projects", "create", "--name", "x"], ["projects", "list"],
                 ["projects", "reset-key", "x"], ["projects", "reset-webhook-secret", "x"],
                 ["projects", "numbers", "add", "x", "1555010"], ["projects", "numbers", "remove", "x", "1555010"],
                 ["drain", "w1"], ["prompts", "render"], ["certs", "self-signed", "--name", "x"]):
        assert p.parse_args([*argv, "--json"]).json is True, argv
        assert p.parse_args(argv).json is False, argv


def test_a_room_service_that_does_not_answer_leaves_the_store_to_the_cli(tmp_path: Path) -> None:
    """The running file names a live process (this test's) whose port nobody listens on: the links still come from
    it, and `rooms delete` says the service did not answer and deletes from the store."""
    from tests.conftest import free_port

    closed = free_port()
    (tmp_path / "room-service.running.json").write_text(json.dumps(
        {"pid": os.getpid(), "url": "https://meet.example.com", "api": f"http://127.0.0.1:{closed}", "tls_cert": "",
         "api_user": "demo"}))
    room = json.loads(gateway_cli(tmp_path, "rooms", "create", "--name", "Standup", "--json").stdout)
    assert room["links"]["join"] == f"https://meet.example.com/rooms/{room['room_id']}"
    gone = gateway_cli(tmp_path, "rooms", "delete", room["room_id"])
    assert gone.returncode == 0, gone.stderr
    assert f"the room service at http://127.0.0.1:{closed} did not answer" in gone.stderr, gone.stderr
    assert "deleted from the store (the room service did not answer" in gone.stdout, gone.stdout
