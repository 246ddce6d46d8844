"""The room directories the IVR resolves meeting ID + PIN against (implementations of `apps.services.Directory`).

`EmbeddedDirectory` reads the local room store; `HttpDirectory` asks an external room service; `SharedDirectory`
resolves through Redis when several workers run. Each raises `DirectoryUnavailable` when it cannot answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from ..apps.services import DirectoryUnavailable
from ..store.rooms import RoomStore, check_pin


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
