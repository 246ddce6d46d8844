"""Unit tests of the small sans-I/O pieces: framing, digest, SDP, dialogs, G.711, jitter buffer, config."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.adapters.ports import PortAllocator, PortsExhausted
from gateway.config import Config, ConfigError, load_config
from gateway.media import g711
from gateway.media.jitter import JitterBuffer
from gateway.media.rtp import RtpError, RtpPacket
from gateway.sip.auth import Credentials, DigestClient, DigestServer, digest_response
from gateway.sip.dialog import Dialog
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.message import Request, make_response, parse_message
from gateway.sip.sdp import SdpError, SessionDescription, build_sdp, negotiate

# ---------------------------------------------------------------- framing

MSG = b"OPTIONS sip:a@b SIP/2.0\r\nl: 5\r\n\r\nhello"


def test_framing_split_and_joined() -> None:
    f = StreamFramer()
    out = []
    for i in range(0, len(MSG * 2), 7):
        out += f.feed((MSG * 2)[i : i + 7])
    assert out == [MSG, MSG]
    assert f.feed(b"\r\n\r\n" + MSG) == [MSG] and f.pongs == 1


def test_framing_rejects_bad_length() -> None:
    with pytest.raises(FramingError):
        StreamFramer().feed(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -1\r\n\r\n")
    with pytest.raises(FramingError):
        StreamFramer(max_size=100).feed(b"X" * 200)


# ---------------------------------------------------------------- digest


def test_digest_known_vectors() -> None:
    # RFC 2617 section 3.5 (MD5, qop=auth) and RFC 7616 section 3.9.1 (SHA-256).
    assert digest_response("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life", "GET", "/dir/index.html",
                           "dcd98b7102dd2f0e8b11d0f600bfb0c093", "auth", "00000001", "0a4f113b") == \
        "6629fae49393a05397450978507c4ef1"
    assert digest_response("SHA-256", "Mufasa", "http-auth@example.org", "Circle of Life", "GET", "/dir/index.html",
                           "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", "auth", "00000001",
                           "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ") == \
        "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


@pytest.mark.parametrize("index", [0, 1])  # SHA-256 and MD5 challenges
def test_digest_client_server_roundtrip(index: int) -> None:
    server = DigestServer("gateway", secret=b"k" * 32)
    challenge = server.challenges(now=1000)[index]
    client = DigestClient(Credentials("trunk", "pw"))
    auth = client.authorization(challenge, "INVITE", "sip:15550100001@127.0.0.1")
    assert server.verify(auth, "INVITE", {"trunk": "pw"}, now=1001) == "trunk"
    assert server.verify(auth, "INVITE", {"trunk": "wrong"}, now=1001) is None
    assert server.verify(auth, "INVITE", {"trunk": "pw"}, now=1000 + 301) is None  # stale nonce
    assert "nc=00000002" in client.authorization(challenge, "INVITE", "sip:x@y")


# ---------------------------------------------------------------- SDP

OFFER = b"""v=0\r
o=- 1 1 IN IP4 127.0.0.1\r
s=-\r
c=IN IP4 127.0.0.1\r
t=0 0\r
m=audio 4000 RTP/AVP 18 8 0 96\r
a=rtpmap:96 telephone-event/8000\r
a=sendonly\r
"""


def test_sdp_negotiation_offerers_order_and_any_dtmf_pt() -> None:
    p = negotiate(SessionDescription.parse(OFFER))
    assert (p.codec, p.payload_type, p.dtmf_pt, p.direction) == ("PCMA", 8, 96, "recvonly")
    assert (p.remote_host, p.remote_port) == ("127.0.0.1", 4000)
    assert negotiate(SessionDescription.parse(OFFER), ("PCMU",)).codec == "PCMU"


def test_sdp_hold_forms_and_errors() -> None:
    old_hold = OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0").replace(b"a=sendonly\r\n", b"")
    assert negotiate(SessionDescription.parse(old_hold)).direction == "inactive"
    with pytest.raises(SdpError):
        negotiate(SessionDescription.parse(OFFER.replace(b"18 8 0 96", b"18 96")))
    with pytest.raises(SdpError):
        SessionDescription.parse(b"hello")


def test_sdp_build_parses_back() -> None:
    body = build_sdp("127.0.0.1", 5000, [("PCMU", 0), ("PCMA", 8)], 101, "recvonly", 7, 3)
    sdp = SessionDescription.parse(body)
    audio = sdp.audio()
    assert audio is not None and audio.formats == [0, 8, 101] and audio.direction == "recvonly"
    assert sdp.session_version == 3


# ---------------------------------------------------------------- dialog

INVITE = (b"INVITE sip:15550100001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
          b"Record-Route: <sip:proxy@127.0.0.9;lr>\r\nFrom: <sip:alice@127.0.0.1>;tag=a1\r\n"
          b"To: <sip:15550100001@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 5 INVITE\r\n"
          b"Contact: <sip:alice@127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n")


def test_uas_dialog_builds_bye_via_route_set() -> None:
    invite = parse_message(INVITE)
    assert isinstance(invite, Request)
    d = Dialog.as_uas(invite, "g1", "<sip:gateway@127.0.0.1:5060>", "udp")
    bye = d.create_request("BYE")
    assert bye.uri == "sip:alice@127.0.0.1:5070" and bye.from_.tag == "g1" and bye.to.tag == "a1"
    assert bye.headers.get_all("route") == ["<sip:proxy@127.0.0.9;lr>"]
    assert bye.cseq == (1, "BYE")
    assert d.destination().host == "127.0.0.9"
    assert not d.accept_remote_cseq(5) and d.accept_remote_cseq(6)
    ok = make_response(invite, 200, to_tag="g1")
    ok.headers.add("Contact", "<sip:gw@127.0.0.1>")
    assert Dialog.as_uac(invite, ok, "udp").remote_tag == "g1"


def test_record_route_is_copied_into_dialog_creating_responses_only() -> None:
    """RFC 3261 12.1.1: without it, a proxy in front (Kamailio) falls out of the dialog's path."""
    invite = parse_message(INVITE)
    assert isinstance(invite, Request)
    for status, copied in ((100, False), (180, True), (200, True), (486, False)):
        assert bool(make_response(invite, status, to_tag="g1").headers.get_all("record-route")) is copied, status
    bye = parse_message(INVITE.replace(b"INVITE sip", b"BYE sip").replace(b"5 INVITE", b"6 BYE"))
    assert isinstance(bye, Request) and make_response(bye, 200).headers.get_all("record-route") == []


