"""Fuzz targets: each parser that meets input from outside, fed bytes, allowed to refuse them only with its own
error type (anything else is a crash the fuzzer reports). Run by `tests/fuzz/run.py` (atheris, coverage-guided)
and, briefly, by `tests/fuzz/test_fuzz.py` in `make test`."""

from __future__ import annotations

import json
from collections.abc import Callable

from gateway.adapters.janus import JanusSession
from gateway.media.dtmf import Rfc4733Receiver, parse_info
from gateway.media.rtp import RtpError, RtpPacket, is_rtcp
from gateway.sip.auth import parse_auth_header
from gateway.sip.message import NameAddr, SipParseError, SipUri, parse_message
from gateway.sip.sdp import SdpError, SessionDescription, negotiate
from gateway.sip.transaction import SipStack, Target

UDP = Target("udp", "127.0.0.2", 5070)
TCP = Target("tcp", "127.0.0.2", 5070)


def sip_message(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError:
        return
    msg.serialize()
    for name in ("from", "to", "contact"):
        for value in msg.headers.get_all(name):
            try:
                NameAddr.parse(value)
            except SipParseError:
                pass


def sip_stack(data: bytes) -> None:
    """The transaction layer takes anything: it answers (400 and friends) or drops, and never raises."""
    for source in (UDP, TCP):
        stack = SipStack()
        stack.local = {"udp": ("127.0.0.1", 5060), "tcp": ("127.0.0.1", 5060)}
        stack.receive(data, source, 1.0)
        while stack.next_event() is not None:
            pass
        stack.datagrams_to_send()
        stack.handle_timer(100.0)


def sip_uri(data: bytes) -> None:
    try:
        SipUri.parse(data.decode("utf-8", "replace"))
    except SipParseError:
        pass


def sdp(data: bytes) -> None:
    try:
        offer = SessionDescription.parse(data)
        for encryption in ("none", "optional", "required"):  # SDES crypto lines, each trunk rule
            try:
                negotiate(offer, encryption=encryption)
            except SdpError:
                pass
    except SdpError:
        pass


def digest(data: bytes) -> None:
    try:
        parse_auth_header(data.decode("utf-8", "replace"))
    except ValueError:
        pass


def rtp(data: bytes) -> None:
    is_rtcp(data)
    try:
        packet = RtpPacket.parse(data)
    except RtpError:
        return
    packet.serialize()
    Rfc4733Receiver().receive(packet.ssrc, packet.timestamp, packet.payload)


def info(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for content_type in ("application/dtmf-relay", "application/dtmf", text.partition("\n")[0]):
        parse_info(content_type, data)


def janus_events(data: bytes) -> None:
    """What Janus sends the gateway's client: any JSON (or not) never raises out of dispatch."""
    session = JanusSession.__new__(JanusSession)
    JanusSession.__init__(session, None, 1)  # type: ignore[arg-type]
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):
        event = data.decode("utf-8", "replace")
    session.dispatch(event)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sip_message": sip_message, "sip_stack": sip_stack, "sip_uri": sip_uri, "sdp": sdp, "digest": digest,
    "rtp": rtp, "info": info, "janus_events": janus_events,
}
