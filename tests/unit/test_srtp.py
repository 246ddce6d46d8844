"""SRTP with SDES (issue 13, part 2), the sans-I/O parts: a=crypto lines, the trunk's media_encryption rule in
offer/answer, and libsrtp contexts that protect, authenticate, refuse replays and re-key."""

from __future__ import annotations

import base64
import struct

import pytest

from gateway.media.srtp import SrtpContext, SrtpError, new_key
from gateway.sip.sdp import SUITES, Crypto, OurOffer, SdpError, SessionDescription, build_sdp, negotiate

KEY = bytes(range(30))
INLINE = base64.b64encode(KEY).decode()


def offer(proto: str = "RTP/SAVP", *crypto: str) -> SessionDescription:
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m=audio 4000 {proto} 0 101", "a=rtpmap:101 telephone-event/8000", *[f"a=crypto:{c}" for c in crypto]]
    return SessionDescription.parse("\r\n".join(lines) + "\r\n")


def test_crypto_lines_we_can_use_and_those_we_skip() -> None:
    assert Crypto.parse(f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}") == Crypto(1, SUITES[0], KEY)
    assert Crypto.parse(f"2 AES_CM_128_HMAC_SHA1_32 inline:{INLINE}|2^31") == Crypto(2, SUITES[1], KEY)
    assert Crypto.parse(f"3 AES_CM_128_HMAC_SHA1_80 INLINE:{INLINE}|1048576") == Crypto(3, SUITES[0], KEY)
    for skipped in (
        f"1 AES_256_CM_HMAC_SHA1_80 inline:{INLINE}",  # a suite we do not take
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}|2^20|1:4",  # an MKI
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE} UNENCRYPTED_SRTP",  # session parameters
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE};inline:{INLINE}",  # two keys
        "1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=",  # a 5-byte key
        "1 AES_CM_128_HMAC_SHA1_80 inline:!!notbase64!!",
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}|junk",
        f"\u00b2 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}",  # a superscript two: str.isdigit() says yes
        f"x AES_CM_128_HMAC_SHA1_80 inline:{INLINE}",
        f"1 AES_CM_128_HMAC_SHA1_80 uri:{INLINE}",
    ):
        assert Crypto.parse(skipped) is None, skipped


