"""A browser's media on Janus, driven by the room service so that no Janus secret or id reaches the page.

Each browser gets its own Janus session on its room's server with three plugin handles, one per
RTCPeerConnection of the page:
    audio    AudioBridge participant (WebRTC, Opus): the microphone in, the room's mix out
    video    VideoRoom publisher (the camera; absent when the page has none)
    sub      ONE multistream VideoRoom subscriber: every other browser's camera, one m-line each

The page sends offers for `audio` and `video` and gets answers; for `sub` Janus makes the offers (when a
subscription changes, or by itself when a subscribed publisher leaves: `autoupdate`) and the page answers.
SDPs carry all candidates (the page waits for ICE gathering to complete, Janus sends its own candidates
in its SDP), so no trickle is proxied. Page messages (see server.py for the whole protocol):
    page -> {"type": "offer", "pc": "audio"|"video", "sdp"}      service -> {"type": "answer", "pc", "sdp"}
    service -> {"type": "offer", "pc": "sub", "sdp", "streams": [{"mid", "feed", "kind", "active"}]}
    page -> {"type": "answer", "pc": "sub", "sdp"}
A stream's `feed` is the publishing participant's id (publishers join the VideoRoom under their participant
id), so the page can label each tile; an inactive stream's tile is removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ... import log
from ...adapters import janus_audiobridge as audiobridge
from ...adapters import janus_videoroom as videoroom
from ...adapters.janus import JanusError, JanusHandle, JanusSession, Json
from .janus_rooms import JanusRoom

logger = logging.getLogger("gateway.rooms")
NO_SUCH_FEED = 428


def jsep(kind: str, sdp: str) -> Json:
    return {"type": kind, "sdp": sdp, "trickle": False}  # every candidate is in the SDP


def page_streams(streams: object) -> list[dict[str, Any]]:
    """The subscriber's streams as the page needs them (mid -> whose camera), nothing else of Janus'."""
    out = []
    for s in streams if isinstance(streams, list) else []:
        if isinstance(s, dict) and s.get("type") in ("audio", "video"):
            out.append({"mid": str(s.get("mid", "")), "feed": str(s.get("feed_id", "")), "kind": s["type"],
                        "active": bool(s.get("active")) and "feed_id" in s})
    return out


class BrowserPeer:
    """One browser participant's Janus session and handles; `send` queues a message to its page."""

    def __init__(self, media: JanusRoom, participant_id: str, display: str, send: Callable[[dict[str, Any]], None],
                 *, on_talking: Callable[[bool], None], on_publishing: Callable[[], None],
                 on_lost: Callable[[str], None]) -> None:
        self.media = media
        self.id = participant_id
        self.display = display
        self.send = send
        self.on_talking = on_talking
        self.on_publishing = on_publishing
        self.on_lost = on_lost
        self.session: JanusSession | None = None
        self.audio: JanusHandle | None = None
        self.publisher: JanusHandle | None = None
        self.subscriber: JanusHandle | None = None
        self.subscribed: set[str] = set()  # feeds (participant ids) in the subscription
        self._sub_lock = asyncio.Lock()

    async def open(self) -> None:
        session = await self.media.server.client.create_session(on_lost=self.on_lost)
        self.session = session
        self.audio = await session.attach(audiobridge.PLUGIN, self._audio_event)
        self.publisher = await session.attach(videoroom.PLUGIN, None, self._publisher_core_event)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.destroy()  # Janus drops the participant, the publisher and the subscriber

    # -- the page's offers
    async def join_audio(self, sdp: str, muted: bool) -> str:
        """Join the AudioBridge as this participant (WebRTC, Opus); returns Janus' SDP answer."""
        assert self.audio is not None
        reply = await self.audio.message({"request": "join", "room": self.media.room_id, "id": self.id,
                                          "display": self.display, "muted": muted}, jsep("offer", sdp))
        return _answer(reply.jsep)

    async def publish(self, sdp: str) -> str:
        """Join the VideoRoom as a publisher of the camera; returns Janus' SDP answer."""
        assert self.publisher is not None
        reply = await self.publisher.message({"request": "joinandconfigure", "ptype": "publisher",
                                              "room": self.media.room_id, "id": self.id, "display": self.display},
                                             jsep("offer", sdp))
        return _answer(reply.jsep)

    async def answer(self, sdp: str) -> None:
        """The page's answer to the subscriber's latest offer."""
        if self.subscriber is None:
            raise JanusError(0, "no subscription to answer")
        reply = await self.subscriber.message({"request": "start"}, jsep("answer", sdp))
        self._subscriber_event(reply.data, reply.jsep)

    # -- the subscription: every other browser's camera
    async def subscribe(self, feeds: list[str]) -> None:
        """Add these publishers to the subscription (Janus then offers the page a renegotiation)."""
        async with self._sub_lock:
            new = [f for f in dict.fromkeys(feeds) if f not in self.subscribed and f != self.id]
            if not new or self.session is None:
                return
            try:
                await self._subscribe(new)
            except JanusError as exc:
                if exc.code != NO_SUCH_FEED or len(new) == 1:
                    raise
                for feed in new:  # one of them left meanwhile: subscribe to the others one by one
                    try:
                        await self._subscribe([feed])
                    except JanusError as one:
                        if one.code != NO_SUCH_FEED:
                            raise

    async def _subscribe(self, feeds: list[str]) -> None:
        assert self.session is not None
        streams = [{"feed": f} for f in feeds]
        if self.subscriber is None:
            handle = await self.session.attach(videoroom.PLUGIN, self._subscriber_event)
            try:
                reply = await handle.message({"request": "join", "ptype": "subscriber", "room": self.media.room_id,
                                              "streams": streams})
            except JanusError:
                await handle.detach()
                raise
            self.subscriber = handle
        else:
            reply = await self.subscriber.message({"request": "subscribe", "streams": streams})
        self.subscribed.update(feeds)
        self._subscriber_event(reply.data, reply.jsep)

    async def unsubscribe(self, feed: str) -> None:
        """A publisher left: take it out of the subscription. Janus renegotiates by itself when the publisher's
        session ends (autoupdate), but not after a VideoRoom `kick`; asking always yields exactly one offer."""
        async with self._sub_lock:
            self.subscribed.discard(feed)
            if self.subscriber is None:
                return
            try:
                reply = await self.subscriber.message({"request": "unsubscribe", "streams": [{"feed": feed}]})
            except JanusError as exc:
                log.event(logger, "browser.unsubscribe_failed", logging.DEBUG, participant_id=self.id,
                          error=str(exc)[:200])
                return
            self._subscriber_event(reply.data, reply.jsep)

    # -- Janus events (synchronous callbacks from the session's poll loop)
    def _subscriber_event(self, data: Json, offer: Json | None) -> None:
        if offer is not None and offer.get("type") == "offer" and isinstance(offer.get("sdp"), str):
            streams = page_streams(data.get("streams"))
            log.event(logger, "browser.subscription_offer", participant_id=self.id, janus_event=data.get("videoroom"),
                      feeds=[s["feed"] for s in streams if s["active"]])
            self.send({"type": "offer", "pc": "sub", "sdp": offer["sdp"], "streams": streams})

    def _audio_event(self, data: Json, _jsep: Json | None) -> None:
        kind = data.get("audiobridge")
        if kind in ("talking", "stopped-talking") and str(data.get("id")) == self.id:
            self.on_talking(kind == "talking")

    def _publisher_core_event(self, event: Json) -> None:
        if event.get("janus") == "webrtcup":
            log.event(logger, "browser.publishing", participant_id=self.id)
            self.on_publishing()


def _answer(reply_jsep: Json | None) -> str:
    if not reply_jsep or reply_jsep.get("type") != "answer" or not isinstance(reply_jsep.get("sdp"), str):
        raise JanusError(0, "Janus answered without an SDP answer")
    return str(reply_jsep["sdp"])
