"""RFC 3261 section 17 transactions driven by an injected clock: no sockets, no sleeps."""

from __future__ import annotations

from gateway.sip.message import Headers, Request, Response, make_response, parse_message
from gateway.sip.transaction import (
    T1,
    T2,
    AckTimedOut,
    CancelReceived,
    ClientInviteTransaction,
    MalformedMessage,
    RequestReceived,
    ResponseReceived,
    ServerInviteTransaction,
    SipStack,
    Target,
    TransactionTimedOut,
)

PEER = Target("udp", "127.0.0.1", 5070)
TCP_PEER = Target("tcp", "127.0.0.1", 5070, conn=3)


def invite(branch: str = "z9hG4bKaaa", method: str = "INVITE", cseq: int = 1, to_tag: str = "") -> bytes:
    to = "<sip:15550100001@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"{method} sip:15550100001@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        f"To: {to}\r\n"
        "Call-ID: call-1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def events(stack: SipStack) -> list[object]:
    out = []
    while (ev := stack.next_event()) is not None:
        out.append(ev)
    return out


def sent(stack: SipStack) -> list[Response | Request]:
    return [parse_message(o.data) for o in stack.datagrams_to_send()]


def run_timers(stack: SipStack, until: float) -> float:
    """Advance the injected clock through every timer up to `until`."""
    now = 0.0
    while (when := stack.get_timer()) is not None and when <= until:
        now = when
        stack.handle_timer(now)
    return now


def test_invite_gets_100_and_event_with_rport_stamped() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    out = sent(stack)
    assert [m.status for m in out] == [100]  # type: ignore[union-attr]
    via = out[0].top_via
    assert via.params["rport"] == "5070" and via.params["received"] == "127.0.0.1"
    (ev,) = events(stack)
    assert isinstance(ev, RequestReceived) and isinstance(ev.transaction, ServerInviteTransaction)


def test_retransmitted_invite_absorbed_and_last_response_resent() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    (ev,) = events(stack)
    sent(stack)
    txn = ev.transaction
    txn.respond(make_response(ev.request, 180, to_tag="t"), 0.1)
    sent(stack)
    stack.receive(invite(), PEER, 0.2)
    assert events(stack) == []  # never a second call
    assert [m.status for m in sent(stack)] == [180]  # type: ignore[union-attr]


def test_2xx_retransmitted_until_ack() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    (ev,) = events(stack)
    sent(stack)
    ev.transaction.respond(make_response(ev.request, 200, to_tag="t"), 0.0)
    assert len(sent(stack)) == 1
    times = []
    now = 0.0
    while (when := stack.get_timer()) is not None and when <= 7 * T1:
        now = when
        stack.handle_timer(now)
        if sent(stack):
            times.append(now)
    assert times[:3] == [T1, 3 * T1, 7 * T1]  # T1, then doubling
    stack.receive(invite(branch="z9hG4bKack", method="ACK", to_tag="t"), PEER, now + 0.01)
    assert [type(e) for e in events(stack)] == [RequestReceived]
    assert run_timers(stack, 100) == 0.0 and stack.transaction_count == 0


def test_2xx_without_ack_times_out() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    (ev,) = events(stack)
    ev.transaction.respond(make_response(ev.request, 200, to_tag="t"), 0.0)
    run_timers(stack, 64 * T1)
    evs = events(stack)
    assert any(isinstance(e, AckTimedOut) for e in evs)
    intervals = [o for o in stack.datagrams_to_send()]
    assert len(intervals) >= 8  # capped at T2 between retransmissions
    assert T2 == 4.0


def test_non_2xx_final_retransmitted_then_ack_absorbed() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    (ev,) = events(stack)
    ev.transaction.respond(make_response(ev.request, 486, to_tag="t"), 0.0)
    sent(stack)
    stack.handle_timer(T1)
    assert [m.status for m in sent(stack)] == [486]  # type: ignore[union-attr]
    stack.receive(invite(method="ACK", to_tag="t"), PEER, 0.6)  # same branch: the transaction's ACK
    assert events(stack) == []
    assert ev.transaction.state == "confirmed"
    run_timers(stack, 10)
    assert sent(stack) == [] and stack.transaction_count == 0