def test_required_takes_only_savp_with_a_usable_key() -> None:
    params = negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="required")
    assert params.crypto == Crypto(1, SUITES[0], KEY) and params.proto == "RTP/SAVP" and params.encryption == "srtp"
    with pytest.raises(SdpError, match="requires SRTP"):
        negotiate(offer("RTP/AVP"), encryption="required")
    with pytest.raises(SdpError, match="requires SRTP"):  # best-effort SDES is RTP/AVP: not enough for required
        negotiate(offer("RTP/AVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="required")
    with pytest.raises(SdpError, match="no a=crypto line"):
        negotiate(offer("RTP/SAVP"), encryption="required")
    with pytest.raises(SdpError, match="no usable a=crypto"):
        negotiate(offer("RTP/SAVP", f"1 AES_256_CM_HMAC_SHA1_80 inline:{INLINE}"), encryption="required")
    # the offerer's order among the usable lines
    both = offer("RTP/SAVP", f"7 AES_CM_128_HMAC_SHA1_32 inline:{INLINE}", f"8 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}")
    assert negotiate(both, encryption="required").crypto == Crypto(7, SUITES[1], KEY)


def test_optional_takes_either_and_none_takes_plain_only() -> None:
    assert negotiate(offer("RTP/AVP"), encryption="optional").crypto is None
    assert negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="optional").crypto
    best_effort = negotiate(offer("RTP/AVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="optional")
    assert best_effort.crypto is not None and best_effort.proto == "RTP/AVP"
    assert negotiate(offer("RTP/AVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}")).crypto is None  # none: ignored
    with pytest.raises(SdpError, match="takes plain RTP"):
        negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="none")
    with pytest.raises(SdpError, match="unsupported media transport"):
        negotiate(offer("UDP/TLS/RTP/SAVPF"), encryption="optional")


def test_an_answer_must_pick_a_line_we_offered_on_our_transport() -> None:
    ours = OurOffer("RTP/SAVP", (Crypto(1, SUITES[0], new_key()), Crypto(2, SUITES[1], new_key())))
    good = offer("RTP/SAVP", f"2 AES_CM_128_HMAC_SHA1_32 inline:{INLINE}")
    assert negotiate(good, encryption="required", answering=ours).crypto == Crypto(2, SUITES[1], KEY)
    with pytest.raises(SdpError):  # tag 2 was not the 80-bit suite
        negotiate(offer("RTP/SAVP", f"2 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="required", answering=ours)
    with pytest.raises(SdpError, match="one a=crypto line at most"):
        negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}",
                        f"2 AES_CM_128_HMAC_SHA1_32 inline:{INLINE}"), encryption="required", answering=ours)
    plain = OurOffer("RTP/AVP", ())  # e.g. a refresh of a call that is plain on an optional trunk
    with pytest.raises(SdpError, match="without one"):
        negotiate(offer("RTP/AVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="optional",
                  answering=plain)
    with pytest.raises(SdpError, match="not our offer's"):
        negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="optional",
                  answering=plain)
    assert negotiate(offer("RTP/AVP"), encryption="optional", answering=plain).crypto is None
    best_effort = OurOffer("RTP/AVP", ours.crypto)  # optional: RTP/AVP with keys; a plain answer is fine
    assert negotiate(offer("RTP/AVP"), encryption="optional", answering=best_effort).crypto is None


def test_our_sdp_carries_the_transport_and_keys_and_parses_back() -> None:
    ours = [Crypto(1, SUITES[0], KEY), Crypto(2, SUITES[1], KEY)]
    sdp = SessionDescription.parse(build_sdp("127.0.0.1", 5000, [("PCMU", 0)], 101, proto="RTP/SAVP", crypto=ours))
    audio = sdp.audio()
    assert audio is not None and audio.proto == "RTP/SAVP" and audio.crypto == ours


def rtp(seq: int, payload: bytes = b"\xff" * 160, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + payload


@pytest.mark.parametrize("suite, tag_length", [(SUITES[0], 10), (SUITES[1], 4)])
def test_contexts_protect_authenticate_and_refuse_replays(suite: str, tag_length: int) -> None:
    a_key, b_key = new_key(), new_key()
    alice, bob = SrtpContext(suite, a_key, b_key), SrtpContext(suite, b_key, a_key)
    packet = rtp(1)
    wire = alice.protect(packet)
    assert len(wire) == len(packet) + tag_length and wire[12:] != packet[12:]  # header clear, payload not
    assert bob.unprotect(wire) == packet
    with pytest.raises(SrtpError):
        bob.unprotect(wire)  # a replay
    tampered = bytearray(alice.protect(rtp(2)))
    tampered[20] ^= 1
    with pytest.raises(SrtpError):
        bob.unprotect(bytes(tampered))
    with pytest.raises(SrtpError):
        bob.unprotect(rtp(3))  # plain RTP
    with pytest.raises(SrtpError):
        bob.unprotect(SrtpContext(suite, new_key(), a_key).protect(rtp(4)))  # another key
    for shown in (repr(alice), repr(Crypto(1, SUITES[0], a_key)),
                  repr(negotiate(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"), encryption="required")),
                  repr(offer("RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"))):
        assert repr(KEY)[2:20] not in shown and repr(a_key)[2:20] not in shown and "key" not in shown, shown


def test_a_rekey_replaces_the_inbound_side_only() -> None:
    ours, theirs, later = new_key(), new_key(), new_key()
    ctx = SrtpContext(SUITES[0], ours, theirs)
    peer = SrtpContext(SUITES[0], theirs, ours)
    assert peer.unprotect(ctx.protect(rtp(1))) == rtp(1)
    assert not ctx.inbound(theirs) and ctx.inbound(later)
    assert peer.unprotect(ctx.protect(rtp(2))) == rtp(2), "our side goes on: the peer still reads us"
    with pytest.raises(SrtpError):
        ctx.unprotect(peer.protect(rtp(3)))  # the peer's old key
    assert ctx.unprotect(SrtpContext(SUITES[0], later, ours).protect(rtp(4))) == rtp(4)
    with pytest.raises(ValueError):
        SrtpContext(SUITES[0], ours, b"short")


async def test_a_session_takes_only_authentic_packets_and_follows_a_rekey() -> None:
    """RtpSession (no socket needed): packets are authenticated before strict RTP sees them; a re-INVITE's new
    peer key replaces the old one (old-key packets are then dropped); an unchanged key keeps the context; plain
    RTP is never taken where SRTP is required, even before the keys are known."""
    from dataclasses import replace

    from gateway.adapters.clock import MediaClock
    from gateway.adapters.ports import PortAllocator
    from gateway.adapters.rtp_session import RtpSession
    from gateway.sip.sdp import MediaParams

    peer_key = new_key()
    params = MediaParams("127.0.0.1", 4000, "PCMU", 0, 101, "sendrecv", crypto=Crypto(1, SUITES[0], peer_key))
    session = RtpSession(MediaClock(), PortAllocator(30000, 30010), params, (40, 200))
    session.learn(force=True)
    peer = SrtpContext(SUITES[0], peer_key, session.local_key)  # the far phone: its key out, ours in
    source = ("127.0.0.1", 4000)
    session.datagram_received(peer.protect(rtp(1)), source)
    session.datagram_received(rtp(2), source)  # plain
    session.datagram_received(SrtpContext(SUITES[0], new_key(), session.local_key).protect(rtp(3)), source)
    assert (session.received, session.dropped["srtp"]) == (1, 2)
    context, ours = session.srtp, session.local_key
    session.update(replace(params, direction="sendonly"))  # a hold that keeps the keys
    assert session.srtp is context
    rekeyed = new_key()
    session.update(replace(params, crypto=Crypto(1, SUITES[0], rekeyed)))
    assert session.srtp is context and session.local_key == ours, "a re-key keeps our side"
    session.datagram_received(peer.protect(rtp(4)), source)  # the old key: refused now
    session.datagram_received(SrtpContext(SUITES[0], rekeyed, session.local_key).protect(rtp(5)), source)
    assert (session.received, session.dropped["srtp"], session.encryption) == (2, 3, "srtp")
    session.update(replace(params, crypto=None))  # plain (an optional trunk), then SRTP again: a new key of ours
    assert session.srtp is None
    session.update(replace(params, crypto=Crypto(1, SUITES[1], rekeyed)))
    assert session.srtp is not None and session.local_key != ours
    plain = RtpSession(MediaClock(), PortAllocator(30000, 30010), replace(params, crypto=None), (40, 200))
    plain.require_srtp = True  # an outbound call on a required trunk, before the answer's key
    plain.learn(force=True)
    plain.datagram_received(rtp(1), source)
    assert (plain.received, plain.dropped["srtp"], plain.encryption) == (0, 1, "none")
