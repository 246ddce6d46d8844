"""The sip_forward connector with real peers on loopback: sipp callers validate through the IVR, sipp plays the
forward pool's members (SIP media gateways), and the worker stays in the middle. No room service and no Janus
are started: the rooms are only in the room store, their media is wherever the pool puts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from gateway.apps.prompts import PromptLibrary, read_wav
from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import (
    ROOT,
    Gateway,
    free_port,
    make_test_config,
    media_block,
    run_sipp,
    scenario,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.ivr_tools import info, ivr_scenario, reply, rfc4733
from tests.integration.media_tools import Capture
from tests.integration.test_bridge import dominant
from tests.integration.test_rooms_janus import tone_file
from tests.integration.voice_tools import udp_taken

pytestmark = pytest.mark.timeout(150)
FORWARD_DID = "15550100050"  # route ivr: meeting ID + PIN, then the pool
ROOM_DID = "15550100051"  # route room: the PIN only, then the pool
NO_RTP = {"GATEWAY_ROOM_SERVICE_EMBEDDED": "false", "GATEWAY_JANUS_MANAGED": "false"}

WAIT_BYE = '  <recv request="BYE" timeout="60000"/>\n' + reply("200 OK")
CAPTURE = """      <ereg regexp=".*" search_in="hdr" header="From:" assign_to="gwfrom"/>
      <ereg regexp="&lt;(sip:[^&gt;]+)&gt;" search_in="hdr" header="Contact:" assign_to="contact,gwcontact"/>"""
SEND_BYE = """  <pause milliseconds="%d"/>
  <send retrans="500"><![CDATA[
BYE [$gwcontact] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: <sip:member@[local_ip]:[local_port]>;tag=[pid]fwd[call_number]
To:[$gwfrom]
Call-ID: [call_id]
CSeq: %d BYE
Max-Forwards: 70
Content-Length: 0
]]></send>
  <recv response="200"/>"""


IN_DIALOG = """From: <sip:member@[local_ip]:[local_port]>;tag=[pid]fwd[call_number]
To:[$gwfrom]
Call-ID: [call_id]"""
REINVITE_PCMA = f"""  <send retrans="500"><![CDATA[
INVITE [$gwcontact] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
{IN_DIALOG}
CSeq: 2 INVITE
Contact: <sip:member@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=member 1 2 IN IP4 [media_ip]
s=-
c=IN IP4 [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
]]></send>
  <recv response="100" optional="true"/>
  <recv response="200">
    <action><ereg regexp="RTP/AVP 8 " search_in="body" check_it="true" assign_to="pcma"/></action>
  </recv>
  <Reference variables="pcma"/>
  <send><![CDATA[
ACK [$gwcontact] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
{IN_DIALOG}
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0
]]></send>"""


def config(targets: list[str], room_id: str = "", ring_timeout_s: int = 10) -> str:
    listed = ", ".join(f'"{t}"' for t in targets)
    fixed = f'[[dids]]\nnumber = "{ROOM_DID}"\nroute = "room"\nproject = "demo"\nroom_id = "{room_id}"\n' \
            f'connector = "sip_forward"\nforward_pool = "media"\n' if room_id else ""
    return make_test_config() + f"""
[[forward_pools]]
name = "media"
targets = [{listed}]
domain = "meet.example.org"
ring_timeout_s = {ring_timeout_s}
[forward_pools.headers]
X-Room-Id = "{{room_id}}"
X-Room-Role = "{{role}}"
Jitsi-Conference-Room = "{{room_name}}@{{domain}}"
X-Meeting-Id = "{{meeting_id}}"

[[dids]]
number = "{FORWARD_DID}"
route = "ivr"
project = "demo"
forward_pool = "media"
{fixed}"""


def start(tmp_path: Path, text: str) -> Gateway:
    gw = start_gateway(tmp_path, text, NO_RTP)
    wait_until(lambda: '"prompts.ready"' in gw.log(), 90, "prompts rendered")
    return gw


def room_first(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    """A room made in the data directory before the gateway starts (a route = "room" DID names it)."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-m", "gateway", "rooms", "create", "--json", "--name", "Standup", "--data-dir",
                          str(tmp_path / "data")], capture_output=True, timeout=30, cwd=ROOT, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