def test_reliable_transport_does_not_retransmit_final() -> None:
    stack = SipStack()
    stack.receive(invite(), TCP_PEER, 0.0)
    (ev,) = events(stack)
    ev.transaction.respond(make_response(ev.request, 486, to_tag="t"), 0.0)
    out = stack.datagrams_to_send()
    assert all(o.target == TCP_PEER for o in out)
    stack.handle_timer(T1)
    assert stack.datagrams_to_send() == []


def test_cancel_gets_200_and_event() -> None:
    stack = SipStack()
    stack.receive(invite(), PEER, 0.0)
    (ev,) = events(stack)
    sent(stack)
    stack.receive(invite(method="CANCEL"), PEER, 0.5)
    assert [m.status for m in sent(stack)] == [200]  # type: ignore[union-attr]
    (cancel,) = events(stack)
    assert isinstance(cancel, CancelReceived) and cancel.invite is ev.transaction
    ev.transaction.respond(make_response(ev.request, 487, to_tag="t"), 0.5)
    assert [m.status for m in sent(stack)] == [487]  # type: ignore[union-attr]


def test_cancel_without_invite_gets_481() -> None:
    stack = SipStack()
    stack.receive(invite(method="CANCEL"), PEER, 0.0)
    assert [m.status for m in sent(stack)] == [481]  # type: ignore[union-attr]


def test_malformed_request_gets_400_and_garbage_is_dropped() -> None:
    stack = SipStack()
    bad = invite().replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE")
    stack.receive(bad, PEER, 0.0)
    (r,) = sent(stack)
    assert r.status == 400 and "CSeq" in r.reason  # type: ignore[union-attr]
    stack.receive(b"\x00\x01garbage", PEER, 0.0)
    assert sent(stack) == []
    assert all(isinstance(e, MalformedMessage) for e in events(stack))


def client_request(method: str) -> Request:
    h = Headers([("From", "<sip:gw@127.0.0.1>;tag=g1"), ("To", "<sip:bob@127.0.0.1>"), ("Call-ID", "c2"),
                 ("CSeq", f"1 {method}"), ("Max-Forwards", "70")])
    return Request(method, "sip:bob@127.0.0.1:5070", h)


def respond_to(request_bytes: bytes, status: int) -> bytes:
    req = parse_message(request_bytes)
    assert isinstance(req, Request)
    return make_response(req, status, to_tag="b1").serialize()


def test_client_invite_retransmits_and_acks_non_2xx() -> None:
    stack = SipStack(local={"udp": ("127.0.0.1", 5060)})
    txn = stack.send_request(client_request("INVITE"), PEER, 0.0)
    assert isinstance(txn, ClientInviteTransaction)
    first = stack.datagrams_to_send()[0].data
    stack.handle_timer(T1)
    assert len(stack.datagrams_to_send()) == 1  # timer A
    stack.receive(respond_to(first, 486), PEER, 0.7)
    ack = sent(stack)
    assert [m.method for m in ack] == ["ACK"]  # type: ignore[union-attr]
    assert ack[0].top_via.branch == txn.branch
    (ev,) = events(stack)
    assert isinstance(ev, ResponseReceived) and ev.response.status == 486
    stack.receive(respond_to(first, 486), PEER, 0.8)  # retransmitted final: ACK again, not reported
    assert len(sent(stack)) == 1 and events(stack) == []


def test_client_non_invite_times_out_with_timer_f() -> None:
    stack = SipStack()
    stack.send_request(client_request("OPTIONS"), PEER, 0.0)
    stack.datagrams_to_send()
    run_timers(stack, 64 * T1)
    assert any(isinstance(e, TransactionTimedOut) for e in events(stack))
    assert stack.transaction_count == 0


def test_client_invite_2xx_reported_each_time() -> None:
    stack = SipStack()
    stack.send_request(client_request("INVITE"), PEER, 0.0)
    first = stack.datagrams_to_send()[0].data
    ok = respond_to(first, 200)
    stack.receive(ok, PEER, 0.1)
    stack.receive(ok, PEER, 0.6)
    assert [e.response.status for e in events(stack)] == [200, 200]  # type: ignore[attr-defined]
