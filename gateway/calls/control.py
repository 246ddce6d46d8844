"""The API's handle on a live call: orders (join a room, leave it) given to the call's own flow.

A call's flow (the IVR, or a call the API drives) owns its media and room leg; the API never touches them.
It gives an `Order` to the call's `Steering` and awaits `order.done`: the flow takes the order at its next
step (mid-prompt in the IVR, or while in a room), carries it out and resolves it with None (done) or the
reason it failed.

Phases: setup (ringing, answering) -> ivr (prompts) -> parked (on hold, waiting for a room) ->
joining -> in_room; an order is accepted in ivr, parked and in_room only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

BRIDGEABLE = ("ivr", "parked", "in_room")


@dataclass
class Order:
    kind: str  # "join" | "leave"
    room_id: str = ""
    role: str = "participant"
    park: bool = False  # leave: stay on hold (parked) instead of hanging up
    done: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, error: str | None = None) -> None:
        if not self.done.done():
            self.done.set_result(error)


class Steering:
    def __init__(self) -> None:
        self.phase = "setup"
        self.room_id = ""
        self.order: Order | None = None
        self.changed = asyncio.Event()

    def give(self, order: Order) -> None:
        if self.order is not None:
            self.order.finish("superseded by a newer request")
        self.order = order
        self.changed.set()

    def take(self) -> Order | None:
        order, self.order = self.order, None
        self.changed.clear()
        return order

    def abandon(self, reason: str) -> None:
        """The call ended: whoever waits on an order hears why."""
        order = self.take()
        if order is not None:
            order.finish(reason)
