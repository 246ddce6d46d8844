"""The in-room flow: a call on hold until a room is named, then in the room (the leg to it, the keypad menu,
removal and closing notices) until it ends or the Voice API moves, parks or removes it.

    hosted: parked (hold audio) -> order "join" -> joining -> in_room (bridged, keypad menu)
                                                            -> order: join another room | leave (hang up or park)
    keypad: * then 6 mute/unmute yourself, 1 help, # count; moderators 4 mute all, 5 lock, 9 unmute all
            (a leg says which of these it can carry out: a forwarded call only mutes itself and hears the help)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from ..calls.call import CallEnded
from ..calls.control import Order
from ..config import MenuConfig
from .services import JoinContext, RoomConnector, RoomError, RoomLeg, Voice, masked_number

# what the room says -> (the prompt the caller hears, the CDR reason of the hang-up)
ENDINGS = {"removed": ("removed", "removed_from_room"), "room_closed": ("room_closed", "room_closed"),
           "disconnected": ("service_unavailable", "room_disconnected"),
           "media_server_lost": ("service_unavailable", "media_server_lost")}


async def hosted(v: Voice, order: Order | None = None) -> None:
    """On hold until a room is named, then in it until the call ends or an order moves or removes it."""
    call = v.call
    park_timeout = v.s.config.api.park_timeout_s
    while not call.ended.is_set():
        if order is None:
            v.steer.phase, v.steer.room_id = "parked", ""
            v.audio.hold()
            try:
                await asyncio.wait_for(call.wait_until(v.steer.changed), park_timeout)
            except TimeoutError:
                call.hangup("park_timeout")
                return
            order = v.steer.take()
            continue
        if order.kind == "leave":  # nothing to leave while parked
            order.finish("not in a room")
            order = None
            continue
        v.audio.hold()  # while the leg to the room connects
        connector = v.s.connector_for(v.did, v.project)
        if connector is None:
            order.finish("no room service configured")
            await call.ended.wait()
            return
        v.steer.phase, v.steer.room_id = "joining", order.room_id
        room = InRoom(v, order.room_id, order.role, connector)
        outcome = await room.run(order)
        order = None
        if outcome is None or call.ended.is_set():
            return
        if outcome.kind == "join":
            order = outcome
        else:
            call.record("removed", room_id=room.room_id, by="api")
            outcome.finish()
            if not outcome.park:
                call.hangup("removed_by_api")
                return
            call.record("parked")


class InRoom:
    """A validated caller in the room: bridged audio, the keypad menu, removal and closing notices."""

    def __init__(self, voice: Voice, room_id: str, role: str, connector: RoomConnector) -> None:
        self.v = voice
        self.connector = connector
        self.call = voice.call
        self.audio = voice.audio
        self.room_id = room_id
        self.role = role
        self.leg: RoomLeg | None = None
        self.moderator_here = asyncio.Event()
        self.ending: asyncio.Task[None] | None = None
        self.muted = False  # as the room last said
        self.muted_by_me: bool | None = None  # a *6 on its way to the room

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "state":
            if event.get("moderator_present"):
                self.moderator_here.set()
            self.note_mute(bool(self.me().get("muted", False)))
        elif kind in ENDINGS and self.ending is None and not self.call.ended.is_set():
            if kind == "removed":
                self.call.record("removed", room_id=self.room_id, by="moderator")
            key, reason = ENDINGS[kind]
            self.ending = asyncio.get_running_loop().create_task(self.v.goodbye(key, reason))
        elif kind == "hangup" and self.ending is None and not self.call.ended.is_set():
            # the far end of a forwarded call hung up: the caller's leg ends with it, without a prompt
            self.ending = asyncio.get_running_loop().create_task(self._hang_up(str(event.get("reason", "forward_ended"))))

    async def _hang_up(self, reason: str) -> None:
        self.call.hangup(reason)

    def note_mute(self, muted: bool) -> None:
        """A change of this call's mute state that the caller did not ask for (a moderator's, from the page, the
        API or another phone's keypad) is an event of the call."""
        if muted != self.muted:
            if self.muted_by_me is not muted:
                self.call.record("muted" if muted else "unmuted", room_id=self.room_id, by="room")
            self.muted, self.muted_by_me = muted, None

    def me(self) -> dict[str, Any]:
        state = self.leg.state if self.leg else {}
        pid = self.leg.participant_id if self.leg else ""
        return next((p for p in state.get("participants", []) if p.get("id") == pid), {})

    async def run(self, order: Order) -> Order | None:
        """Join, bridge, stay until the call ends (None) or the API gives a new order (returned, not yet done)."""
        cfg = self.v.s.config
        name = masked_number(self.v.caller, cfg.room_service.mask_digits)
        context = JoinContext(self.call, str(self.call.info.get("meeting_id", "")))
        try:
            self.leg = await self.connector.join(self.room_id, self.role, name, self.on_event, codec=self.audio.codec,
                                                 context=context)
        except RoomError as exc:
            if self.call.ended.is_set():  # the caller hung up while the leg was connecting
                order.finish("call ended")
                return None
            if exc.code == "room_locked":
                order.finish("room_locked")
                self.call.record("room_locked_out", logging.INFO, room_id=self.room_id)
                await self.v.goodbye("locked_out", "room_locked")
                return None
            order.finish(f"room join failed: {exc}")
            level = logging.WARNING if exc.code == "room_full" else logging.ERROR  # a full room is no fault of ours
            self.call.record("room_join_failed", level, room_id=self.room_id, error=str(exc), code=exc.code)
            reason = {"media_server_error": "media_server_unavailable", "room_full": "room_full",
                      "forward_failed": "forward_failed"}.get(exc.code, "room_join_failed")
            await self.v.goodbye("service_unavailable", reason, error=str(exc))
            return None
        steer = self.v.steer
        steer.phase = "in_room"
        self.call.record("joined", room_id=self.room_id, role=self.role, participant_id=self.leg.participant_id)
        order.finish()
        menu = asyncio.get_running_loop().create_task(self.menu())
        try:
            state = self.leg.state
            if self.role != "moderator" and state.get("wait_for_moderator") and not state.get("moderator_present"):
                self.call.record("waiting_for_moderator", room_id=self.room_id)
                self.audio.hold(False)
                await self.v.say("waiting_for_moderator", interruptible=False)
                self.audio.hold()
                await self.call.wait_until(self.moderator_here)
            self.audio.hold(False)
            self.audio.bridge(self.leg)
            await self.call.wait_until(steer.changed)
        finally:
            menu.cancel()
            self.audio.leg = None
            await self.leg.leave()
            if self.call.ended.is_set() or self.ending is not None or steer.changed.is_set():
                self.call.ua.cdr.event(self.call.voice_id, "left", room_id=self.room_id, **self.leg.stats())
        if self.call.ended.is_set() or self.ending is not None:
            return None
        return steer.take()

    async def menu(self) -> None:
        keys = {getattr(self.v.s.config.menu, f.name): f.name for f in dataclasses.fields(MenuConfig)}
        while True:
            if await self.audio.digits.get() != "*":
                continue
            try:
                key = await asyncio.wait_for(self.audio.digits.get(), 3.0)
            except TimeoutError:
                continue
            action = keys.get(key)
            if action is None:
                continue
            try:
                await self.act(action)
            except CallEnded:
                return

    async def act(self, action: str) -> None:
        assert self.leg is not None
        if action not in self.leg.actions:  # e.g. a forwarded call: the room's own service has those keys
            await self.v.say("not_available")
            return
        if action in ("mute_all", "lock", "unmute_all") and self.role != "moderator":
            await self.v.say("not_allowed")
            return
        if action == "mute_self":
            muted = not self.me().get("muted", False)
            self.muted_by_me = muted
            await self.leg.command({"type": "mute", "participant_id": self.leg.participant_id, "muted": muted})
            self.call.record("muted" if muted else "unmuted", room_id=self.room_id)
            await self.v.say("muted" if muted else "unmuted")
        elif action == "help":
            await self.v.say("menu_help" if "count" in self.leg.actions else "menu_help_self_only")
        elif action == "count":
            await self.v.say("participant_count", count=len(self.leg.state.get("participants", [])))
        elif action in ("mute_all", "unmute_all"):
            await self.leg.command({"type": "mute_all", "muted": action == "mute_all"})
            self.call.record(action, room_id=self.room_id)
            await self.v.say("all_muted" if action == "mute_all" else "all_unmuted")
        elif action == "lock":
            locked = not self.leg.state.get("locked", False)
            await self.leg.command({"type": "lock", "locked": locked})
            self.call.record("room_locked" if locked else "room_unlocked", room_id=self.room_id)
            await self.v.say("room_locked" if locked else "room_unlocked")
