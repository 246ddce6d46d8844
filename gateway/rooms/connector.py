"""The bridge from a phone call to a video room: the gateway's WebRTC leg (aiortc).

`apps.services.RoomConnector` is the interface room services implement; `EmbeddedRoomConnector` talks to the
embedded room service (signalling over its WebSocket, media over WebRTC). The leg offers PCMU (then
PCMA) only, so the room never needs Opus for a phone: the caller's G.711 is decoded once to 8 kHz PCM
for the WebRTC sender, and the room's audio arrives as 8 kHz PCM that is encoded once for the caller.

Audio both ways is driven by the worker's 20 ms media clock: each tick hands the caller's frame to the
leg and takes one frame of room audio from a small FIFO that absorbs jitter and clock drift (it holds
2 frames, drops back to 2 when it passes 6, and plays silence on underrun).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from .. import log
from ..adapters.tracks import PushTrack, pcm_frames
from ..apps.services import RoomError
from ..config import Config

logger = logging.getLogger("gateway.bridge")
RATE = 8000
FRAME = 160
FIFO_TARGET = 2
FIFO_MAX = 6


class EmbeddedLeg:
    def __init__(self, room_id: str, pc: RTCPeerConnection, ws: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.room_id = room_id
        self.participant_id = ""
        self.state: dict[str, Any] = {}
        self.pc = pc
        self.ws = ws
        self.session = session
        self.on_event = on_event
        self.track = PushTrack(RATE)  # the caller's audio toward the room
        self.fifo: deque[np.ndarray] = deque()
        self._started = False
        self.underruns = 0
        self.dropped = 0
        self.frames = 0
        self.tasks: list[asyncio.Task[None]] = []

    # -- media (called from the media clock)
    def push(self, samples: np.ndarray) -> None:
        self.track.push(samples)

    def pull(self) -> np.ndarray | None:
        if not self._started:
            if len(self.fifo) < FIFO_TARGET:
                return None
            self._started = True
        if not self.fifo:
            self.underruns += 1
            self._started = False
            return None
        if len(self.fifo) > FIFO_MAX:  # the room's clock runs ahead of ours: catch up
            while len(self.fifo) > FIFO_TARGET:
                self.fifo.popleft()
                self.dropped += 1
        self.frames += 1
        return self.fifo.popleft()

    async def _read_room_audio(self, track: MediaStreamTrack) -> None:
        async for frame in pcm_frames(track, RATE, FRAME):
            self.fifo.append(frame)

    async def _read_signalling(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if data.get("type") == "state":
                self.state = data
            self.on_event(data)
        self.on_event({"type": "disconnected"})

    def stats(self) -> dict[str, int]:
        """Room-to-caller FIFO: frames played, underruns (silence) and frames dropped to catch up (drift)."""
        return {"room_frames": self.frames, "underruns": self.underruns, "dropped": self.dropped}

    async def command(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_json(message)

    async def leave(self) -> None:
        for task in self.tasks:
            task.cancel()
        try:
            if not self.ws.closed:
                await self.ws.send_json({"type": "leave"})
                await self.ws.close()
        except (ConnectionError, RuntimeError):
            pass
        await self.pc.close()
        await self.session.close()


class EmbeddedRoomConnector:
    def __init__(self, config: Config, secret: str) -> None:
        rs = config.room_service
        self.url = rs.url or f"http://{rs.host}:{rs.port}"
        self.secret = secret

    async def join(self, room_id: str, role: str, name: str, on_event: Callable[[dict[str, Any]], None]) -> EmbeddedLeg:
        from .service.server import phone_token

        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        try:
            ws = await session.ws_connect(f"{self.url}/rooms/{room_id}/ws", heartbeat=20)
        except (aiohttp.ClientError, OSError) as exc:
            await session.close()
            raise RoomError(f"room service unreachable: {exc}") from exc
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        leg = EmbeddedLeg(room_id, pc, ws, session, on_event)
        transceiver = pc.addTransceiver(leg.track, direction="sendrecv")
        codecs = RTCRtpSender.getCapabilities("audio").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType in ("audio/PCMU", "audio/PCMA")])

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                leg.tasks.append(asyncio.get_running_loop().create_task(leg._read_room_audio(track)))

        try:
            await pc.setLocalDescription(await pc.createOffer())
            await ws.send_json({"type": "join", "kind": "phone", "role": role, "name": name,
                                "token": phone_token(self.secret, room_id, role), "sdp": pc.localDescription.sdp})
            async with asyncio.timeout(10):
                while True:
                    msg = await ws.receive_json()
                    if msg.get("type") == "joined":
                        break
                    if msg.get("type") == "error":
                        raise RoomError(str(msg.get("message")), str(msg.get("code", "")))
                    if msg.get("type") == "state":
                        leg.state = msg
            leg.participant_id = msg["participant_id"]
            leg.state = msg.get("state") or leg.state
            await pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="answer"))
        except (RoomError, TimeoutError, aiohttp.ClientError, ValueError, TypeError) as exc:
            await pc.close()
            await session.close()
            raise RoomError(f"could not join room {room_id}: {exc}", getattr(exc, "code", "")) from exc
        leg.tasks.append(asyncio.get_running_loop().create_task(leg._read_signalling()))
        log.event(logger, "bridge.joined", room_id=room_id, participant_id=leg.participant_id, role=role)
        return leg
