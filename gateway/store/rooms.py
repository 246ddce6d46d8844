"""The room store: rooms with their meeting ID, PIN and moderator PIN (SQLite in the data directory, shared by
the workers, the room service and the CLI; `gateway rooms create`).

The file holds the PINs sealed (AES-GCM under the data directory's key, `secure.DataKey`): they must stay
recoverable (the room page shows them, the room's owner reads them through the Video API), so they are encrypted
rather than hashed; `create`, `get`, `by_meeting` and `list` return them in clear. Meeting IDs stay in clear
(they are looked up by value). A store written before PINs were sealed is sealed in place when opened.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import sqlite3
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

from .. import log
from ..config import ConfigError
from .secure import DataKey, private_sqlite, sealed

logger = logging.getLogger("gateway.store")
NAME_MAX = 64  # characters in a room's name (the page's title and tiles)
MEETING_ID_DIGITS = (4, 16)  # a meeting ID given by hand (`--meeting-id`): ASCII digits, this many


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a room's name, or None: the one rule for the Video API and the CLI. A string of
    1-NAME_MAX characters of Unicode text (JSON can carry lone surrogates, which UTF-8 and SQLite cannot), not
    blank, without control characters (a name is one line on the page and in a table)."""
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not name.strip():
        return f"a string of 1-{NAME_MAX} characters, not only spaces"
    try:
        name.encode()
    except UnicodeEncodeError:
        return "Unicode text (no lone surrogates)"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "no control characters (tabs, new lines, escapes)"
    return None


def meeting_id_problem(meeting_id: str) -> str | None:
    """Why `meeting_id` cannot be given to a room, or None: what a keypad can type and the IVR collects."""
    low, high = MEETING_ID_DIGITS
    if not (meeting_id.isascii() and meeting_id.isdigit() and low <= len(meeting_id) <= high):
        return f"{low} to {high} digits (0-9)"
    return None
