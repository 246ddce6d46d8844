"""Where a phone joins a room: the leg from a call to the room's Janus AudioBridge, as a plain-RTP participant.

Signalling goes to the room service (its WebSocket, authenticated with the phone token): `join` names the
room's Janus server and AudioBridge room; the worker then attaches one AudioBridge handle for the call on
that server and joins with `rtp: {ip, port, payload_type}` and the call's G.711 codec, and tells the room
service the participant id Janus gave it (`rtp_joined`), so moderation (mute, kick) acts in Janus itself.

Media is relayed, never transcoded: each media-clock tick the caller's payload goes to Janus re-stamped with
the leg's own SSRC, sequence and timestamps (`media.relay.Restamper`), and one payload of the room's mix is
taken from a small reordering FIFO (`media.relay.FramePacer`) for the caller. The only decode is for the
voice-activity detector (Janus sends no talking events for plain-RTP participants): its transitions go to the
room service as `talking`. The leg's socket stays open for the whole leg and accepts packets from Janus's
address and port only.

One Janus session per server is shared by the worker's legs; when Janus loses it (the server died), every
leg on it hears `media_server_lost` and the next join opens a new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from .. import log, tls
from ..adapters import janus_audiobridge as audiobridge
from ..adapters.janus import JanusClient, JanusError, JanusHandle, JanusSession
from ..adapters.ports import PortAllocator
from ..adapters.rtp_socket import RtpSocket
from ..apps.services import MENU_ACTIONS, JoinContext, RoomError
from ..config import Config
from ..media import g711
from ..media.relay import FramePacer, Restamper
from ..media.vad import VoiceActivity
from .service.server import phone_token

logger = logging.getLogger("gateway.bridge")
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}
JOIN_TIMEOUT_S = 10.0


class JanusLeg:
    def __init__(self, connector: JanusRoomConnector, room_id: str, codec: str,
                 on_event: Callable[[dict[str, Any]], None]) -> None:
        self.connector = connector
        self.room_id = room_id
        self.codec = codec
        self.on_event = on_event
        self.participant_id = ""
        self.janus_id = ""
        self.server = ""
        self.state: dict[str, Any] = {}
        self.actions = MENU_ACTIONS
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.handle: JanusHandle | None = None
        self.pacer = FramePacer()
        self.socket = RtpSocket(connector.ports, self.pacer.put)
        self.stamper = Restamper(payload_type=PAYLOAD_TYPES[codec])
        self.silence = bytes([g711.SILENCE[codec]]) * 160
        self.vad = VoiceActivity()
        self.loop = asyncio.get_running_loop()
        self.tasks: list[asyncio.Task[None]] = []
        self.ended = False

    # -- media (called from the media clock, once per 20 ms)
    def push(self, frame: bytes | None) -> None:
        self.socket.send(self.stamper.stamp(frame if frame is not None else self.silence))
        now = self.loop.time()
        change = self.vad.feed(g711.decode(self.codec, frame), now) if frame is not None else self.vad.check(now)
        if change is not None:
            self.loop.create_task(self.command({"type": "talking", "talking": change == "talking"}))

    def pull(self) -> bytes | None:
        return self.pacer.pop()

    def stats(self) -> dict[str, int]:
        p = self.pacer.stats
        return {"rtp_to_room": self.socket.sent, "rtp_from_room": self.socket.received,
                "rtp_dropped": self.socket.dropped, "room_frames": p.played, "underruns": p.underruns,
                "room_lost": p.lost}

    # -- signalling
    async def command(self, message: dict[str, Any]) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_json(message)

    def end(self, event: dict[str, Any]) -> None:
        """Tell the call once: the room ended the leg (removed, closed, lost)."""
        if not self.ended:
            self.ended = True
            self.on_event(event)

    async def _read_signalling(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                data = msg.json()
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if data.get("type") == "state":
                self.state = data
            if data.get("type") == "error" and data.get("code") == "media_server_lost":
                self.end({"type": "media_server_lost"})
            elif data.get("type") in ("removed", "room_closed"):
                self.end(data)
            else:
                self.on_event(data)
        self.end({"type": "disconnected"})

    async def open(self, role: str, name: str) -> None:
        """Join through the room service, then the AudioBridge; RoomError (with the room's code) when refused."""
        c = self.connector
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        try:
            self.ws = await self.http.ws_connect(f"{c.url}/rooms/{self.room_id}/ws", heartbeat=20, **c.tls)
        except (aiohttp.ClientError, OSError) as exc:
            raise RoomError(f"room service unreachable: {exc}") from exc
        await self.ws.send_json({"type": "join", "kind": "phone", "role": role, "name": name, "media": "rtp",
                                 "token": phone_token(c.secret, self.room_id, role)})
        async with asyncio.timeout(JOIN_TIMEOUT_S):
            while True:
                msg = await self.ws.receive_json()
                if msg.get("type") == "joined":
                    break
                if msg.get("type") == "error":
                    raise RoomError(str(msg.get("message")), str(msg.get("code", "")))
        self.participant_id = str(msg["participant_id"])
        self.state = msg.get("state") or {}
        janus = msg.get("janus") or {}
        self.server, room = str(janus["url"]), str(janus["room"])
        await self.socket.open(c.media_host)
        session = await c.session(self.server)
        self.handle = await session.attach(audiobridge.PLUGIN)
        me: dict[str, Any] = next((p for p in self.state.get("participants", []) if p.get("id") == self.participant_id), {})
        joined = await audiobridge.join_rtp(  # muted from the start when the room says so (a mute-all before us)
            self.handle, room, name, self.codec.lower(),
            audiobridge.RtpEndpoint(c.media_host, self.socket.port, PAYLOAD_TYPES[self.codec]),
            muted=bool(me.get("muted")), timeout=JOIN_TIMEOUT_S)
        self.janus_id = joined.id
        self.socket.peer = (joined.janus.ip, joined.janus.port)
        await self.ws.send_json({"type": "rtp_joined", "janus_id": self.janus_id})
        self.tasks.append(self.loop.create_task(self._read_signalling()))

    async def leave(self) -> None:
        self.ended = True
        for task in self.tasks:
            task.cancel()
        await self.command({"type": "leave"})
        if self.handle is not None:
            with contextlib.suppress(JanusError, ValueError):
                await audiobridge.leave(self.handle)
            with contextlib.suppress(JanusError):
                await self.handle.detach()
        self.socket.close()
        if self.ws is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.close()
        if self.http is not None:
            await self.http.close()
        self.connector.legs.discard(self)


class JanusRoomConnector:
    """Phones into rooms whose media is on Janus (implements `apps.services.RoomConnector`)."""

    def __init__(self, config: Config, secret: str, api_secret: str, ports: PortAllocator, media_host: str) -> None:
        rs = config.room_service
        self.url = rs.url or f"{tls.scheme(rs.tls_cert)}://{rs.host}:{rs.port}"
        self.tls = tls.internal(rs.tls_cert)  # our room service serves rs.tls_cert
        self.secret = secret
        self.api_secret = api_secret
        self.ports = ports
        self.media_host = media_host
        self.legs: set[JanusLeg] = set()
        self._sessions: dict[str, asyncio.Task[JanusSession]] = {}
        self._clients: dict[str, JanusClient] = {}

    async def session(self, url: str) -> JanusSession:
        """The worker's session on that Janus server, created on first use and after a loss."""
        task = self._sessions.get(url)
        if task is None or (task.done() and (task.exception() is not None or task.result().lost.is_set())):
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = JanusClient(url, self.api_secret)
            task = self._sessions[url] = asyncio.get_running_loop().create_task(
                client.create_session(on_lost=lambda reason: self._lost(url, reason)))
        return await asyncio.shield(task)

    def _lost(self, url: str, reason: str) -> None:
        log.event(logger, "janus.session_lost", logging.ERROR, server=url, reason=reason,
                  legs=sum(1 for leg in self.legs if leg.server == url))
        self._sessions.pop(url, None)
        for leg in list(self.legs):
            if leg.server == url:
                leg.end({"type": "media_server_lost"})

    def stats(self) -> dict[str, int]:
        """For /healthz (leak checks): legs in rooms, live Janus sessions, and the handles they hold."""
        sessions = [t.result() for t in self._sessions.values()
                    if t.done() and not t.cancelled() and t.exception() is None and not t.result().lost.is_set()]
        return {"legs": len(self.legs), "sessions": len(sessions), "handles": sum(len(s.handles) for s in sessions)}

    async def join(self, room_id: str, role: str, name: str, on_event: Callable[[dict[str, Any]], None],
                   codec: str = "PCMU", context: JoinContext | None = None) -> JanusLeg:
        leg = JanusLeg(self, room_id, codec, on_event)
        self.legs.add(leg)
        try:
            await leg.open(role, name)
        except RoomError:
            await leg.leave()
            raise
        except (JanusError, TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            await leg.leave()
            code = "media_server_error" if isinstance(exc, JanusError | OSError) else ""
            raise RoomError(f"could not join room {room_id}: {exc}", code) from exc
        log.event(logger, "bridge.joined", room_id=room_id, participant_id=leg.participant_id, role=role,
                  janus_id=leg.janus_id, rtp_port=leg.socket.port)
        return leg

    async def close(self) -> None:
        for leg in list(self.legs):
            await leg.leave()
        for task in self._sessions.values():
            if task.done() and task.exception() is None:
                await task.result().destroy()
            else:
                task.cancel()
        for client in self._clients.values():
            await client.close()