# ---------------------------------------------------------------- media


def test_g711_roundtrip_close() -> None:
    t = np.arange(1600) / 8000
    x = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    for codec in ("PCMU", "PCMA"):
        y = g711.decode(codec, g711.encode(codec, x))
        assert np.max(np.abs(y.astype(int) - x)) < 300
        codes = bytes(range(256))
        assert g711.encode(codec, g711.decode(codec, codes)) == codes or codec == "PCMU"
    assert g711.decode("PCMU", bytes([0xFF]))[0] == 0


def test_rtp_parse_serialize() -> None:
    p = RtpPacket(0, 65535, 2**32 - 1, 1234, b"\xff" * 160, True)
    q = RtpPacket.parse(p.serialize())
    assert (q.payload_type, q.sequence, q.timestamp, q.ssrc, q.marker, q.payload) == (0, 65535, 2**32 - 1, 1234, True, p.payload)
    with pytest.raises(RtpError):
        RtpPacket.parse(b"\x00" * 12)


def frames(n: int, start_ts: int = 0) -> list[tuple[int, bytes]]:
    return [((start_ts + 160 * i) & 0xFFFFFFFF, bytes([i % 256]) * 160) for i in range(n)]


def test_jitter_in_order_and_reordered_stream_plays_every_frame() -> None:
    jb = JitterBuffer(min_frames=2, max_frames=10)
    pkts = frames(50, start_ts=2**32 - 800)  # crosses the timestamp wrap
    order = list(range(50))
    for i in range(0, 48, 4):
        order[i + 1], order[i + 2] = order[i + 2], order[i + 1]  # reorder pairs
    played = []
    for step, idx in enumerate(order):
        ts, payload = pkts[idx]
        jb.put(ts, payload, arrival=step * 0.02, ssrc=1)
        out = jb.pop()
        if out is not None:
            played.append(out[0])
    for _ in range(5):
        out = jb.pop()
        if out is not None:
            played.append(out[0])
    assert played == list(range(50))
    assert jb.stats.lost == 0 and jb.stats.late == 0