# the data directory's key that sealed this file's secrets (a check value, not the key): see `store_key`
META = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    room_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    meeting_id TEXT UNIQUE,
    pin TEXT, mpin TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    project TEXT NOT NULL DEFAULT ''
);
"""

CLEAR_PINS = "(pin IS NOT NULL AND pin NOT LIKE 'v1.%') OR (mpin IS NOT NULL AND mpin NOT LIKE 'v1.%')"


def _digits(n: int) -> str:
    return "".join(str(secrets.randbelow(10)) for _ in range(n))


def open_store(data_dir: Path | str, schema: str) -> sqlite3.Connection:
    """DATA_DIR/rooms.sqlite (WAL): rooms and projects, shared by the workers, the room service and the CLI.
    The directory is 0700 and the file 0600 before SQLite writes to it (its -wal and -shm take its mode)."""
    db = private_sqlite(Path(data_dir) / "rooms.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(META + schema)
    return db


def store_key(db: sqlite3.Connection, data_dir: Path | str) -> DataKey:
    """The data directory's key, checked against the one this store was sealed with (a store copied or restored
    without its DATA_DIR/store.key would otherwise fail later, one PIN at a time)."""
    key = DataKey.load(data_dir)
    with db:
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('key_check', ?)", (key.check(),))
    stored = db.execute("SELECT value FROM meta WHERE name='key_check'").fetchone()[0]
    if not hmac.compare_digest(str(stored), key.check()):
        raise ConfigError(f"{key.path} is not the key that sealed {Path(data_dir) / 'rooms.sqlite'}: restore the key "
                          "file from the same backup as the store")
    return key


def rewrite(db: sqlite3.Connection, migrate: Any) -> int:
    """Run `migrate(db) -> rows changed` in one write transaction (re-reading inside it, so concurrent openers
    migrate once), with the replaced clear values zeroed in the file and the WAL emptied afterwards."""
    db.execute("PRAGMA secure_delete=ON")
    db.execute("BEGIN IMMEDIATE")
    try:
        changed = int(migrate(db))
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.execute("PRAGMA secure_delete=OFF")
    if changed:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # old page images with clear values leave the WAL
    return changed


class RoomStore:
    def __init__(self, data_dir: Path | str) -> None:
        self._db = open_store(data_dir, SCHEMA)
        self._key = store_key(self._db, data_dir)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(rooms)")}
        if "project" not in columns:  # a store made before rooms belonged to projects
            with self._db:
                self._db.execute("ALTER TABLE rooms ADD COLUMN project TEXT NOT NULL DEFAULT ''")
        self._db.row_factory = sqlite3.Row
        if self._db.execute(f"SELECT 1 FROM rooms WHERE {CLEAR_PINS} LIMIT 1").fetchone() is not None:
            sealed_now = rewrite(self._db, self._seal_clear_pins)
            if sealed_now:  # else another process sealed them meanwhile
                log.event(logger, "rooms.pins_sealed", logging.WARNING, rooms=sealed_now,
                          note="PINs written in clear by an older version are now encrypted in place")

    def _seal(self, room_id: str, column: str, value: str | None) -> str | None:
        return None if value is None else self._key.seal(value, f"room:{room_id}:{column}")

    def _unseal(self, room_id: str, column: str, value: str | None) -> str | None:
        return value if value is None or not sealed(value) else self._key.unseal(value, f"room:{room_id}:{column}")

    def _seal_clear_pins(self, db: sqlite3.Connection) -> int:
        rows = db.execute(f"SELECT room_id, pin, mpin FROM rooms WHERE {CLEAR_PINS}").fetchall()
        for row in rows:
            room_id = row["room_id"]
            pin, mpin = (v if v is None or sealed(v) else self._seal(room_id, c, v)
                         for c, v in (("pin", row["pin"]), ("mpin", row["mpin"])))
            db.execute("UPDATE rooms SET pin=?, mpin=? WHERE room_id=?", (pin, mpin, room_id))
        return len(rows)

    def create(self, name: str, sip_enabled: bool = True, meeting_id_digits: int = 9, pin_digits: int = 6,
               settings: dict[str, Any] | None = None, meeting_id: str | None = None,
               project: str = "") -> dict[str, Any]:
        """A new room; with `meeting_id` given (e.g. numbers kept from another system) it must be free."""
        room_id = uuid.uuid4().hex
        for _ in range(1 if meeting_id else 100):
            meeting_id = meeting_id or (_digits(meeting_id_digits) if sip_enabled else None)
            pin = _digits(pin_digits) if sip_enabled else None
            mpin = pin
            while sip_enabled and mpin == pin:
                mpin = _digits(pin_digits)
            try:
                with self._db:
                    self._db.execute(
                        "INSERT INTO rooms (room_id, name, meeting_id, pin, mpin, settings, created_at, project)"
                        " VALUES (?,?,?,?,?,?,?,?)",
                        (room_id, name, meeting_id, self._seal(room_id, "pin", pin), self._seal(room_id, "mpin", mpin),
                         json.dumps(settings or {}), time.time(), project))
                return self.get(room_id)  # type: ignore[return-value]
            except sqlite3.IntegrityError:
                meeting_id = None
                continue  # meeting ID already taken: draw again
        raise ValueError("meeting ID already in use (or none free: raise rooms.meeting_id_digits)")

    def _public(self, row: sqlite3.Row) -> dict[str, Any]:
        room_id = row["room_id"]
        return {
            "room_id": room_id, "name": row["name"], "created_at": row["created_at"], "project": row["project"],
            "settings": json.loads(row["settings"]),
            "sip": {"enabled": row["meeting_id"] is not None, "meeting_id": row["meeting_id"],
                    "pin": self._unseal(room_id, "pin", row["pin"]), "mpin": self._unseal(room_id, "mpin", row["mpin"])},
        }

    def get(self, room_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM rooms WHERE room_id=?", (room_id,)).fetchone()
        return None if row is None else self._public(row)

    def by_meeting(self, meeting_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM rooms WHERE meeting_id=?", (meeting_id,)).fetchone()
        return None if row is None else self._public(row)

    def list(self, project: str | None = None) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM rooms WHERE ? IS NULL OR project=? ORDER BY created_at", (project, project))
        return [self._public(r) for r in rows]

    def delete(self, room_id: str) -> bool:
        with self._db:
            return self._db.execute("DELETE FROM rooms WHERE room_id=?", (room_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


def check_pin(room: dict[str, Any], pin: str) -> str | None:
    sip = room["sip"]
    if sip["mpin"] and hmac.compare_digest(sip["mpin"], pin):
        return "moderator"
    if sip["pin"] and hmac.compare_digest(sip["pin"], pin):
        return "participant"
    return None
