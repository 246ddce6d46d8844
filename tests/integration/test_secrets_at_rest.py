"""Issue 11, finding 8 (secrets at rest), against a real `gateway run`: the data directory of an older version
(0755, a world-readable rooms.sqlite with an app_key and PINs in clear) is tightened and converted; the rooms and
projects made afterwards by the CLI and the Video API keep no app_key, webhook secret or PIN in clear; another
local user reads nothing; a project's key works until `gateway projects reset-key`, then only the new one does."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_test_config, start_gateway, stop_gateway, wait_until
from tests.integration.voice_tools import cli

pytestmark = pytest.mark.timeout(150)
OLD_APP_ID, OLD_KEY = "0" * 32, "ClearKeyOfTheOldProject-0123456789"
OLD_PIN, OLD_MPIN = "640215", "918337"
NUMBER = "15550107001"
STRANGER = 65534  # nobody


def write_old_store(data: Path) -> None:
    """rooms.sqlite as the version before this one left it (app_key, PIN, moderator PIN in clear; 0644 in 0755)."""
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    db = sqlite3.connect(data / "rooms.sqlite")
    db.executescript("""
        CREATE TABLE projects (app_id TEXT PRIMARY KEY, app_key TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
                               data TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
        CREATE TABLE rooms (room_id TEXT PRIMARY KEY, name TEXT NOT NULL, meeting_id TEXT UNIQUE, pin TEXT,
                            mpin TEXT, settings TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
                            project TEXT NOT NULL DEFAULT '');""")
    db.execute("INSERT INTO projects VALUES (?,?,?,?,?)", (OLD_APP_ID, OLD_KEY, "legacy", "{}", 1.0))
    db.execute("INSERT INTO rooms VALUES (?,?,?,?,?,?,?,?)",
               ("f" * 32, "Old room", "555000111", OLD_PIN, OLD_MPIN, "{}", 1.0, "legacy"))
    db.commit()
    db.close()
    (data / "rooms.sqlite").chmod(0o644)


def request(url: str, method: str = "GET", body: Any = None, user: str = "", key: str = "") -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def gateway_on_old_data() -> Iterator[Gateway]:
    # a parent any local user may traverse (pytest's own tmp dirs are 0700, which would hide the data dir's modes)
    base = Path(tempfile.mkdtemp(prefix="gw-secrets-"))
    base.chmod(0o755)
    write_old_store(base / "data")
    gw = start_gateway(base, make_test_config())
    try:
        wait_until(lambda: '"rooms.started"' in gw.log(), 90, "the room service")
        yield gw
    finally:
        stop_gateway(gw)
        shutil.rmtree(base, ignore_errors=True)


def stranger_reads(path: Path) -> bool:
    """Whether another local user (nobody) can list or read `path`."""
    cmd = ["ls", str(path)] if path.is_dir() else ["cat", str(path)]
    return subprocess.run(cmd, user=STRANGER, group=STRANGER, extra_groups=[], capture_output=True,
                          timeout=10).returncode == 0


def test_data_dir_private_and_no_secret_in_clear(gateway_on_old_data: Gateway) -> None:
    gw = gateway_on_old_data
    data = gw.data_dir
    acme = cli(data, "projects", "create", "--name", "acme", "--number", NUMBER)
    board = cli(data, "rooms", "create", "--name", "Board", "--project", "acme")
    rooms_api = f"http://127.0.0.1:{gw.rooms_port}"
    status, owned = request(f"{rooms_api}/video/v1/rooms", "POST", {"name": "Owned", "settings": {"sip": {"enabled": True}}},
                            acme["app_id"], acme["app_key"])
    assert status == 201, owned
    # the room's owner sees its PINs through the authenticated API; the IVR still checks them (in clear for callers)
    status, seen = request(f"{rooms_api}/video/v1/rooms/{owned['room_id']}", user=acme["app_id"], key=acme["app_key"])
    assert status == 200 and seen["sip"] == owned["sip"] and owned["sip"]["pin"].isdigit()
    assert any(r["sip"]["pin"] == OLD_PIN and r["sip"]["mpin"] == OLD_MPIN for r in cli(data, "rooms", "list"))
    assert '"data_dir.tightened"' in gw.log() and '"projects.keys_hashed"' in gw.log()

    # modes: the directory 0700, every directory in it 0700 and every file 0600 (SQLite's -wal/-shm included: they
    # take the database file's mode)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if not p.is_symlink()]
    assert {"rooms.sqlite", "rooms.sqlite-wal", "rooms.sqlite-shm", "cdr.sqlite", "cdr.sqlite-wal", "store.key",
            "room-service.json"} <= {p.name for p in files}
    loose = [(str(p), oct(stat.S_IMODE(p.lstat().st_mode))) for p in files
             if stat.S_IMODE(p.lstat().st_mode) != (0o700 if p.is_dir() else 0o600) and not p.is_socket()]
    assert loose == [] and all(not stat.S_IMODE(p.lstat().st_mode) & 0o077 for p in files)
    if os.geteuid() == 0:  # the attack: another local user reads the store (before: rooms.sqlite was 0644 in 0755)
        assert stranger_reads(gw.data_dir.parent)  # the parent is open: only the data dir's own modes protect it
        assert not any(stranger_reads(p) for p in (data, data / "rooms.sqlite", data / "store.key", data / "cdr.sqlite"))

    # the raw bytes of the store (file, WAL, shared memory): no app_key, webhook secret or PIN in clear
    raw = b"".join(p.read_bytes() for p in data.glob("rooms.sqlite*"))
    secrets = [OLD_KEY, OLD_PIN, OLD_MPIN, acme["app_key"], acme["webhook_secret"]]
    secrets += [room["sip"][k] for room in (board, owned) for k in ("pin", "mpin")]
    assert [s for s in secrets if s.encode() in raw] == []
    assert board["sip"]["meeting_id"].encode() in raw  # what is looked up by value stays in clear

    # the key authenticates on the Voice API and the Video API; the legacy project's key survived the conversion
    voice = f"http://127.0.0.1:{gw.http_port}/voice/v1/calls"
    assert request(voice, user=acme["app_id"], key=acme["app_key"])[0] == 200
    assert request(voice, user=OLD_APP_ID, key=OLD_KEY)[0] == 200
    # the room page's "call a phone" reaches the Voice API as the room's project without its app_key in the store
    # (refused for the number, i.e. after authentication; 401 would mean the room service could not sign in)
    host = seen["links"]["host"].split("host=")[1]
    status, body = request(f"{rooms_api}/rooms/{owned['room_id']}/dial", "POST", {"to": "not a number", "host": host})
    assert status == 400 and body["error"]["field"] == "to", body

    # reset-key: a new key, shown once; the old one stops working (within the stores' 2 s cache), the new one works
    fresh = cli(data, "projects", "reset-key", "acme")
    assert fresh["app_key"] != acme["app_key"] and fresh["webhook_secret"] != acme["webhook_secret"]
    wait_until(lambda: request(voice, user=acme["app_id"], key=acme["app_key"])[0] == 401, 10,
               "the old key to be refused", interval=0.5)
    assert request(f"{rooms_api}/video/v1/rooms/{owned['room_id']}", user=acme["app_id"], key=acme["app_key"])[0] == 401
    assert request(voice, user=acme["app_id"], key=fresh["app_key"])[0] == 200
    listed = next(p for p in cli(data, "projects", "list") if p["name"] == "acme")
    assert "app_key" not in listed and "webhook_secret" not in listed
    assert listed["app_key_fingerprint"] == fresh["app_key_fingerprint"] != acme["app_key_fingerprint"]
    raw = b"".join(p.read_bytes() for p in data.glob("rooms.sqlite*"))
    assert fresh["app_key"].encode() not in raw and fresh["webhook_secret"].encode() not in raw


def test_notification_url_with_credentials_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "projects", "create", "--name", "x",
                          "--notification-url", "https://user:pass@example.com/hook", "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2 and "--notification-url: no user:password@" in out.stderr, out.stderr