class Member:
    """sipp as one member of the pool, on its own SIP and media ports; its messages traced to a file."""

    def __init__(self, tmp: Path, name: str, xml: Path, timeout: int = 120) -> None:
        self.port, self.media = free_port(), media_block()
        self.messages = tmp / f"{name}.messages"
        cmd = ["sipp", "-sf", str(xml), "-i", "127.0.0.1", "-p", str(self.port), "-mi", "127.0.0.1",
               "-mp", str(self.media), "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error",
               "-trace_msg", "-message_file", str(self.messages)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        wait_until(lambda: self.proc.poll() is not None or udp_taken(self.port), 10, f"sipp member {name}")
        if self.proc.poll() is not None:
            raise AssertionError(f"member {name} exited at start: {self.proc.communicate()[0][-2000:]}")

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            out = self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            out = self.proc.communicate()[0]
        return self.proc.returncode, out[-3000:]

    def stop(self) -> None:
        stop_process(self.proc)

    def invite(self) -> str:
        text = self.messages.read_text(errors="replace")
        start = text.index("INVITE sip:")
        return text[start : text.index("\n\n", start)]


def member_xml(tmp: Path, name: str, room_id: str, tone: Path | str, end: str, te_pt: int = 101,
               before: str = "") -> Path:
    capture = CAPTURE if "gwcontact" in end + before else ""
    stream = str(tone) if "," in str(tone) else f"{tone},-1,0"
    return scenario(tmp / name, "forward_member.xml", room_id=room_id, tone=stream, end=end, capture=capture,
                    refs=",contact" if capture else "", te_pt=str(te_pt), before=before)


def reject_xml(tmp: Path, name: str, status: str = "503 Service Unavailable") -> Path:
    return scenario(tmp / name, "forward_reject.xml", status=status)


def events_of(gw: Gateway, until: str) -> tuple[dict, list[dict]]:  # type: ignore[type-arg]
    """The one call's CDR row and its events, once the event `until` is written too."""
    row = gw.wait_calls_ended(1, timeout=30)[0]
    evs = wait_until(lambda: (e := gw.cdr(row["voice_id"])["events"]) and any(x["state"] == until for x in e) and e,
                     20, f"the {until} event")
    return row, evs


def no_legs_left(gw: Gateway) -> None:
    """/healthz: no forwarded leg up, no member counted as busy (nothing leaked on any path)."""
    def idle() -> bool:
        pool = gw.http_get("/healthz")[1]["forward_pools"]["media"]
        return pool["legs"] == 0 and not any(pool["live"].values())
    wait_until(idle, 10, "the pool's legs to be released")


def received(cap: Capture, port: int, pt: int = 0) -> list[RtpPacket]:
    packets = [RtpPacket.parse(p) for _, _, dst, p in cap.udp_payloads() if dst == port and len(p) >= 12]
    return [p for p in packets if p.payload_type == pt]


def tone_heard(packets: list[RtpPacket], hz: float) -> list[tuple[float, float]]:
    audio = g711.decode("PCMU", b"".join(p.payload for p in packets)).astype(float)
    windows = [dominant(audio[i : i + 8000]) for i in range(0, len(audio) - 8000, 4000)]
    assert any(abs(f - hz) < 15 and rms > 300 for f, rms in windows), windows
    return windows


def find(heard: np.ndarray, prompt: np.ndarray) -> tuple[int, float]:
    """Where `prompt` starts in `heard` (cross-correlation by FFT), and how well it matches there."""
    n = len(heard) + len(prompt)
    corr = np.fft.irfft(np.fft.rfft(heard, n) * np.conj(np.fft.rfft(prompt, n)), n)[: len(heard)]
    offset = int(np.argmax(np.abs(corr)))
    seg = heard[offset : offset + len(prompt)]
    return offset, float(np.corrcoef(seg, prompt[: len(seg)])[0, 1]) if len(seg) > 800 else 0.0


def test_fails_over_503_then_relays_audio_and_dtmf_both_ways_star6_mutes_and_caller_bye_ends_both(tmp_path: Path) -> None:
    room = room_first(tmp_path)
    refusing = Member(tmp_path, "m1", reject_xml(tmp_path, "m1"))
    answering: Member | None = None
    gw: Gateway | None = None
    try:
        answering = Member(tmp_path, "m2", member_xml(tmp_path, "m2", room["room_id"], tone_file(tmp_path / "m.ul", 600),
                                                      WAIT_BYE))
        gw = start(tmp_path, config([refusing.uri, answering.uri]))
        lo, hi = gw.rtp_range
        caller_media = media_block()
        cap = Capture(tmp_path / "fwd.pcap", f"udp and (dst port {caller_media} or dst port {answering.media}) "
                                             f"and src portrange {lo}-{hi}")
        steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
                 '  <pause milliseconds="6000"/>', rfc4733("5"),
                 f'  <nop><action><exec rtp_stream="{tone_file(tmp_path / "c.ul", 1000)},-1,0"/></action></nop>',
                 '  <pause milliseconds="6000"/>', info("*6", "15551230000", 40), '  <pause milliseconds="4000"/>']
        try:
            caller = run_sipp(gw.sip, "-sf", str(ivr_scenario(tmp_path / "caller", steps, tail=200)), "-s", FORWARD_DID,
                              "-m", "1", timeout=90, media_port=caller_media)
            results = [refusing.finish(), answering.finish()]
        finally:
            cap.stop()
        assert caller.returncode == 0, caller.stdout[-2000:]
        assert results[0][0] == 0, results[0][1]  # 503 answered, ACKed
        assert results[1][0] == 0, results[1][1]  # the headers matched, answered, and it got the gateway's BYE
        invite = answering.invite()
        assert f"X-Room-Id: {room['room_id']}" in invite and "X-Room-Role: participant" in invite
        assert "Jitsi-Conference-Room: Standup@meet.example.org" in invite
        assert f"X-Meeting-Id: {room['sip']['meeting_id']}" in invite
        # audio both ways: the member hears the caller's 1 kHz, the caller the member's 600 Hz; the caller's digit
        # reached the member as RFC 4733 in the member's payload type (101, the caller sent 96)
        tone_heard(received(cap, answering.media), 1000)
        to_member = g711.decode("PCMU", b"".join(p.payload for p in received(cap, answering.media))).astype(float)
        assert dominant(to_member[-8000 * 3 : -8000])[1] < 50, "*6: the member hears silence, not the caller"
        tone_heard(received(cap, caller_media), 600)
        assert received(cap, answering.media, 101), "the caller's RFC 4733 digit relayed to the member"
        row, evs = events_of(gw, "forward_ended")
        no_legs_left(gw)
        states = [e["state"] for e in evs]
        assert row["reason"] == "remote_bye", row
        trying = [e["target"] for e in evs if e["state"] == "forward_trying"]
        assert trying == [refusing.uri, answering.uri], trying
        failed = next(e for e in evs if e["state"] == "forward_failed")
        assert failed["target"] == refusing.uri and failed["code"] == 503
        answered = next(e for e in evs if e["state"] == "forward_answered")
        assert answered["target"] == answering.uri and answered["code"] == 200 and answered["codec"] == "PCMU"
        ended = next(e for e in evs if e["state"] == "forward_ended")
        assert ended["by"] == "caller" and ended["rtp_to_far"] > 300 and ended["rtp_from_far"] > 300
        assert ended["dtmf_to_far"] >= 1
        assert states.index("validated") < states.index("forward_trying") < states.index("joined") < states.index("muted")
        assert room["sip"]["pin"] not in gw.log()
    finally:
        for m in (refusing, answering):
            if m is not None:
                m.stop()
        if gw is not None:
            stop_gateway(gw)