def test_jitter_loss_gives_silence_and_underrun_rebuffers() -> None:
    jb = JitterBuffer(min_frames=1, max_frames=10, silence=0xFF)
    pkts = frames(6)
    out = []
    for i in range(8):  # one arrival per 20 ms tick; frame 3 is lost, the stream stops after 5
        if i in (0, 1, 2, 4, 5):
            jb.put(*pkts[i], arrival=i * 0.02, ssrc=1)
        out.append(jb.pop())
    played = [o[0] for o in out if o is not None]
    assert played == [0, 1, 2, 0xFF, 4, 5]
    # frame 3 is late at its tick (underrun: wait), then played as silence once 4 is there; the end underruns
    assert jb.stats.lost == 1 and jb.stats.underruns == 2


def test_jitter_cuts_excess_delay() -> None:
    jb = JitterBuffer(min_frames=1, max_frames=4)
    for ts, payload in frames(30):
        jb.put(ts, payload, arrival=0.0, ssrc=1)  # a burst: 600 ms at once
    first = jb.pop()
    assert first is not None and jb.stats.skipped > 0 and jb.depth <= 4 * 160 + 3 * 160


def test_jitter_new_ssrc_resets() -> None:
    jb = JitterBuffer(min_frames=1)
    jb.put(1000, b"\x01" * 160, 0.0, ssrc=1)
    assert jb.pop() == b"\x01" * 160
    jb.put(999999, b"\x02" * 160, 0.02, ssrc=2)
    assert jb.pop() == b"\x02" * 160


def test_port_allocator_even_unique_and_released() -> None:
    ports = PortAllocator(20001, 20010)
    got = [ports.allocate() for _ in range(ports.size)]
    assert sorted(got) == [20002, 20004, 20006, 20008] and len(set(got)) == len(got)  # at random (strict RTP)
    with pytest.raises(PortsExhausted):
        ports.allocate()
    ports.release(20004)
    assert ports.allocate() == 20004


# ---------------------------------------------------------------- config


def test_config_errors_name_file_and_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "g.toml"
    cases = {
        "[sip]\nport = 'x'\n": "sip.port",
        "[sip]\nbogus = 1\n": "sip.bogus: unknown key",
        "[[trunks]]\nname = 't'\nsources = ['nope']\n": "trunks[0].sources[0]",
        "[[dids]]\nnumber = '1'\nroute = 'fax'\n": "dids[0].route",
        "[rtp]\nport_min = 5000\nport_max = 4000\n": "rtp.port_min",
    }
    for text, key in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(bad, environ={})
        assert str(bad) in str(info.value) and key in str(info.value)


def test_config_env_overrides_and_did_lookup() -> None:
    c = load_config(None, environ={"GATEWAY_SIP_PORT": "5070", "GATEWAY_RTP_PORT_MIN": "25000",
                                   "GATEWAY_SIP_TRANSPORTS": '["udp"]', "GATEWAY_LOG_LEVEL": "debug",
                                   "GATEWAY_ROOM_SERVICE_PORT": "9999", "GATEWAY_ROOM_SERVICE_EMBEDDED": "false"})
    assert c.room_service.port == 9999 and c.room_service.embedded is False
    assert c.sip.port == 5070 and c.rtp.port_min == 25000 and c.sip.transports == ["udp"] and c.log.level == "debug"
    with pytest.raises(ConfigError):
        load_config(None, environ={"GATEWAY_SIP_PORT": "x"})
    d = Config().did("+15550100001")
    assert d is not None and d.route == "echo"
