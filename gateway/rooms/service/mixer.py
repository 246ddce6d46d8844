"""Rooms in the room service: participants with WebRTC peers, and a 20 ms audio mix (each hears the others).

Every participant's inbound audio is resampled once to 48 kHz mono and queued; one clock per process
mixes each room every 20 ms on absolute deadlines: the sum of all unmuted inputs, minus the listener's
own, goes to the listener's outbound track (which the WebRTC sender encodes: Opus for browsers, PCMU for
phones, resampling inside the encoder once).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.contrib.media import MediaRelay

from ... import log
from ...adapters.tracks import PushTrack, pcm_frames

logger = logging.getLogger("gateway.rooms")
RATE = 48000
FRAME = 960  # 20 ms at 48 kHz
MAX_BACKLOG = 5  # frames queued per input before the oldest are dropped (bounds latency and drift)


class IdleVideo(MediaStreamTrack):
    """A placeholder video source (a tiny black frame twice a second) until another browser's video exists."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0

    async def recv(self) -> av.VideoFrame:
        await asyncio.sleep(0.5)
        frame = av.VideoFrame(64, 48, "yuv420p")
        for plane, value in zip(frame.planes, (16, 128, 128), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 90000)
        self._pts += 45000
        return frame


@dataclass
class Participant:
    id: str
    name: str
    kind: str  # browser | phone
    role: str  # participant | moderator
    pc: RTCPeerConnection
    ws: Any
    out: PushTrack = field(default_factory=lambda: PushTrack(RATE))  # what this participant hears
    muted: bool = False
    inbuf: deque[np.ndarray] = field(default_factory=deque)
    video: MediaStreamTrack | None = None  # what this participant sends
    video_sender: Any = None  # where the others' video goes to this participant
    watching: str = ""  # whose video this participant receives
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    level: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "role": self.role, "muted": self.muted,
                "speaking": self.level > 500}


class Room:
    def __init__(self, room_id: str, settings: dict[str, Any]) -> None:
        self.id = room_id
        self.settings = settings
        self.participants: dict[str, Participant] = {}
        self.locked = False
        self.relay = MediaRelay()

    @property
    def moderator_present(self) -> bool:
        return any(p.role == "moderator" for p in self.participants.values())

    def state(self) -> dict[str, Any]:
        return {"type": "state", "room_id": self.id, "locked": self.locked,
                "moderator_present": self.moderator_present,
                "wait_for_moderator": bool(self.settings.get("wait_for_moderator")),
                "participants": [p.public() for p in self.participants.values()]}

    async def broadcast(self, message: dict[str, Any]) -> None:
        for p in list(self.participants.values()):
            try:
                await p.ws.send_json(message)
            except (ConnectionError, RuntimeError):
                pass

    def new_participant(self, name: str, kind: str, role: str, pc: RTCPeerConnection, ws: Any) -> Participant:
        p = Participant(uuid.uuid4().hex[:12], name, kind, role, pc, ws)
        pc.addTrack(p.out)
        return p

    def attach_inbound(self, p: Participant, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            p.tasks.append(asyncio.get_running_loop().create_task(self._read_audio(p, track)))
        elif track.kind == "video":
            p.video = track

    def route_video(self) -> None:
        """Each browser receives the video of another browser (the first one that has video)."""
        senders = [p for p in self.participants.values() if p.video is not None]
        for p in self.participants.values():
            if p.video_sender is None:
                continue
            source = next((s for s in senders if s is not p), None)
            wanted = source.id if source else ""
            if wanted != p.watching:
                p.video_sender.replaceTrack(self.relay.subscribe(source.video) if source and source.video else IdleVideo())
                p.watching = wanted

    async def _read_audio(self, p: Participant, track: MediaStreamTrack) -> None:
        async for frame in pcm_frames(track, RATE, FRAME):
            p.inbuf.append(frame)
            while len(p.inbuf) > MAX_BACKLOG:
                p.inbuf.popleft()

    def mix(self) -> None:
        """One 20 ms step: everyone hears the sum of the others."""
        parts = list(self.participants.values())
        if not parts:
            return
        inputs = {}
        for p in parts:
            frame = p.inbuf.popleft() if p.inbuf else None
            if frame is not None:
                p.level = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2)))
            if frame is not None and not p.muted:
                inputs[p.id] = frame.astype(np.int32)
        total = sum(inputs.values()) if inputs else np.zeros(FRAME, dtype=np.int32)
        for p in parts:
            own = inputs.get(p.id)
            out = total - own if own is not None else total
            p.out.push(np.clip(out, -32768, 32767).astype(np.int16))


class RoomClock:
    """One 20 ms clock for every room of the process, on absolute deadlines."""

    def __init__(self, rooms: dict[str, Room]) -> None:
        self.rooms = rooms
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        while True:
            n += 1
            delay = start + n * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:
                skipped = int(-delay / 0.02)
                n += skipped
                log.event(logger, "rooms.clock_stall", logging.WARNING, skipped=skipped)
            for room in list(self.rooms.values()):
                try:
                    room.mix()
                except Exception:
                    logger.exception("rooms.mix_failed", extra={"fields": {"room_id": room.id}})