def test_member_bye_ends_the_caller(tmp_path: Path) -> None:
    room = room_first(tmp_path)
    # the member answers telephone-event as 96 (sipp's play_dtmf type) and types a digit, then streams its tone
    member = Member(tmp_path, "m", member_xml(tmp_path, "m", room["room_id"], tone_file(tmp_path / "m.ul", 600),
                                              SEND_BYE % (4000, 2), te_pt=96, before=rfc4733("7")))
    gw: Gateway | None = None
    try:
        gw = start(tmp_path, config([member.uri], room["room_id"]))
        lo, hi = gw.rtp_range
        caller_media = media_block()
        cap = Capture(tmp_path / "bye.pcap", f"udp and dst port {caller_media} and src portrange {lo}-{hi}")
        steps = [rfc4733(room["sip"]["pin"] + "#"),
                 f'  <nop><action><exec rtp_stream="{tone_file(tmp_path / "c.ul", 1000)},-1,0"/></action></nop>']
        try:
            caller = run_sipp(gw.sip, "-sf", str(ivr_scenario(tmp_path / "caller", steps, end="gateway", tail=60000)),
                              "-s", ROOM_DID, "-m", "1", timeout=90, media_port=caller_media)
        finally:
            cap.stop()
        assert received(cap, caller_media, 96), "the member's RFC 4733 digit relayed to the caller"
        code, out = member.finish()
        assert code == 0, out  # its BYE got 200
        assert caller.returncode == 0, caller.stdout[-2000:]  # the gateway's BYE reached the caller
        assert "X-Meeting-Id: " + room["sip"]["meeting_id"] in member.invite()  # a room DID: from the room store
        row, evs = events_of(gw, "forward_ended")
        no_legs_left(gw)
        assert row["reason"] == "forward_ended", row
        ended = next(e for e in evs if e["state"] == "forward_ended")
        assert ended["by"] == "far" and ended["target"] == member.uri and ended["rtp_to_far"] > 50
        assert ended["dtmf_to_caller"] >= 1
        states = [e["state"] for e in evs]
        assert states.index("forward_ended") < states.index("disconnected")
    finally:
        member.stop()
        if gw is not None:
            stop_gateway(gw)


