"""Rooms and the room directory the IVR resolves meeting ID + PIN against.

`Directory` is the interface: `exists(meeting_id)` and `resolve(meeting_id, pin) -> (room_id, role)`.
`EmbeddedDirectory` reads the local room store (SQLite in the data directory; `gateway rooms create`);
`HttpDirectory` asks an external room service. Either raises `DirectoryUnavailable` when it cannot answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from redis.exceptions import RedisError

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


class DirectoryUnavailable(RuntimeError):
    pass


class Directory(Protocol):
    async def exists(self, meeting_id: str) -> bool: ...

    async def resolve(self, meeting_id: str, pin: str) -> tuple[str, str] | None:
        """(room_id, role) with role "moderator" for the mpin, "participant" for the pin; None if wrong."""
        ...


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


class EmbeddedDirectory:
    def __init__(self, store: RoomStore) -> None:
        self.store = store

    async def exists(self, meeting_id: str) -> bool:
        return await asyncio.to_thread(self.store.by_meeting, meeting_id) is not None

    async def resolve(self, meeting_id: str, pin: str) -> tuple[str, str] | None:
        room = await asyncio.to_thread(self.store.by_meeting, meeting_id)
        role = None if room is None else check_pin(room, pin)
        return None if role is None or room is None else (room["room_id"], role)


class HttpDirectory:
    """An external room service:

    GET  {url}/meetings/{meeting_id}           -> 200 {"room_id"} | 404
    POST {url}/meetings/{meeting_id}/verify    {"pin"} -> 200 {"room_id", "role"} | 403
    with HTTP Basic credentials; anything else, or no answer within the timeout, is "unavailable".
    """

    def __init__(self, url: str, username: str = "", password: str = "", timeout: float = 3.0) -> None:
        self.url = url.rstrip("/")
        self.auth = aiohttp.BasicAuth(username, password) if username else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout, auth=self.auth)
        return self._session

    async def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        try:
            async with self._client().request(method, self.url + path, json=body) as r:
                data = await r.json(content_type=None) if r.status == 200 else {}
                if r.status >= 500 or r.status in (401, 407):
                    raise DirectoryUnavailable(f"room directory answered {r.status}")
                return r.status, data or {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DirectoryUnavailable(f"room directory unreachable: {exc.__class__.__name__}: {exc}") from exc

    async def exists(self, meeting_id: str) -> bool:
        status, _ = await self._call("GET", f"/meetings/{meeting_id}")
        return status == 200

    async def resolve(self, meeting_id: str, pin: str) -> tuple[str, str] | None:
        status, data = await self._call("POST", f"/meetings/{meeting_id}/verify", {"pin": pin})
        if status != 200:
            return None
        role = data.get("role")
        if role not in ("participant", "moderator") or not data.get("room_id"):
            raise DirectoryUnavailable("room directory sent an invalid answer")
        return str(data["room_id"]), str(role)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _pin_hash(room_id: str, pin: str) -> str:
    return hashlib.sha256(f"{room_id}:{pin}".encode()).hexdigest()


async def publish_room(redis: Any, room: dict[str, Any]) -> None:
    """Put a dial-in room in the shared directory (PINs as salted hashes, never in clear)."""
    sip = room["sip"]
    if not sip.get("meeting_id"):
        return
    entry = {"room_id": room["room_id"], "project": room.get("project", ""),
             "pin": _pin_hash(room["room_id"], sip["pin"]) if sip.get("pin") else "",
             "mpin": _pin_hash(room["room_id"], sip["mpin"]) if sip.get("mpin") else ""}
    await redis.hset(f"gw:meeting:{sip['meeting_id']}", mapping=entry)


async def unpublish_room(redis: Any, room: dict[str, Any]) -> None:
    if room["sip"].get("meeting_id"):
        await redis.delete(f"gw:meeting:{room['sip']['meeting_id']}")


class SharedDirectory:
    """Several workers, maybe on several hosts: meeting IDs resolve through Redis, where the room service
    publishes every dial-in room it creates. A room only the local store knows (made with the CLI) is
    published on its first lookup."""

    def __init__(self, redis: Any, store: RoomStore) -> None:
        self.redis = redis
        self.store = store

    async def _entry(self, meeting_id: str) -> dict[str, str]:
        key = f"gw:meeting:{meeting_id}"
        try:
            entry: dict[str, str] = await self.redis.hgetall(key)
            if not entry:
                room = await asyncio.to_thread(self.store.by_meeting, meeting_id)
                if room is not None:
                    await publish_room(self.redis, room)
                    entry = await self.redis.hgetall(key)
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"shared directory unreachable: {exc}") from exc
        return entry

    async def exists(self, meeting_id: str) -> bool:
        return bool(await self._entry(meeting_id))

    async def resolve(self, meeting_id: str, pin: str) -> tuple[str, str] | None:
        entry = await self._entry(meeting_id)
        if not entry:
            return None
        given = _pin_hash(entry["room_id"], pin)
        if entry.get("mpin") and hmac.compare_digest(entry["mpin"], given):
            return entry["room_id"], "moderator"
        if entry.get("pin") and hmac.compare_digest(entry["pin"], given):
            return entry["room_id"], "participant"
        return None
