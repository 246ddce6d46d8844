"""The live rooms: who is in them, what they may do, and the lifecycle of their rooms on Janus.

A room's AudioBridge and VideoRoom rooms are created on Janus when its first participant joins (on the
least-loaded server of the pool) and destroyed when it empties or is deleted; joins, leaves and deletion of
one room run one at a time (`Room.lock`), and so do its mutes (`Room.mute_lock`: a participant's "unmute me"
sent while a moderator's mute-all is on its way to Janus is judged after it), and after a mute-all newcomers join
muted by the moderator until an unmute-all (leaving and joining again undoes nothing). A room takes at most
`room_service.max_participants`, phones included (then `room_full`). Mute and kick are done in Janus with the
room's secret, which never leaves this process; a page never talks to Janus, so a browser muted by a moderator
cannot unmute itself unless the room allows it (`allow_self_unmute`; the AudioBridge would let a participant's
own handle unmute it: the worker, which holds the API secret for its phones' handles, is trusted to not do so).

Phones (the worker, over the same WebSocket) join the AudioBridge themselves as plain-RTP participants on
the server named in `joined`; browsers' media is set up here (`signalling.BrowserPeer`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ... import log
from ...adapters.janus import JanusError
from ...config import Config
from .janus_rooms import JanusPool, JanusRoom, JanusServer, ice_servers
from .recording import RecordingError, RoomRecorder
from .room import Participant, Room, drain, new_participant
from .security import clean_name
from .signalling import BrowserPeer

logger = logging.getLogger("gateway.rooms")
MAX_NAME = 64
ROLES = ("participant", "moderator")


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


class LiveRooms:
    def __init__(self, config: Config, pool: JanusPool, check_phone: Callable[[str, str, object], bool],
                 redis: Any = None) -> None:
        self.config = config
        self.pool = pool
        self.check_phone = check_phone  # (room_id, role, token) -> whether it is the worker's token
        self.redis = redis
        self.rooms: dict[str, Room] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.recorder: RoomRecorder | None = None  # room recordings (the server sets it)

    def load(self, server: JanusServer) -> int:
        """Participants in the rooms placed on `server` (where the next room goes: the fewest)."""
        return sum(len(r.participants) for r in self.rooms.values() if r.media is not None and r.media.server is server)

    def spawn(self, work: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except JanusError as exc:
                log.event(logger, "janus.failed", logging.WARNING, what=what, error=str(exc)[:200])
            except Exception:
                logger.exception("rooms.task_failed", extra={"fields": {"what": what}})

        task = asyncio.get_running_loop().create_task(run(), name=what)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- joining
    async def join(self, room_id: str, settings: dict[str, Any], ws: web.WebSocketResponse, data: dict[str, Any],
                   moderator: bool, project: str = "") -> tuple[Room, Participant] | None:
        """A `join` message: the participant in the room (its `joined` queued), or None (an error was sent).
        `moderator`: the socket was opened with a valid host link."""
        kind = data.get("kind", "browser")
        role = "participant"
        if kind == "phone":
            wanted = data.get("role", "participant")
            if wanted not in ROLES or not self.check_phone(room_id, str(wanted), data.get("token")):
                await ws.send_json(error("not_allowed", "phone participants need the gateway's token"))
                return None
            if data.get("media") != "rtp":
                await ws.send_json(error("invalid_join", "phones join the AudioBridge by plain RTP (media: rtp)"))
                return None
            role = str(wanted)
        elif kind != "browser":
            await ws.send_json(error("invalid_join", "kind: browser or phone"))
            return None
        elif moderator:
            role = "moderator"
        name = clean_name(data.get("name"), str(kind), MAX_NAME) or ("Phone" if kind == "phone" else "Guest")
        while True:  # a room deleted or emptied while we waited for its lock is replaced by a fresh one
            room = self.rooms.get(room_id)
            if room is None:
                room = self.rooms[room_id] = Room(room_id, settings)
                room.project = project
            async with room.lock:
                if room.closed:
                    continue
                return await self._join_locked(room, ws, kind, name, role, data.get("muted") is True,
                                               data.get("video") is True)

    async def _join_locked(self, room: Room, ws: web.WebSocketResponse, kind: str, name: str, role: str,
                           data_muted: bool, camera: bool) -> tuple[Room, Participant] | None:
        if room.locked and role != "moderator":
            await ws.send_json(error("room_locked", "the room is locked"))
            return None
        limit = self.config.room_service.max_participants
        if len(room.participants) >= limit:
            log.event(logger, "room.full", logging.WARNING, room_id=room.id, participants=len(room.participants))
            await ws.send_json(error("room_full", f"the room is full ({limit} participants)"))
            return None
        if room.media is None:
            try:
                room.media = await self.pool.place(room.id, self.load)
            except JanusError as exc:
                log.event(logger, "room.media_failed", logging.ERROR, room_id=room.id, error=str(exc)[:200])
                await ws.send_json(error("media_server_error", "the media server could not open the room"))
                await self._release_if_empty(room)
                return None
            await self._remember(room.id, room.media.server.url)
        me = new_participant(name, kind, role, ws)
        if room.muted_on_entry and role != "moderator":  # leaving and coming back does not undo a mute-all
            me.muted = me.muted_by_moderator = True
        elif kind == "browser" and data_muted:  # the page's choice before joining ("join muted")
            me.muted = True
        me.camera = kind == "browser" and camera
        joined: dict[str, Any] = {"type": "joined", "participant_id": me.id, "role": role}
        if kind == "phone":
            joined["janus"] = {"url": room.media.server.url, "room": room.media.room_id}
        else:
            peer = self._browser_peer(room, me, room.media)
            try:
                await peer.open()
            except JanusError as exc:
                log.event(logger, "room.media_failed", logging.ERROR, room_id=room.id, error=str(exc)[:200])
                await peer.close()
                me.send(error("media_server_error", "the media server could not take this browser"))
                me.close()
                await self._release_if_empty(room)
                return None
            me.peer = peer
            joined["ice_servers"] = ice_servers(self.config)
        room.participants[me.id] = me
        me.send({**joined, "state": room.state()})
        room.broadcast()
        if me.peer is not None and room.publishing:
            self.spawn(me.peer.subscribe(sorted(room.publishing)), f"subscribe-{me.id}")
        log.event(logger, "participant.joined", room_id=room.id, participant_id=me.id, kind=kind, role=role,
                  janus=room.media.server.url)
        return room, me

    def _browser_peer(self, room: Room, me: Participant, media: JanusRoom) -> BrowserPeer:
        def talking(on: bool) -> None:
            if me.talking != on and room.participants.get(me.id) is me:
                me.talking = on
                room.broadcast()

        def publishing() -> None:
            if room.participants.get(me.id) is not me:
                return
            room.publishing.add(me.id)
            for other in room.browsers():
                if other is not me and other.peer is not None:
                    self.spawn(other.peer.subscribe([me.id]), f"subscribe-{other.id}")

        def lost(reason: str) -> None:
            self.spawn(self._media_lost(room, [me]), f"lost-{me.id}")

        return BrowserPeer(media, me.id, me.name, me.send, on_talking=talking, on_publishing=publishing, on_lost=lost)

    # -- leaving
    async def leave(self, room: Room, p: Participant) -> None:
        """`p` leaves (its socket closed, hung up, removed): out of Janus and the room; the room freed if empty."""
        async with room.lock:
            if room.participants.pop(p.id, None) is None:
                return
            await self._drop(room, p)
            if not await self._release_if_empty(room):
                room.broadcast()
        log.event(logger, "participant.left", room_id=room.id, participant_id=p.id)

    async def _drop(self, room: Room, p: Participant) -> None:
        p.close()
        if room.media is not None and (p.janus_id or p.kind == "browser"):
            await self.pool.kick(room.media, p.janus_id or p.id, video=p.kind == "browser")
        if p.peer is not None:
            await p.peer.close()
        if p.id in room.publishing:
            room.publishing.discard(p.id)
            for other in room.browsers():
                if other.peer is not None:
                    self.spawn(other.peer.unsubscribe(p.id), f"unsubscribe-{other.id}")

    async def _release_if_empty(self, room: Room) -> bool:
        """Destroy the Janus rooms of an empty room and forget it (the room lock is held)."""
        if room.participants:
            return False
        room.closed = True
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
        if room.recording is not None and self.recorder is not None:  # closed by Janus before the room goes
            await self.recorder.stop(room, "room_closed")
        if room.media is not None:
            media, room.media = room.media, None
            await self.pool.destroy(media)
            await self._forget(room.id)
        return True

    async def delete(self, room_id: str) -> None:
        """The room was deleted: `room_closed` to everyone, then its Janus rooms are destroyed."""
        room = self.rooms.get(room_id)
        if room is not None:
            await self._empty(room, {"type": "room_closed"})

    async def _empty(self, room: Room, farewell: dict[str, Any] | None) -> None:
        """Everyone out of `room` (told `farewell` first, if any), its sockets drained, its Janus rooms destroyed."""
        async with room.lock:
            if farewell is not None:
                room.broadcast(farewell)
            leaving = list(room.participants.values())
            room.participants.clear()
            for p in leaving:
                p.close()
                if p.peer is not None:
                    await p.peer.close()
            await self._release_if_empty(room)
        await asyncio.gather(*(drain(p) for p in leaving))

    # -- Janus lost
    def server_lost(self, server: JanusServer) -> None:
        """The pool's callback: every room on `server` is gone (called before the pool forgets them)."""
        for janus_room in list(server.rooms.values()):
            room = self.rooms.get(janus_room.room_id)
            if room is not None and room.media is janus_room:
                self.spawn(self._media_lost(room, None, janus_room), f"lost-{room.id}")

    async def _media_lost(self, room: Room, who: list[Participant] | None, media: JanusRoom | None = None) -> None:
        """Janus lost the room (media given) or these participants' sessions: tell them, close them."""
        async with room.lock:
            if media is not None:
                if room.media is not media:
                    return
                who = list(room.participants.values())
                room.media = None  # gone with the server: nothing to destroy
                if room.recording is not None and self.recorder is not None:  # its file is repaired from its length
                    await self.recorder.stop(room, "media_server_lost")
                await self._forget(room.id)
            for p in who or []:
                if room.participants.pop(p.id, None) is None:
                    continue
                p.send(error("media_server_lost", "the media server was lost"))
                await self._drop(room, p)
                log.event(logger, "participant.media_lost", logging.WARNING, room_id=room.id, participant_id=p.id)
            if not await self._release_if_empty(room):
                room.broadcast()

    # -- commands of a participant in the room
    async def command(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        kind = data.get("type")
        handler = self.HANDLERS.get(str(kind))
        if handler is None:
            me.send(error("unknown_type", f"unknown message type {kind!r}"))
            return
        await handler(self, room, me, data)

    async def _mute(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        async with room.mute_lock:  # after any mute-all already asked for (judged on its outcome)
            target = room.participants.get(str(data.get("participant_id", me.id)))
            moderator = me.role == "moderator"
            if target is None:
                me.send(error("not_found", "no such participant"))
                return
            muted = bool(data.get("muted", not target.muted))
            held = target.muted_by_moderator and not room.settings.get("allow_self_unmute")
            if not (target is me or moderator) or (target is me and not moderator and not muted and held):
                me.send(error("not_allowed", "mute: not allowed" if target is not me else "a moderator muted you"))
                return
            if await self._set_muted(room, target, muted, by_moderator=target is not me, asker=me):
                log.event(logger, "room.mute", room_id=room.id, participant_id=me.id, target=target.id, muted=muted)
                room.broadcast()

    async def _mute_all(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        if not self._moderator(me, "mute_all"):
            return
        muted = bool(data.get("muted", True))
        async with room.mute_lock:
            room.muted_on_entry = muted
            others = [p for p in room.participants.values() if p is not me]
            await asyncio.gather(*(self._set_muted(room, p, muted, by_moderator=True, asker=me) for p in others))
        log.event(logger, "room.mute_all", room_id=room.id, participant_id=me.id, muted=muted)
        room.broadcast()

    async def _set_muted(self, room: Room, p: Participant, muted: bool, *, by_moderator: bool,
                         asker: Participant) -> bool:
        """Mute/unmute in the AudioBridge (with the room secret) once `p` is in it; else at its join."""
        if p.janus_id and room.media is not None:
            try:
                await self.pool.mute(room.media, p.janus_id, muted)
            except JanusError as exc:
                log.event(logger, "room.mute_failed", logging.WARNING, room_id=room.id, target=p.id,
                          error=str(exc)[:200])
                asker.send(error("media_server_error", "the media server did not apply the mute"))
                return False
        p.muted = muted
        p.muted_by_moderator = muted and by_moderator
        return True

    async def _lock(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        if self._moderator(me, "lock"):
            room.locked = bool(data.get("locked", not room.locked))
            log.event(logger, "room.lock", room_id=room.id, participant_id=me.id, locked=room.locked)
            room.broadcast()

    async def _record(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        """A moderator starts or stops recording the room's mix (`on`: true/false; absent: toggle)."""
        if not self._moderator(me, "record") or self.recorder is None:
            return
        on = data.get("on", room.recording is None)
        try:
            if on is True and room.recording is None:
                await self.recorder.start(room, room.project, f"participant:{me.id}")
            elif on is False:
                await self.recorder.stop(room, "moderator")
        except RecordingError as exc:
            me.send(error(exc.code, exc.message))

    async def _remove(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        target = room.participants.get(str(data.get("participant_id", "")))
        if not self._moderator(me, "remove"):
            return
        if target is None or target is me:
            me.send(error("not_found", "remove: no such other participant"))
            return
        target.send({"type": "removed"})
        log.event(logger, "room.remove", room_id=room.id, participant_id=me.id, target=target.id)
        await self.leave(room, target)

    async def _talking(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        talking = bool(data.get("talking"))
        if me.kind == "phone" and me.talking != talking:  # browsers' talking comes from Janus
            me.talking = talking
            room.broadcast()

    async def _camera(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        """A browser turned its camera on or off (the track stays published: others show its avatar meanwhile)."""
        on = data.get("on")
        if me.kind != "browser" or not isinstance(on, bool):
            me.send(error("invalid_message", "camera: {on: true|false}, from a browser"))
            return
        if me.camera != on:
            me.camera = on
            room.broadcast()

    async def _rtp_joined(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        """The worker joined the AudioBridge: its Janus id is how we mute and kick it."""
        if me.kind != "phone" or not isinstance(data.get("janus_id"), str | int) or room.media is None:
            me.send(error("invalid_message", "rtp_joined: janus_id of a phone in the room"))
            return
        async with room.mute_lock:
            me.janus_id = str(data["janus_id"])
            log.event(logger, "phone.rtp_joined", room_id=room.id, participant_id=me.id)
            if me.muted:  # muted before it reached the AudioBridge
                await self._set_muted(room, me, True, by_moderator=me.muted_by_moderator, asker=me)

    async def _offer(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        pc, sdp = data.get("pc"), data.get("sdp")
        if me.peer is None or pc not in ("audio", "video") or not isinstance(sdp, str):
            me.send(error("invalid_message", "offer: pc audio|video and an sdp, from a browser"))
            return
        try:
            if pc == "audio":
                muted = me.muted
                answer = await me.peer.join_audio(sdp, muted)
                async with room.mute_lock:
                    me.janus_id = me.id
                    if me.muted != muted:  # changed while Janus was answering
                        await self._set_muted(room, me, me.muted, by_moderator=me.muted_by_moderator, asker=me)
            else:
                answer = await me.peer.publish(sdp)
        except JanusError as exc:
            log.event(logger, "browser.offer_failed", logging.WARNING, room_id=room.id, participant_id=me.id, pc=pc,
                      error=str(exc)[:200])
            me.send(error("media_server_error", f"the media server refused the {pc} offer"))
            return
        me.send({"type": "answer", "pc": pc, "sdp": answer})

    async def _answer(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        sdp = data.get("sdp")
        if me.peer is None or data.get("pc") != "sub" or not isinstance(sdp, str):
            me.send(error("invalid_message", "answer: pc sub and an sdp, from a browser"))
            return
        try:
            await me.peer.answer(sdp)
        except JanusError as exc:
            log.event(logger, "browser.answer_failed", logging.WARNING, room_id=room.id, participant_id=me.id,
                      error=str(exc)[:200])
            me.send(error("media_server_error", "the media server refused the answer"))

    async def _leave(self, room: Room, me: Participant, data: dict[str, Any]) -> None:
        await self.leave(room, me)

    def _moderator(self, me: Participant, what: str) -> bool:
        if me.role != "moderator":
            me.send(error("not_allowed", f"{what}: not allowed"))
        return me.role == "moderator"

    HANDLERS: dict[str, Callable[[LiveRooms, Room, Participant, dict[str, Any]], Awaitable[None]]] = {
        "mute": _mute, "mute_all": _mute_all, "lock": _lock, "remove": _remove, "talking": _talking, "camera": _camera,
        "rtp_joined": _rtp_joined, "offer": _offer, "answer": _answer, "leave": _leave, "record": _record,
    }

    # -- where rooms are (several room services, or workers, can read it)
    async def _remember(self, room_id: str, url: str) -> None:
        if self.redis is not None:
            try:
                await self.redis.set(f"gw:room:{room_id}:janus", url)
            except Exception as exc:  # noqa: BLE001 - the placement is in memory; Redis is informative
                log.event(logger, "room.placement_publish_failed", logging.WARNING, room_id=room_id,
                          error=str(exc)[:200])

    async def _forget(self, room_id: str) -> None:
        if self.redis is not None:
            try:
                await self.redis.delete(f"gw:room:{room_id}:janus")
            except Exception as exc:  # noqa: BLE001
                log.event(logger, "room.placement_publish_failed", logging.WARNING, room_id=room_id,
                          error=str(exc)[:200])

    async def close(self) -> None:
        """Shutdown: everyone out, every Janus room destroyed."""
        for room in list(self.rooms.values()):
            await self._empty(room, None)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