def test_caller_hangs_up_while_the_member_rings_cancels_it(tmp_path: Path) -> None:
    room = room_first(tmp_path)
    member = Member(tmp_path, "m", scenario(tmp_path / "m", "forward_ringing.xml"))
    gw: Gateway | None = None
    try:
        gw = start(tmp_path, config([member.uri], room["room_id"], ring_timeout_s=60))
        # the PIN, the "joining" prompt (about 2.5 s), then the member rings for the rest of the 10 s: BYE
        caller = run_sipp(gw.sip, "-sf", str(ivr_scenario(tmp_path / "caller", [rfc4733(room["sip"]["pin"] + "#")],
                                                         tail=10000)), "-s", ROOM_DID, "-m", "1", timeout=90)
        assert caller.returncode == 0, caller.stdout[-2000:]
        code, out = member.finish()
        assert code == 0, out  # it got the CANCEL, answered 487, and got the ACK
        assert "CANCEL sip:" in member.messages.read_text()
        row, evs = events_of(gw, "forward_failed")
        no_legs_left(gw)
        assert row["reason"] == "remote_bye", row
        states = [e["state"] for e in evs]
        assert "forward_answered" not in states and "joined" not in states, states
        failed = next(e for e in evs if e["state"] == "forward_failed")
        assert failed["target"] == member.uri and failed["code"] == 487
        assert '"call.room_join_failed"' not in gw.log()  # the caller left: not a failure of the room
    finally:
        member.stop()
        if gw is not None:
            stop_gateway(gw)


def test_pool_all_down_caller_hears_service_unavailable_then_bye(tmp_path: Path) -> None:
    room = room_first(tmp_path)
    closed = free_port()  # nothing listens there: no answer within the ring timeout
    member = Member(tmp_path, "m", reject_xml(tmp_path, "m"))
    gw: Gateway | None = None
    try:
        gw = start(tmp_path, config([f"sip:127.0.0.1:{closed}", member.uri], room["room_id"], ring_timeout_s=2))
        lo, hi = gw.rtp_range
        caller_media = media_block()
        cap = Capture(tmp_path / "down.pcap", f"udp and dst port {caller_media} and src portrange {lo}-{hi}")
        try:
            caller = run_sipp(gw.sip, "-sf", str(ivr_scenario(tmp_path / "caller", [rfc4733(room["sip"]["pin"] + "#")],
                                                             end="gateway", tail=60000)),
                              "-s", ROOM_DID, "-m", "1", timeout=90, media_port=caller_media)
        finally:
            cap.stop()
        assert caller.returncode == 0, caller.stdout[-2000:]  # it got the gateway's BYE
        code, out = member.finish()
        assert code == 0, out
        row, evs = events_of(gw, "disconnected")
        no_legs_left(gw)
        assert row["reason"] == "forward_failed", row
        failed = [(e["target"], e["code"]) for e in evs if e["state"] == "forward_failed"]
        assert failed == [(f"sip:127.0.0.1:{closed}", 408), (member.uri, 503)], failed
        # the last thing the caller heard before the BYE is the service-unavailable prompt
        library = PromptLibrary(ROOT / "prompts", gw.data_dir / "prompts-cache")
        prompt = read_wav(library.cache_path(library.text("service_unavailable", "en-US"), "en-US", "female"))
        heard = g711.decode("PCMU", b"".join(p.payload for p in received(cap, caller_media))).astype(float)
        offset, match = find(heard, prompt.astype(float))
        assert match > 0.9, match
        assert abs(len(heard) - offset - len(prompt)) < 8000 * 0.5, "then the BYE"
    finally:
        member.stop()
        if gw is not None:
            stop_gateway(gw)


