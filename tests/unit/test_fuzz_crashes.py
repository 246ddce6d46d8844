"""Every input the fuzzers crashed on (tests/fuzz/crashes/TARGET-what.bin) stays a test: its target must take it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CRASHES = sorted((Path(__file__).resolve().parents[1] / "fuzz" / "crashes").glob("*.bin"))


@pytest.mark.parametrize("path", CRASHES, ids=[p.stem for p in CRASHES])
def test_former_crash_is_handled(path: Path) -> None:
    target = next(name for name in sorted(TARGETS, key=len, reverse=True) if path.stem.startswith(name + "-"))
    TARGETS[target](path.read_bytes())


def test_a_request_whose_via_cannot_be_read_is_dropped_not_raised() -> None:
    """Found by fuzzing: rejecting a malformed request raised again while reading its Via (no answer, a traceback
    per packet in the log). It is now dropped and reported as malformed without a status."""
    from gateway.sip.transaction import MalformedMessage, SipStack, Target

    stack = SipStack()
    stack.receive(b'INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;x="open\r\nCSeq: x\r\n\r\n',
                  Target("udp", "127.0.0.2", 5070), 1.0)
    event = stack.next_event()
    assert isinstance(event, MalformedMessage) and event.answered is None
    assert stack.datagrams_to_send() == []


def test_an_empty_via_is_malformed_not_a_crash() -> None:
    """Found by the live-socket fuzz run: `Via:` with no value passed the parser, then indexing the top Via
    raised in the transaction layer (a traceback per packet)."""
    from gateway.sip.message import SipParseError, parse_message
    from gateway.sip.transaction import MalformedMessage, SipStack, Target

    data = (b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: \r\nFrom: <sip:b@127.0.0.2>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\n"
            b"Call-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    try:
        parse_message(data)
    except SipParseError as exc:
        assert "Via" in exc.reason
    else:
        raise AssertionError("an empty Via parsed")
    stack = SipStack()
    stack.receive(data, Target("udp", "127.0.0.2", 5070), 1.0)
    assert isinstance(stack.next_event(), MalformedMessage)
