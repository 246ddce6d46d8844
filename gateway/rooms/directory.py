"""The room directories the IVR resolves meeting ID + PIN against (implementations of `apps.services.Directory`).

`EmbeddedDirectory` reads the local room store; `HttpDirectory` asks an external room service; `SharedDirectory`
resolves through Redis when several workers run. Each raises `DirectoryUnavailable` when it cannot answer.

Tenancy: a meeting ID resolves only within the project asked for (the dialled DID's); None asks every project.
Redis holds no PIN and no plain hash of one: HMAC-SHA256 under a key derived from the room service's secret
(`DATA_DIR/room-service.json`, 0600, or `room_service.secret`), which Redis never sees, so a dump of Redis cannot be
brute-forced over the 10^6 PINs without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from .. import log
from ..apps.services import DirectoryUnavailable
from ..store.rooms import RoomStore, check_pin

logger = logging.getLogger("gateway.directory")


class EmbeddedDirectory:
    def __init__(self, store: RoomStore) -> None:
        self.store = store

    async def _room(self, meeting_id: str, project: str | None) -> dict[str, Any] | None:
        room = await asyncio.to_thread(self.store.by_meeting, meeting_id)
        return room if room is not None and in_project(room.get("project", ""), project) else None

    async def exists(self, meeting_id: str, project: str | None = None) -> bool:
        return await self._room(meeting_id, project) is not None

    async def resolve(self, meeting_id: str, pin: str, project: str | None = None) -> tuple[str, str] | None:
        room = await self._room(meeting_id, project)
        role = None if room is None else await asyncio.to_thread(check_pin, room, pin)  # a slow hash stays off the loop
        return None if role is None or room is None else (room["room_id"], role)


def in_project(owner: str, project: str | None) -> bool:
    return project is None or owner == project


class HttpDirectory:
    """An external room service:

    GET  {url}/meetings/{meeting_id}?project=P           -> 200 {"room_id"} | 404
    POST {url}/meetings/{meeting_id}/verify?project=P    {"pin"} -> 200 {"room_id", "role"} | 403
    with HTTP Basic credentials; anything else, or no answer within the timeout, is "unavailable". `project` (the
    dialled DID's; absent for a shared number) is for the service to answer 404/403 for other projects' meetings;
    an answer naming another `project` is taken as not found as well.
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

    async def _call(self, method: str, path: str, body: dict[str, str] | None = None,
                    project: str | None = None) -> tuple[int, dict[str, Any]]:
        params = {"project": project} if project is not None else None
        try:
            async with self._client().request(method, self.url + path, json=body, params=params) as r:
                data = await r.json(content_type=None) if r.status == 200 else {}
                if r.status >= 500 or r.status in (401, 407):
                    raise DirectoryUnavailable(f"room directory answered {r.status}")
                return r.status, data or {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DirectoryUnavailable(f"room directory unreachable: {exc.__class__.__name__}: {exc}") from exc

    async def exists(self, meeting_id: str, project: str | None = None) -> bool:
        status, data = await self._call("GET", f"/meetings/{meeting_id}", None, project)
        return status == 200 and in_project(str(data.get("project", project)), project)

    async def resolve(self, meeting_id: str, pin: str, project: str | None = None) -> tuple[str, str] | None:
        status, data = await self._call("POST", f"/meetings/{meeting_id}/verify", {"pin": pin}, project)
        if status != 200 or not in_project(str(data.get("project", project)), project):
            return None
        role = data.get("role")
        if role not in ("participant", "moderator") or not data.get("room_id"):
            raise DirectoryUnavailable("room directory sent an invalid answer")
        return str(data["room_id"]), str(role)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def pin_key(secret: str) -> bytes:
    """The key of the shared directory's PIN verifiers, derived from the room service's secret (which the workers
    and the room service share) for this one use."""
    return hmac.new(secret.encode(), b"gateway directory PIN verifier v1", hashlib.sha256).digest()


def _key_id(key: bytes) -> str:
    """Names the key an entry was made with (entries under another key are republished or refused)."""
    return hmac.new(key, b"key id", hashlib.sha256).hexdigest()[:16]


def _verifier(key: bytes, room_id: str, pin: str) -> str:
    return hmac.new(key, f"{room_id}\x00{pin}".encode(), hashlib.sha256).hexdigest()


async def publish_room(redis: Any, room: dict[str, Any], key: bytes) -> None:
    """Put a dial-in room in the shared directory: its project, and its PINs as keyed hashes (never in clear)."""
    sip = room["sip"]
    if not sip.get("meeting_id"):
        return
    entry = {"room_id": room["room_id"], "project": room.get("project", ""), "kid": _key_id(key),
             "pin": _verifier(key, room["room_id"], sip["pin"]) if sip.get("pin") else "",
             "mpin": _verifier(key, room["room_id"], sip["mpin"]) if sip.get("mpin") else ""}
    await redis.hset(f"gw:meeting:{sip['meeting_id']}", mapping=entry)


def _typed_pins(room: dict[str, Any]) -> bool:
    """Whether the room carries its PINs as typed (a room just made); a store that keeps only hashes cannot be
    published from (its hashes are not PINs)."""
    sip = room["sip"]
    return all(check_pin(room, sip[k]) is not None for k in ("pin", "mpin") if sip.get(k))


async def unpublish_room(redis: Any, room: dict[str, Any]) -> None:
    if room["sip"].get("meeting_id"):
        await redis.delete(f"gw:meeting:{room['sip']['meeting_id']}")


class SharedDirectory:
    """Several workers, maybe on several hosts: meeting IDs resolve through Redis, where the room service
    publishes every dial-in room it creates. A room only the local store knows (made with the CLI, or published
    under another key) is checked against the local store and published on its first lookup. `key`: `pin_key()`
    of the room service's secret (the same on every host)."""

    def __init__(self, redis: Any, store: RoomStore, key: bytes) -> None:
        self.redis = redis
        self.store = store
        self.key = key
        self.kid = _key_id(key)

    async def publish(self, room: dict[str, Any]) -> None:
        await publish_room(self.redis, room, self.key)

    async def _lookup(self, meeting_id: str) -> tuple[dict[str, str], dict[str, Any] | None]:
        """The Redis entry (empty when none, or made under another key) and, when Redis had none, the local room."""
        key = f"gw:meeting:{meeting_id}"
        try:
            entry: dict[str, str] = await self.redis.hgetall(key)
            if entry and entry.get("kid") == self.kid:
                return entry, None
            room = await asyncio.to_thread(self.store.by_meeting, meeting_id)
            if room is None:
                if entry:  # another key (an old unkeyed entry, or a host with another secret): unusable
                    log.event(logger, "directory.key_mismatch", logging.WARNING, meeting_id=meeting_id)
                return {}, None
            if await asyncio.to_thread(_typed_pins, room):
                await self.publish(room)
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"shared directory unreachable: {exc}") from exc
        return {"room_id": room["room_id"], "project": room.get("project", "")}, room

    async def exists(self, meeting_id: str, project: str | None = None) -> bool:
        entry, _ = await self._lookup(meeting_id)
        return bool(entry) and in_project(entry.get("project", ""), project)

    async def resolve(self, meeting_id: str, pin: str, project: str | None = None) -> tuple[str, str] | None:
        entry, room = await self._lookup(meeting_id)
        if not entry or not in_project(entry.get("project", ""), project):
            return None
        if room is not None:  # known here: the local store decides
            role = await asyncio.to_thread(check_pin, room, pin)
            return None if role is None else (room["room_id"], role)
        given = _verifier(self.key, entry["room_id"], pin)
        if entry.get("mpin") and hmac.compare_digest(entry["mpin"], given):
            return entry["room_id"], "moderator"
        if entry.get("pin") and hmac.compare_digest(entry["pin"], given):
            return entry["room_id"], "participant"
        return None