CALLER_TAKES_PCMA = """  <recv request="INVITE" timeout="30000">
    <action><ereg regexp="RTP/AVP 8 96" search_in="body" check_it="true" assign_to="offer"/></action>
  </recv>
  <Reference variables="offer"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:caller@[local_ip]:[local_port]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=caller 1 2 IN IP4 [media_ip]
s=-
c=IN IP4 [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 8 96
a=rtpmap:8 PCMA/8000
a=rtpmap:96 telephone-event/8000
a=fmtp:96 0-15
]]></send>
  <recv request="ACK"/>"""


def alaw_tone(path: Path, hz: float) -> Path:
    t = np.arange(8000 * 40) / 8000
    path.write_bytes(g711.encode("PCMA", (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)))
    return path


def test_member_reinvites_to_pcma_and_the_caller_is_reoffered_pcma(tmp_path: Path) -> None:
    """Both legs start on PCMU; the member moves its leg to PCMA by re-INVITE; the gateway re-INVITEs the caller
    offering PCMA only (its telephone-event type kept), and from the caller's answer on payloads cross untouched:
    each side hears the other's A-law tone."""
    room = room_first(tmp_path)
    member = Member(tmp_path, "m", member_xml(tmp_path, "m", room["room_id"], f"{alaw_tone(tmp_path / 'm.al', 600)},-1,8",
                                              WAIT_BYE, before=REINVITE_PCMA))
    gw: Gateway | None = None
    try:
        gw = start(tmp_path, config([member.uri], room["room_id"]))
        lo, hi = gw.rtp_range
        caller_media = media_block()
        cap = Capture(tmp_path / "pcma.pcap", f"udp and (dst port {caller_media} or dst port {member.media}) "
                                              f"and src portrange {lo}-{hi}")
        steps = [rfc4733(room["sip"]["pin"] + "#"),
                 f'  <nop><action><exec rtp_stream="{tone_file(tmp_path / "c.ul", 1000)},-1,0"/></action></nop>',
                 CALLER_TAKES_PCMA,
                 f'  <nop><action><exec rtp_stream="{alaw_tone(tmp_path / "c.al", 1000)},-1,8"/></action></nop>',
                 '  <pause milliseconds="6000"/>']
        try:
            caller = run_sipp(gw.sip, "-sf", str(ivr_scenario(tmp_path / "caller", steps, tail=200)), "-s", ROOM_DID,
                              "-m", "1", timeout=90, media_port=caller_media)
            code, out = member.finish()
        finally:
            cap.stop()
        assert caller.returncode == 0, caller.stdout[-2000:]  # it got the re-INVITE offering PCMA (and 96)
        assert code == 0, out  # its re-INVITE was answered with PCMA, and the caller's BYE reached it
        for port, hz in ((caller_media, 600), (member.media, 1000)):
            audio = g711.decode("PCMA", b"".join(p.payload for p in received(cap, port, 8))).astype(float)
            windows = [dominant(audio[i : i + 8000]) for i in range(0, len(audio) - 8000, 4000)]
            assert any(abs(f - hz) < 15 and rms > 300 for f, rms in windows), (port, windows)
        row, evs = events_of(gw, "forward_ended")
        no_legs_left(gw)
        by_state = {e["state"]: e for e in evs}
        assert by_state["forward_media_updated"]["codec"] == "PCMA"
        assert by_state["forward_codec_followed"]["codec"] == "PCMA" and by_state["forward_codec_followed"]["leg"] == "caller"
        assert any(e["state"] == "media_updated" and e.get("method") == "reoffer" and e["codec"] == "PCMA" for e in evs)
        assert by_state["forward_ended"]["frames_converted"] < 50, "converted only while the re-offer was out"
    finally:
        member.stop()
        if gw is not None:
            stop_gateway(gw)
