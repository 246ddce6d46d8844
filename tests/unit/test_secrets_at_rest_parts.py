"""Secrets at rest (issue 11, finding 8) and the projects store's cache (finding 2), without sockets: the data
directory's modes, sealed PINs, hashed app_keys, the conversion of a store written by an older version, and
20,000 unknown app_ids against `ProjectStore.authenticate`."""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import stat
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.store import projects as projects_module
from gateway.store.projects import Number, ProjectStore
from gateway.store.rooms import RoomStore
from gateway.store.secure import KEY_FILE, DataKey

# the tables as an older version wrote them: app_keys and PINs in clear
OLD_SCHEMA = """
CREATE TABLE projects (app_id TEXT PRIMARY KEY, app_key TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
                       data TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
CREATE TABLE rooms (room_id TEXT PRIMARY KEY, name TEXT NOT NULL, meeting_id TEXT UNIQUE, pin TEXT, mpin TEXT,
                    settings TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, project TEXT NOT NULL DEFAULT '');
"""
OLD_KEY = "OldClearAppKeyOfAcme0123456789abcdef"
OLD_PIN, OLD_MPIN = "482913", "775106"


def raw_store(data: Path) -> bytes:
    """Every byte SQLite keeps for the store: the file, its write-ahead log and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(data.glob("rooms.sqlite*")))


def old_store(data: Path) -> None:
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    db = sqlite3.connect(data / "rooms.sqlite")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO projects VALUES (?,?,?,?,?)",
               ("a" * 32, OLD_KEY, "acme", json.dumps({"notification_url": "https://hook:s3cret@example.com/h"}), 1.0))
    db.execute("INSERT INTO rooms VALUES (?,?,?,?,?,?,?,?)", ("r" * 32, "Board", "123456789", OLD_PIN, OLD_MPIN, "{}",
                                                              1.0, "acme"))
    db.commit()
    db.close()
    (data / "rooms.sqlite").chmod(0o644)
    (data / "prompts-cache").mkdir(mode=0o755)
    (data / "prompts-cache" / "en.wav").write_bytes(b"RIFF")
    (data / "prompts-cache" / "en.wav").chmod(0o644)


def assert_private(data: Path) -> None:
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for entry in data.rglob("*"):
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == 0o700, entry
        elif stat.S_ISREG(mode):
            assert stat.S_IMODE(mode) == 0o600, entry


def test_new_store_is_private_and_keeps_no_secret_in_clear(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rooms, projects = RoomStore(data), ProjectStore(data)
    room = rooms.create("Board", meeting_id_digits=9, pin_digits=6)
    sip = room["sip"]
    acme = projects.create("acme", [Number("15550109999")])
    assert rooms.get(room["room_id"])["sip"] == sip == rooms.by_meeting(sip["meeting_id"])["sip"]  # type: ignore[index]
    assert rooms.list()[0]["sip"] == sip and sip["pin"].isdigit() and sip["mpin"].isdigit()
    assert projects.authenticate(acme.app_id, acme.app_key) is not None
    assert (data / "rooms.sqlite-wal").exists() and (data / KEY_FILE).exists()
    assert_private(data)
    raw = raw_store(data)
    for secret in (sip["pin"], sip["mpin"], acme.app_key, acme.webhook_secret):
        assert secret.encode() not in raw, secret
    assert sip["meeting_id"].encode() in raw  # meeting IDs are looked up by value: they stay in clear
    # the ciphertext is bound to its row and column: the PIN moved into the moderator column does not open
    db = sqlite3.connect(data / "rooms.sqlite")
    db.execute("UPDATE rooms SET mpin=pin")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="does not open"):
        rooms.get(room["room_id"])
    rooms.close()
    projects.close()


def test_a_store_written_in_clear_is_converted_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    old_store(data)
    with caplog.at_level(logging.INFO, logger="gateway.store"):
        projects, rooms = ProjectStore(data), RoomStore(data)
    events = [r.getMessage() for r in caplog.records]
    assert events.count("data_dir.tightened") == 1 and events.count("projects.keys_hashed") == 1
    assert events.count("rooms.pins_sealed") == 1 and events.count("projects.url_credentials_removed") == 1
    assert_private(data)
    acme = projects.authenticate("a" * 32, OLD_KEY)  # the application's key goes on working
    assert acme is not None and acme.app_key == "" and len(acme.webhook_secret) >= 32
    assert acme.notification_url == "https://example.com/h"
    assert rooms.get("r" * 32)["sip"] == {"enabled": True, "meeting_id": "123456789", "pin": OLD_PIN,  # type: ignore[index]
                                          "mpin": OLD_MPIN}
    raw = raw_store(data)
    for secret in (OLD_KEY, OLD_PIN, OLD_MPIN, "s3cret", acme.webhook_secret):
        assert secret.encode() not in raw, secret
    projects.close()
    rooms.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.store"):  # once: the next opening has nothing to convert
        ProjectStore(data).close()
        RoomStore(data).close()
    assert caplog.records == []


def test_reset_key_ends_the_old_key_and_the_internal_key(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    acme = store.create("acme")
    internal = store.internal_key(acme)
    assert store.authenticate(acme.app_id, internal) is not None
    assert "app_key" not in store.list()[0].public(with_key=True)  # never again after creation
    assert store.list()[0].public()["app_key_fingerprint"] == acme.key_fingerprint
    fresh = store.reset_key("acme")
    assert fresh is not None and fresh.app_key != acme.app_key and fresh.webhook_secret != acme.webhook_secret
    other = ProjectStore(tmp_path)  # another process sharing the data dir
    for s in (store, other):
        assert s.authenticate(acme.app_id, acme.app_key) is None and s.authenticate(acme.app_id, internal) is None
        assert s.authenticate(acme.app_id, fresh.app_key) is not None
        assert s.by_name("acme").webhook_secret == fresh.webhook_secret  # type: ignore[union-attr]
    hook = store.reset_webhook_secret("acme")
    assert hook is not None and hook.webhook_secret != fresh.webhook_secret and hook.app_key == ""
    assert store.authenticate(acme.app_id, fresh.app_key) is not None
    assert store.reset_key("nobody") is None and store.authenticate(acme.app_id, "é" * 40) is None
    store.close()
    other.close()


def test_notification_url_with_credentials_is_refused(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    with pytest.raises(ValueError, match="user:password"):
        store.create("acme", notification_url="https://u:p@example.com/hook")
    acme = store.create("acme", notification_url="https://example.com/hook?at=@x")  # an @ after the host is fine
    acme.notification_url = "http://u@example.com/"
    with pytest.raises(ValueError, match="user:password"):
        store.update(acme)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[[projects]]\nname = "demo"\nnotification_url = "https://u:p@example.com/h"\n')
    with pytest.raises(ConfigError, match=r"projects\[0\].notification_url: no user:password@"):
        load_config(cfg)
    store.close()


def test_a_store_opened_with_another_key_is_refused(tmp_path: Path) -> None:
    RoomStore(tmp_path).create("Board")
    (tmp_path / KEY_FILE).write_text(base64.b64encode(os.urandom(32)).decode())
    from gateway.store import secure

    secure._keys.clear()  # a new process: it reads the file again
    with pytest.raises(ConfigError, match="is not the key that sealed"):
        RoomStore(tmp_path)
    assert DataKey.load(tmp_path).path == (tmp_path / KEY_FILE).resolve()


def test_unknown_app_ids_do_not_grow_the_cache(tmp_path: Path) -> None:
    """Issue 11, finding 2: 20,000 requests with random 5.8 KB app_ids. Before, each one stayed in the cache
    (about 120 MB of keys and entries); now only found projects are cached, at most CACHE_SIZE."""
    store = ProjectStore(tmp_path)
    acme = store.create("acme")
    assert store.authenticate(acme.app_id, acme.app_key) is not None
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    for i in range(20_000):
        app_id = f"{i:08d}" + os.urandom(2896).hex()[: 5800 - 8]
        assert store.authenticate(app_id, "x" * 32) is None
    elapsed = time.perf_counter() - started
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"20000 unknown 5.8 KB app_ids: cache entries {len(store._cache)}, memory grown {grown / 1e6:.2f} MB, "
          f"{elapsed * 1e6 / 20_000:.0f} us each")
    assert len(store._cache) <= 1 and grown < 2_000_000
    names = [store.create(f"p{i}").name for i in range(projects_module.CACHE_SIZE + 10)]
    for name in names:  # even real projects are cached only up to the bound
        assert store.by_name(name) is not None
    assert len(store._cache) == projects_module.CACHE_SIZE
    store.close()
