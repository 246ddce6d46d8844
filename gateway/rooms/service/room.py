"""A live room in the room service: its participants, their moderation state and their WebSockets.

The media is elsewhere (Janus: `janus_rooms.JanusRoom`); a room here is what the pages and the workers are
told (`state()`), who may do what, and where each participant's messages go. Every participant has an
outbox drained by one writer task, so a slow page never blocks the others and messages keep their order
even when they are produced by Janus callbacks (synchronous code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ... import log

if TYPE_CHECKING:
    from .janus_rooms import JanusRoom
    from .signalling import BrowserPeer

logger = logging.getLogger("gateway.rooms")
_CLOSE: dict[str, Any] = {}  # the outbox sentinel: close the WebSocket after what is queued before it


@dataclass(eq=False)
class Participant:
    id: str
    name: str
    kind: str  # browser | phone
    role: str  # participant | moderator
    ws: web.WebSocketResponse
    muted: bool = False
    muted_by_moderator: bool = False  # then only a moderator may unmute
    talking: bool = False
    camera: bool = False  # a browser whose camera is on (its page says so: others show its video, else an avatar)
    janus_id: str = ""  # the AudioBridge participant id (a phone's comes with `rtp_joined`)
    peer: BrowserPeer | None = None  # a browser's media on Janus
    outbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None
    closing: bool = False

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "role": self.role, "muted": self.muted,
                "muted_by_moderator": self.muted_by_moderator, "talking": self.talking, "video": self.camera}

    def start(self) -> None:
        self.writer = asyncio.get_running_loop().create_task(self._write(), name=f"room-ws-{self.id}")

    def send(self, message: dict[str, Any]) -> None:
        if not self.closing:
            self.outbox.put_nowait(message)

    def close(self) -> None:
        """Close the WebSocket once everything queued so far is sent."""
        if not self.closing:
            self.outbox.put_nowait(_CLOSE)
            self.closing = True

    async def _write(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                if message is _CLOSE:
                    await self.ws.close()
                    return
                await self.ws.send_json(message)
            except (ConnectionError, RuntimeError):
                return


def new_participant(name: str, kind: str, role: str, ws: web.WebSocketResponse) -> Participant:
    p = Participant(uuid.uuid4().hex[:12], name, kind, role, ws)
    p.start()
    return p


class Room:
    def __init__(self, room_id: str, settings: dict[str, Any]) -> None:
        self.id = room_id
        self.settings = settings
        self.participants: dict[str, Participant] = {}
        self.locked = False
        self.media: JanusRoom | None = None  # the AudioBridge and VideoRoom rooms while anyone is here
        self.publishing: set[str] = set()  # browsers whose camera Janus relays (their VideoRoom feed is up)
        self.lock = asyncio.Lock()  # joins, leaves and deletion: one at a time (the Janus rooms' lifecycle)
        self.mute_lock = asyncio.Lock()  # mutes and unmutes: one at a time, in the order they were asked
        self.closed = False
        self.muted_on_entry = False  # after a moderator's mute-all (until unmute-all): newcomers join muted by it
        self.project = ""  # the project owning the room (its recordings go to that project)
        self.recording: dict[str, Any] | None = None  # the room recording in progress (its metadata)

    @property
    def moderator_present(self) -> bool:
        return any(p.role == "moderator" for p in self.participants.values())

    def state(self) -> dict[str, Any]:
        return {"type": "state", "room_id": self.id, "locked": self.locked, "recording": self.recording is not None,
                "moderator_present": self.moderator_present,
                "wait_for_moderator": bool(self.settings.get("wait_for_moderator")),
                "participants": [p.public() for p in self.participants.values()]}

    def broadcast(self, message: dict[str, Any] | None = None) -> None:
        """Send `message` (default: the room's state) to every participant."""
        message = message or self.state()
        for p in self.participants.values():
            p.send(message)

    def browsers(self) -> list[Participant]:
        return [p for p in self.participants.values() if p.kind == "browser" and p.peer is not None]


async def drain(p: Participant, timeout: float = 2.0) -> None:
    """Wait (bounded) until the participant's outbox is written and its socket closed."""
    if p.writer is not None:
        try:
            await asyncio.wait_for(asyncio.shield(p.writer), timeout)
        except TimeoutError:
            p.writer.cancel()
            log.event(logger, "participant.drain_timeout", logging.WARNING, participant_id=p.id)
        with contextlib.suppress(asyncio.CancelledError):
            await p.writer
