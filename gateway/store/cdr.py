"""The CDR store: every event of every call, under its voice_id, in SQLite (WAL) in the data directory.

Writes go through one writer thread, so the event loop never waits on the disk; reads open their own
connection (the CLI and the API read while the worker writes).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("gateway.cdr")

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    voice_id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    from_number TEXT, to_number TEXT, did TEXT, trunk TEXT, project TEXT, worker TEXT,
    state TEXT NOT NULL,
    started_at REAL NOT NULL, answered_at REAL, ended_at REAL,
    sip_code INTEGER, reason TEXT, room_id TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    voice_id TEXT NOT NULL,
    ts REAL NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_voice ON events(voice_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    voice_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    project TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(status, worker, seq);
CREATE INDEX IF NOT EXISTS calls_started ON calls(started_at);
"""

FINAL = "disconnected"


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


class CdrStore:
    def __init__(self, data_dir: Path | str, worker: str = "w1") -> None:
        self.path = Path(data_dir) / "cdr.sqlite"
        self.worker = worker
        self._db = connect(self.path)
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="cdr-writer", daemon=True)
        self._thread.start()

    # -- writing (from the event loop; never blocks on the disk)
    def open_call(self, voice_id: str, direction: str, **fields: Any) -> None:
        now = time.time()
        self._queue.put(("open", (voice_id, direction, fields, now)))
        self.event(voice_id, "initiated", ts=now, **fields)

    def event(self, voice_id: str, state: str, ts: float | None = None, **data: Any) -> None:
        self._queue.put(("event", (voice_id, state, time.time() if ts is None else ts, data)))

    # -- the webhook outbox (same writer, so an event is stored in the order it happened)
    def outbox_add(self, event_id: str, voice_id: str, project: str, url: str, body: bytes, created: float,
                   worker: str | None = None) -> None:
        """`worker`: whose outbox (the supervisor writes into a lost worker's, which delivers it once back)."""
        self._queue.put(("outbox", (event_id, voice_id, worker or self.worker, project, url, body, created)))

    def outbox_state(self, event_id: str, status: str, attempts: int, error: str | None = None) -> None:
        self._queue.put(("outbox_state", (status, attempts, error, event_id)))

    def outbox_pending(self, worker: str | None = None) -> list[dict[str, Any]]:
        """Webhook events not yet delivered (nor given up), oldest first: what a restart resumes."""
        self.flush()
        cur = self._db.execute(
            "SELECT event_id, voice_id, project, url, body, created_at, attempts FROM outbox"
            " WHERE status='pending' AND worker=? ORDER BY seq", (worker or self.worker,))
        return [_row(cur, r) for r in cur.fetchall()]

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self._queue.put(("sync", (done,)))
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def close_stale(self, reason: str, worker: str | None = None) -> list[str]:
        """Close calls left open (a crash, a lost worker): `disconnected` with `reason`. Returns their ids."""
        self.flush()
        rows = self._db.execute(
            "SELECT voice_id FROM calls WHERE state != ? AND (? IS NULL OR worker = ?)", (FINAL, worker, worker)
        ).fetchall()
        for (voice_id,) in rows:
            self.event(voice_id, FINAL, reason=reason)
        self.flush()
        return [r[0] for r in rows]

    def _writer(self) -> None:
        db = self._db
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiters = []
            with db:
                for entry in batch:
                    if entry is None:
                        continue
                    kind, args = entry
                    if kind == "sync":
                        waiters.append(args[0])
                        continue
                    try:
                        self._write(db, kind, args)
                    except (sqlite3.Error, ValueError, TypeError) as exc:  # one bad row must not stop the writer
                        logger.error("cdr.write_failed", extra={"fields": {"kind": kind, "error": repr(exc)[:200]}})
            for w in waiters:
                w.set()
            if None in batch:
                db.close()
                return

    def _write(self, db: sqlite3.Connection, kind: str, args: Any) -> None:
        if kind == "open":
            self._write_open(db, *args)
        elif kind == "outbox":
            db.execute("INSERT INTO outbox (event_id, voice_id, worker, project, url, body, created_at)"
                       " VALUES (?,?,?,?,?,?,?)", args)
        elif kind == "outbox_state":
            db.execute("UPDATE outbox SET status=?, attempts=?, last_error=? WHERE event_id=?", args)
        else:
            self._write_event(db, *args)

    def _write_open(self, db: sqlite3.Connection, voice_id: str, direction: str, f: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT OR IGNORE INTO calls (voice_id, direction, from_number, to_number, did, trunk, project, worker,"
            " state, started_at, room_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (voice_id, direction, _text(f.get("from")), _text(f.get("to")), _text(f.get("did")), _text(f.get("trunk")),
             _text(f.get("project")), self.worker, "initiated", now, _text(f.get("room_id"))),
        )

    def _write_event(self, db: sqlite3.Connection, voice_id: str, state: str, ts: float, data: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (voice_id, ts, state, data) VALUES (?,?,?,?)",
            (voice_id, ts, state, json.dumps(data, default=str)),
        )
        if state == "answered":
            db.execute("UPDATE calls SET state=?, answered_at=? WHERE voice_id=? AND state != ?", (state, ts, voice_id, FINAL))
        elif state == FINAL:
            db.execute(
                "UPDATE calls SET state=?, ended_at=?, sip_code=?, reason=? WHERE voice_id=? AND state != ?",
                (state, ts, data.get("code"), _text(data.get("reason")), voice_id, FINAL),
            )
        elif state != "initiated":
            db.execute("UPDATE calls SET state=?, room_id=COALESCE(?, room_id) WHERE voice_id=? AND state != ?",
                       (state, _text(data.get("room_id")), voice_id, FINAL))


def _text(value: Any) -> Any:
    """A string SQLite can store: what the network sent is kept, undecodable bytes (surrogates) as escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


# -- reading (CLI, API)
def _row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


def list_calls(data_dir: Path | str, limit: int = 100, active_only: bool = False,
               project: str | None = None) -> list[dict[str, Any]]:
    path = Path(data_dir) / "cdr.sqlite"
    if not path.exists():
        return []
    db = connect(path)
    db.row_factory = _row
    where = "WHERE (? IS NULL OR project = ?)" + (" AND state != 'disconnected'" if active_only else "")
    rows = db.execute(f"SELECT * FROM calls {where} ORDER BY started_at DESC LIMIT ?", (project, project, limit)).fetchall()
    db.close()
    return rows


def get_call(data_dir: Path | str, voice_id: str) -> dict[str, Any] | None:
    path = Path(data_dir) / "cdr.sqlite"
    if not path.exists():
        return None
    db = connect(path)
    db.row_factory = _row
    call = db.execute("SELECT * FROM calls WHERE voice_id=?", (voice_id,)).fetchone()
    if call is None:
        db.close()
        return None
    events = db.execute("SELECT ts, state, data FROM events WHERE voice_id=? ORDER BY id", (voice_id,)).fetchall()
    db.close()
    call["events"] = [{"ts": e["ts"], "state": e["state"], **json.loads(e["data"])} for e in events]
    return call
