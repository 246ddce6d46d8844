"""The CDR store when the disk refuses writes: nothing raises into the caller, the writer keeps what it could not
write (in order, bounded), reports it in `status()`, and catches up once the disk takes writes again. The disk is
faked here (a connection whose writes fail on demand); tests/integration/test_chaos.py fills and freezes a real one."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway.store import cdr
from gateway.store.cdr import CdrStore
from tests.conftest import wait_until


class FlakyDisk:
    """The store's connection, with writes failing while `full` is set (as SQLite reports a full disk)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = False
        self.failed = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.full and sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def flaky(store: CdrStore) -> FlakyDisk:
    store.flush()
    disk = FlakyDisk(store._db)
    store._db = disk  # type: ignore[assignment]
    return disk


def test_writes_are_held_while_the_disk_is_full_and_written_in_order_after(tmp_path: Path) -> None:
    store = CdrStore(tmp_path, worker="w1")
    disk = flaky(store)
    try:
        store.open_call("a", "inbound", did="1")
        store.flush()
        disk.full = True
        store.event("a", "answered")
        store.open_call("b", "inbound", did="2")
        store.outbox_add("e1", "a", "demo", "http://x/hooks", b"{}", time.time())
        store.event("a", "disconnected", reason="remote_bye", code=200)
        store.flush()
        wait_until(lambda: not store.status()["ok"], 5, "the store to report the failure")
        status = store.status()
        assert status["buffered"] >= 4 and status["dropped"] == 0 and "disk is full" in status["error"]
        assert cdr.get_call(tmp_path, "a")["state"] == "initiated"  # nothing of the outage written yet
        disk.full = False
        wait_until(lambda: store.status()["ok"], 10, "the store to catch up")
        assert store.status()["buffered"] == 0 and store.status()["outages"] == 1
        call = cdr.get_call(tmp_path, "a")
        assert call["state"] == "disconnected" and call["reason"] == "remote_bye" and call["answered_at"]
        assert [e["state"] for e in call["events"]] == ["initiated", "answered", "disconnected"]
        assert cdr.get_call(tmp_path, "b")["state"] == "initiated"
        assert [r["event_id"] for r in store.outbox_pending()] == ["e1"]
    finally:
        store.close()


def test_beyond_the_bound_intermediate_events_go_first(tmp_path: Path) -> None:
    store = CdrStore(tmp_path, worker="w1", max_buffered=10)
    disk = flaky(store)
    try:
        disk.full = True
        for i in range(5):
            store.open_call(f"c{i}", "inbound")  # open + initiated: 10 entries, the bound
        for i in range(5):
            store.event(f"c{i}", "media_updated")  # intermediate: dropped
            store.event(f"c{i}", "disconnected", reason="remote_bye")  # essential: kept up to twice the bound
        store.flush()
        wait_until(lambda: store.status()["dropped"] == 5, 5, "five intermediate events dropped")
        disk.full = False
        wait_until(lambda: store.status()["ok"] and store.status()["buffered"] == 0, 10, "caught up")
        for i in range(5):
            call = cdr.get_call(tmp_path, f"c{i}")
            assert call["state"] == "disconnected" and [e["state"] for e in call["events"]] == ["initiated", "disconnected"]
    finally:
        store.close()


def test_close_with_the_disk_still_full_does_not_hang(tmp_path: Path) -> None:
    store = CdrStore(tmp_path, worker="w1")
    disk = flaky(store)
    disk.full = True
    store.open_call("a", "inbound")
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 5 and not store._thread.is_alive()
