"""The room store: rooms with their meeting ID, PIN and moderator PIN (SQLite in the data directory, shared by
the workers, the room service and the CLI; `gateway rooms create`)."""

from __future__ import annotations

import hmac
import json
import secrets
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

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


def _digits(n: int) -> str:
    return "".join(str(secrets.randbelow(10)) for _ in range(n))


def open_store(data_dir: Path | str, schema: str) -> sqlite3.Connection:
    """DATA_DIR/rooms.sqlite (WAL): rooms and projects, shared by the workers, the room service and the CLI."""
    path = Path(data_dir) / "rooms.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db


class RoomStore:
    def __init__(self, data_dir: Path | str) -> None:
        self._db = open_store(data_dir, SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(rooms)")}
        if "project" not in columns:  # a store made before rooms belonged to projects
            with self._db:
                self._db.execute("ALTER TABLE rooms ADD COLUMN project TEXT NOT NULL DEFAULT ''")
        self._db.row_factory = sqlite3.Row

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
                        (room_id, name, meeting_id, pin, mpin, json.dumps(settings or {}), time.time(), project))
                return self.get(room_id)  # type: ignore[return-value]
            except sqlite3.IntegrityError:
                meeting_id = None
                continue  # meeting ID already taken: draw again
        raise ValueError("meeting ID already in use (or none free: raise rooms.meeting_id_digits)")

    @staticmethod
    def _public(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "room_id": row["room_id"], "name": row["name"], "created_at": row["created_at"], "project": row["project"],
            "settings": json.loads(row["settings"]),
            "sip": {"enabled": row["meeting_id"] is not None, "meeting_id": row["meeting_id"], "pin": row["pin"],
                    "mpin": row["mpin"]},
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
