"""The Janus side of the rooms: a pool of Janus servers, and each live room's AudioBridge + VideoRoom rooms.

Servers are `[janus] urls`, or the managed Janus at http://host:http_port/janus. The pool keeps one control
session per server (attached to both plugins) for room management: create, destroy, mute, kick. A room is
placed on the server with the fewest participants when it gets its first participant, and stays there
until it is destroyed (empty or deleted). Both Janus rooms get the room_id as their (string) id and a random
secret derived from the AudioBridge admin key (`room_secret`: a restarted service takes back the rooms a dead one
left on Janus); the plugins' admin keys and the API secret come from `JanusSecrets`.

When a control session is lost (Janus died or forgot us), every room placed on that server is gone:
`on_lost(server)` tells the service, the placements are forgotten, and the next placement reconnects (or
uses another server). The managed Janus is restarted by its supervisor, not here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ... import log
from ...adapters import janus_audiobridge as audiobridge
from ...adapters import janus_videoroom as videoroom
from ...adapters.janus import JanusClient, JanusError, JanusHandle, JanusSession
from ...cluster.janus import JanusSecrets
from ...config import Config

logger = logging.getLogger("gateway.rooms")
SAMPLING_RATE = 16000
MAX_PUBLISHERS = 16
REQUEST_TIMEOUT = 5.0


def janus_urls(config: Config) -> list[str]:
    """The Janus REST URLs rooms are placed on: `[janus] urls`, else the managed one."""
    j = config.janus
    if j.urls:
        return [u.rstrip("/") for u in j.urls]
    host = f"[{j.host}]" if ":" in j.host else j.host
    return [f"http://{host}:{j.http_port}/janus"]


def ice_servers(config: Config) -> list[dict[str, object]]:
    """What the room page gives its RTCPeerConnections: the configured STUN server and TURN URIs."""
    out: list[dict[str, object]] = []
    stun = config.janus.stun()
    if stun:
        out.append({"urls": f"stun:{stun[0]}:{stun[1]}"})
    out += [{"urls": uri} for uri in config.janus.turn_servers]
    return out


@dataclass(eq=False)
class JanusServer:
    url: str
    client: JanusClient
    session: JanusSession | None = None
    audiobridge: JanusHandle | None = None
    videoroom: JanusHandle | None = None
    rooms: dict[str, JanusRoom] = field(default_factory=dict)  # placed here, by room_id

    @property
    def alive(self) -> bool:
        return self.session is not None and not self.session.lost.is_set()


ROOM_EXISTS = (486, 427)  # AudioBridge, VideoRoom: "Room ... already exists"


def room_secret(keys: JanusSecrets, room_id: str) -> str:
    """A room's Janus secret (destroy, mute, kick): derived from the AudioBridge admin key, which only the room
    service uses, so a room service that restarts (or its peer on the same Janus) can take back the rooms a dead
    one left there, instead of finding their ids taken until Janus restarts."""
    mac = hmac.new(keys.audiobridge_admin_key.encode(), b"room-secret:" + room_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


@dataclass(eq=False)
class JanusRoom:
    """A room's AudioBridge and VideoRoom rooms on one server (both with id `room_id`)."""

    server: JanusServer
    room_id: str
    secret: str = field(repr=False)


