"""The CDR store: every event of every call, under its voice_id, in SQLite (WAL) in the data directory.

Writes go through one writer thread, so the event loop never waits on the disk; reads open their own
connection (the CLI and the API read while the worker writes).

A disk that refuses writes (full, read-only, an I/O error, another process holding the lock too long) never
stops the calls: the writer keeps what it could not write in memory, in order, retries (0.5 s doubling to
5 s) and catches up once the disk takes writes again. While it fails, `status()` says so (the worker turns it
into an alarm: an error log line, metrics, `cluster.alarm_url`); beyond `max_buffered` entries, intermediate
call events are dropped first (counted), then anything: a call's opening and closing rows and the webhook
outbox are kept longest.

URLs in call events (`event_url`) are stored without their credentials (`user:password@`); only the
webhook outbox keeps a URL whole, since it must deliver to it.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import log
from .secure import private_sqlite

logger = logging.getLogger("gateway.cdr")

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    voice_id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    from_number TEXT, to_number TEXT, did TEXT, trunk TEXT, project TEXT, worker TEXT,
    state TEXT NOT NULL,
    started_at REAL NOT NULL, answered_at REAL, ended_at REAL,
    sip_code INTEGER, reason TEXT, room_id TEXT,
    transport TEXT, media_encryption TEXT
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

ADDED_COLUMNS = ("transport", "media_encryption")  # udp/tcp/tls; none/srtp (issue 13)
FINAL = "disconnected"
MAX_BUFFERED = 50_000  # entries held in memory while the disk refuses writes (then the least important go)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0  # a failed write is tried again after this, doubling
STILL_FAILING_LOG_S = 60.0  # while failing, one error line this often
BATCH = 500
Entry = tuple[str, tuple[Any, ...]]


def strip_credentials(url: str) -> str:
    """`url` without `user:password@` (what the CDR, the API and logs may show of a webhook URL)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def connect(path: Path) -> sqlite3.Connection:
    db = private_sqlite(path)  # 0700 directory, 0600 files (issue 11)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
    for column in ADDED_COLUMNS:
        if column not in have:  # a data directory from an older version: add what it lacks (NULL for old rows)
            try:
                db.execute(f"ALTER TABLE calls ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as exc:  # another process added it first, or the store is read-only
                if "duplicate column" not in str(exc) and "readonly" not in str(exc):
                    raise
    return db


class CdrStore:
    def __init__(self, data_dir: Path | str, worker: str = "w1", max_buffered: int = MAX_BUFFERED) -> None:
        self.path = Path(data_dir) / "cdr.sqlite"
        self.worker = worker
        self.max_buffered = max_buffered
        self._db = connect(self.path)
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        # the writer's state, read from other threads (plain attributes: each read is atomic)
        self.error: str | None = None  # the last write error while writes fail; None: the disk takes them
        self.failing_since: float | None = None
        self.write_failures = 0  # failed write attempts (each retried)
        self.buffered = 0  # entries held in memory, not yet written
        self.dropped = 0  # entries given up beyond max_buffered
        self.outages = 0  # times writes started failing
        self.rejected = 0  # rows SQLite could not take, skipped
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._writer, name="cdr-writer", daemon=True)
        self._thread.start()

    def status(self) -> dict[str, Any]:
        """For /healthz, metrics and alarms: whether the store writes, and what waits in memory."""
        return {"ok": self.error is None, "error": self.error, "buffered": self.buffered, "dropped": self.dropped,
                "write_failures": self.write_failures, "outages": self.outages, "rejected": self.rejected,
                "failing_s": round(time.time() - self.failing_since, 1) if self.failing_since else 0.0}

    # -- writing (from the event loop; never blocks on the disk)
    def open_call(self, voice_id: str, direction: str, **fields: Any) -> None:
        now = time.time()
        self._queue.put(("open", (voice_id, direction, fields, now)))
        self.event(voice_id, "initiated", ts=now, **fields)

    def event(self, voice_id: str, state: str, ts: float | None = None, **data: Any) -> None:
        for key, value in data.items():
            if key.endswith("url") and isinstance(value, str) and "@" in value:
                data[key] = strip_credentials(value)
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

    def webhook_url(self, voice_id: str) -> str | None:
        """The URL a call's webhooks go to, whole (the CDR events keep it without credentials)."""
        self.flush()
        row = self._db.execute("SELECT url FROM outbox WHERE voice_id=? ORDER BY seq DESC LIMIT 1", (voice_id,)).fetchone()
        return str(row[0]) if row else None

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
        held: deque[Entry] = deque()  # accepted, not yet written (the disk refused them), oldest first
        delay = RETRY_MIN_S
        retry_at = 0.0
        stop = False
        while True:
            wait = None if not held else max(0.0, retry_at - time.monotonic())
            items: list[Entry | None] = []
            try:
                items.append(self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                pass
            while len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiters = []
            for entry in items:
                if entry is None:
                    stop = True
                elif entry[0] == "sync":
                    waiters.append(entry[1][0])
                else:
                    self._hold(held, entry)
            if held and (self.error is None or stop or time.monotonic() >= retry_at):
                if self._write_held(held):
                    delay = RETRY_MIN_S
                else:
                    retry_at = time.monotonic() + delay
                    delay = min(RETRY_MAX_S, delay * 2)
            self.buffered = len(held)
            for w in waiters:  # a flush never waits on a failing disk longer than one attempt
                w.set()
            if stop:
                if held:
                    log.event(logger, "cdr.lost_at_stop", logging.ERROR, entries=len(held), error=self.error)
                self._db.close()
                return

    def _hold(self, held: deque[Entry], entry: Entry) -> None:
        """Keep `entry` for writing; beyond the bound, intermediate events go first, then anything."""
        if len(held) >= self.max_buffered:
            kind, args = entry
            essential = kind in ("open", "outbox") or (kind == "event" and args[1] in (FINAL, "answered"))
            if not essential or len(held) >= 2 * self.max_buffered:
                if not self.dropped:
                    log.event(logger, "cdr.dropping", logging.ERROR, buffered=len(held), error=self.error)
                self.dropped += 1
                return
        held.append(entry)

    def _write_held(self, held: deque[Entry]) -> bool:
        """Write what is held, in order, BATCH entries per transaction; False when the disk refused (the rest stays
        held, to be tried again)."""
        written = 0
        while held:
            chunk = [held[i] for i in range(min(BATCH, len(held)))]
            try:
                for kind, args in chunk:
                    self._apply_row(kind, args)
                self._db.commit()
            except sqlite3.Error as exc:  # full, read-only, I/O error, locked: nothing of this chunk was written
                try:
                    self._db.rollback()  # also when the COMMIT itself failed: the chunk is tried again whole
                except sqlite3.Error:
                    pass
                self._failed(exc, len(held))
                return False
            for _ in chunk:
                held.popleft()
            written += len(chunk)
        if self.error is not None:
            log.event(logger, "cdr.recovered", logging.WARNING, written=written, dropped=self.dropped,
                      outage_s=round(time.time() - (self.failing_since or time.time()), 1))
            self.error, self.failing_since = None, None
        return True

    def _failed(self, exc: sqlite3.Error, held: int) -> None:
        self.write_failures += 1
        now = time.time()
        if self.error is None:
            self.outages += 1
            self.failing_since = now
            self._last_log = now
            log.event(logger, "cdr.write_failed", logging.ERROR, error=str(exc)[:200], path=str(self.path),
                      buffered=held)
        elif now - self._last_log >= STILL_FAILING_LOG_S:
            self._last_log = now
            log.event(logger, "cdr.still_failing", logging.ERROR, error=str(exc)[:200], buffered=held,
                      dropped=self.dropped, failing_s=round(now - (self.failing_since or now)))
        self.error = f"{type(exc).__name__}: {exc}"[:200]

    def _apply_row(self, kind: str, args: tuple[Any, ...]) -> None:
        """One row; a row SQLite cannot take (a value of the wrong type, text that cannot be encoded) is logged and
        skipped, so it neither stops the writer nor holds every later row back as an outage would."""
        try:
            self._apply(kind, args)
        except (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError, ValueError, TypeError) as exc:
            self.rejected += 1
            log.event(logger, "cdr.row_rejected", logging.ERROR, kind=kind, error=repr(exc)[:200])

    def _apply(self, kind: str, args: tuple[Any, ...]) -> None:
        db = self._db
        if kind == "open":
            self._write_open(db, *args)
        elif kind == "outbox":
            db.execute("INSERT OR IGNORE INTO outbox (event_id, voice_id, worker, project, url, body, created_at)"
                       " VALUES (?,?,?,?,?,?,?)", args)
        elif kind == "outbox_state":
            db.execute("UPDATE outbox SET status=?, attempts=?, last_error=? WHERE event_id=?", args)
        else:
            self._write_event(db, *args)

    def _write_open(self, db: sqlite3.Connection, voice_id: str, direction: str, f: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT OR IGNORE INTO calls (voice_id, direction, from_number, to_number, did, trunk, project, worker,"
            " state, started_at, room_id, transport) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (voice_id, direction, _text(f.get("from")), _text(f.get("to")), _text(f.get("did")), _text(f.get("trunk")),
             _text(f.get("project")), self.worker, "initiated", now, _text(f.get("room_id")), _text(f.get("transport"))),
        )

    def _write_event(self, db: sqlite3.Connection, voice_id: str, state: str, ts: float, data: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (voice_id, ts, state, data) VALUES (?,?,?,?)",
            (voice_id, ts, state, json.dumps(data, default=str)),
        )
        if state == "answered":
            db.execute("UPDATE calls SET state=?, answered_at=?, media_encryption=? WHERE voice_id=? AND state != ?",
                       (state, ts, _text(data.get("media_encryption")), voice_id, FINAL))
        elif state == FINAL:
            db.execute(
                "UPDATE calls SET state=?, ended_at=?, sip_code=?, reason=? WHERE voice_id=? AND state != ?",
                (state, ts, data.get("code"), _text(data.get("reason")), voice_id, FINAL),
            )
        elif state != "initiated" and not state.startswith("recording_"):  # a recording's events: not the call's state
            db.execute("UPDATE calls SET state=?, room_id=COALESCE(?, room_id), "
                       "media_encryption=COALESCE(?, media_encryption) WHERE voice_id=? AND state != ?",
                       (state, _text(data.get("room_id")), _text(data.get("media_encryption")), voice_id, FINAL))



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


def search_calls(data_dir: Path | str, since: float | None = None, until: float | None = None, number: str = "",
                 project: str = "", state: str = "", reason: str = "", limit: int = 50,
                 offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Calls started in [since, until) whose caller or called number (or DID) contains `number`, of `project`, in
    `state`, ended for `reason`; newest first, `limit` from `offset`, and how many match in all (the console)."""
    path = Path(data_dir) / "cdr.sqlite"
    if not path.exists():
        return [], 0
    where, args = ["1=1"], []  # type: tuple[list[str], list[Any]]
    if since is not None:
        where.append("started_at >= ?")
        args.append(since)
    if until is not None:
        where.append("started_at < ?")
        args.append(until)
    if number:
        pattern = "%" + number.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(from_number LIKE ? ESCAPE '\\' OR to_number LIKE ? ESCAPE '\\' OR did LIKE ? ESCAPE '\\')")
        args += [pattern] * 3
    for column, value in (("project", project), ("state", state), ("reason", reason)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    clause = " AND ".join(where)
    db = connect(path)
    try:
        db.row_factory = _row
        total = db.execute(f"SELECT COUNT(*) AS n FROM calls WHERE {clause}", args).fetchone()["n"]
        rows = db.execute(f"SELECT * FROM calls WHERE {clause} ORDER BY started_at DESC, voice_id LIMIT ? OFFSET ?",
                          [*args, limit, offset]).fetchall()
    finally:
        db.close()
    return rows, int(total)