class JanusPool:
    def __init__(self, urls: list[str], load_secrets: Callable[[], JanusSecrets], prebuffer: int,
                 on_lost: Callable[[JanusServer], None], timeout: float = REQUEST_TIMEOUT) -> None:
        self.load_secrets = load_secrets  # read at every (re)connection: the file may be newer than we are
        self.secrets = load_secrets()
        self.prebuffer = prebuffer
        self.on_lost = on_lost
        self.servers = [JanusServer(url, JanusClient(url, self.secrets.api_secret, timeout=timeout)) for url in urls]
        self._connecting: dict[str, asyncio.Lock] = {s.url: asyncio.Lock() for s in self.servers}

    def server(self, url: str) -> JanusServer | None:
        return next((s for s in self.servers if s.url == url), None)

    async def connect(self, server: JanusServer) -> None:
        """Open the server's control session (once; again after a loss)."""
        async with self._connecting[server.url]:
            if server.alive:
                return
            self.secrets = self.load_secrets()
            server.client.api_secret = self.secrets.api_secret
            session = await server.client.create_session(on_lost=lambda reason: self._lost(server, session, reason))
            try:
                server.audiobridge = await session.attach(audiobridge.PLUGIN)
                server.videoroom = await session.attach(videoroom.PLUGIN)
            except JanusError:
                await session.destroy()
                raise
            server.session = session
            log.event(logger, "janus.connected", url=server.url)

    def _lost(self, server: JanusServer, session: JanusSession, reason: str) -> None:
        if server.session is not session:
            return
        server.session = server.audiobridge = server.videoroom = None
        log.event(logger, "janus.server_lost", logging.ERROR, url=server.url, reason=reason, rooms=len(server.rooms))
        self.on_lost(server)
        server.rooms.clear()

    async def place(self, room_id: str, load: Callable[[JanusServer], int]) -> JanusRoom:
        """Create the room's Janus rooms on the least-loaded server that answers; JanusError if none does."""
        last: JanusError | None = None
        for server in sorted(self.servers, key=load):  # stable: ties go to the first listed
            try:
                await self.connect(server)
                return await self._create(server, room_id)
            except JanusError as exc:
                last = exc
                log.event(logger, "janus.place_failed", logging.WARNING, url=server.url, room_id=room_id,
                          error=str(exc)[:200])
        raise last or JanusError(0, "no Janus server configured")

    async def _create(self, server: JanusServer, room_id: str) -> JanusRoom:
        assert server.audiobridge is not None and server.videoroom is not None
        room = JanusRoom(server, room_id, room_secret(self.secrets, room_id))
        try:
            return await self._create_rooms(server, room)
        except JanusError as exc:  # left on Janus by a room service that died: same secret, so destroy and redo
            if exc.code not in ROOM_EXISTS:
                raise
            log.event(logger, "janus.room_reclaimed", logging.WARNING, url=server.url, room_id=room_id)
            await self._quietly(audiobridge.destroy_room(server.audiobridge, room_id, room.secret))
            await self._quietly(videoroom.destroy_room(server.videoroom, room_id, room.secret))
            return await self._create_rooms(server, room)

    async def _create_rooms(self, server: JanusServer, room: JanusRoom) -> JanusRoom:
        assert server.audiobridge is not None and server.videoroom is not None
        room_id = room.room_id
        await audiobridge.create_room(server.audiobridge, room_id, self.secrets.audiobridge_admin_key, room.secret,
                                      sampling_rate=SAMPLING_RATE, allow_rtp_participants=True,
                                      prebuffer=self.prebuffer, audiolevel_event=True)
        try:
            await videoroom.create_room(server.videoroom, room_id, self.secrets.videoroom_admin_key, room.secret,
                                        publishers=MAX_PUBLISHERS, audiocodec="opus", videocodec="vp8")
        except JanusError:
            await self._quietly(audiobridge.destroy_room(server.audiobridge, room_id, room.secret))
            raise
        server.rooms[room_id] = room
        log.event(logger, "janus.room_created", url=server.url, room_id=room_id)
        return room

    async def destroy(self, room: JanusRoom) -> None:
        """Destroy both Janus rooms (whoever is still in them is kicked by Janus). Never raises."""
        server = room.server
        if server.rooms.pop(room.room_id, None) is None or not server.alive:
            return
        assert server.audiobridge is not None and server.videoroom is not None
        await self._quietly(audiobridge.destroy_room(server.audiobridge, room.room_id, room.secret))
        await self._quietly(videoroom.destroy_room(server.videoroom, room.room_id, room.secret))
        log.event(logger, "janus.room_destroyed", url=server.url, room_id=room.room_id)

    async def mute(self, room: JanusRoom, janus_id: str, muted: bool) -> None:
        handle = self._audiobridge(room)
        action = audiobridge.mute if muted else audiobridge.unmute
        await action(handle, room.room_id, room.secret, janus_id)

    async def kick(self, room: JanusRoom, janus_id: str, *, video: bool) -> None:
        """Kick from the AudioBridge (and the VideoRoom for a browser); a participant already gone is fine."""
        handle = self._audiobridge(room)
        if janus_id:
            await self._quietly(audiobridge.kick(handle, room.room_id, room.secret, janus_id))
        if video and room.server.videoroom is not None:
            await self._quietly(room.server.videoroom.request(
                {"request": "kick", "room": room.room_id, "secret": room.secret, "id": janus_id}))

    def _audiobridge(self, room: JanusRoom) -> JanusHandle:
        handle = room.server.audiobridge
        if handle is None or room.server.rooms.get(room.room_id) is not room:
            raise JanusError(0, "the room's Janus server is gone")
        return handle

    async def _quietly(self, request: Awaitable[Any]) -> None:
        try:
            await request
        except JanusError as exc:
            log.event(logger, "janus.request_failed", logging.DEBUG, error=str(exc)[:200])

    async def close(self) -> None:
        for server in self.servers:
            for room in list(server.rooms.values()):
                await self.destroy(room)
            if server.session is not None:
                session, server.session = server.session, None
                await session.destroy()
            await server.client.close()
