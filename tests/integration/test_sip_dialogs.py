"""In-dialog behaviour against sipp: hold/resume, UPDATE, INFO, OPTIONS, session timers, offerless INVITE."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import SCENARIOS, Gateway, run_sipp, scenario
from tests.integration.ivr_tools import reply
from tests.integration.media_tools import Capture


def test_hold_resume_update_info_options(gateway: Gateway, tmp_path: Path) -> None:
    audio = tmp_path / "caller.al"
    t = np.arange(8000 * 3) / 8000
    audio.write_bytes(g711.encode("PCMA", (6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)))
    media_port = 44000 + (gateway.sip_port % 1000) * 2
    lo, hi = gateway.rtp_range
    cap = Capture(tmp_path / "hold.pcap", f"udp and dst port {media_port} and src portrange {lo}-{hi}")
    try:
        sf = scenario(tmp_path, "dialog_features.xml", audio=str(audio))
        r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", media_port=media_port)
    finally:
        cap.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    times = [ts for ts, _, _, p in cap.udp_payloads() if RtpPacket.parse(p).payload_type == 8]
    gaps = np.diff(times)
    assert times and gaps.max() > 1.2, "while held (a=sendonly from the caller) the gateway must not send RTP"
    assert (gaps > 1.2).sum() == 1, "RTP must resume after the re-INVITE that resumes"
    row = gateway.wait_calls_ended(1)[0]
    events = gateway.cdr(row["voice_id"])["events"]
    updates = [(e.get("method"), e.get("direction")) for e in events if e["state"] == "media_updated"]
    assert updates == [("INVITE", "recvonly"), ("INVITE", "sendrecv")]
    assert row["reason"] == "remote_bye"


def test_invite_without_sdp_offer_in_200_answer_in_ack(gateway: Gateway) -> None:
    r = run_sipp(gateway.sip, "-sf", str(SCENARIOS / "nosdp.xml"), "-s", "15550100001", "-m", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    row = gateway.wait_calls_ended(1)[0]
    events = gateway.cdr(row["voice_id"])["events"]
    updated = [e for e in events if e["state"] == "media_updated"]
    assert updated and updated[0]["codec"] == "PCMA", "the answer in the ACK must set the media"


REFRESH_481 = """  <recv request="UPDATE" timeout="60000">
    <action><ereg regexp="Session-Expires: 90;refresher=uas" search_in="msg" check_it="true" assign_to="se2"/></action>
  </recv>
""" + reply("481 Call/Transaction Does Not Exist")


def test_session_timer_refresh_by_gateway_and_failed_refresh_ends_call(gateway: Gateway, tmp_path: Path) -> None:
    """Takes ~46 s: RFC 4028 forbids intervals under 90 s, and the refresh comes at half of it."""
    sf = scenario(tmp_path, "session_refresh.xml", refresher="uas", refresh=REFRESH_481, bye_timeout="10000", refs=",se2")
    r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", timeout=90)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    row = gateway.wait_calls_ended(1)[0]
    assert row["reason"] == "session_refresh_failed"
    assert 44 <= row["ended_at"] - row["answered_at"] <= 50
    assert gateway.http_get("/healthz")[1]["rtp_ports_in_use"] == 0


def test_session_expires_without_refresh_gateway_sends_bye(gateway: Gateway, tmp_path: Path) -> None:
    """Takes ~60 s: the caller is refresher (90 s) and never refreshes; BYE comes 30 s before expiry."""
    sf = scenario(tmp_path, "session_refresh.xml", refresher="uac", refresh="", bye_timeout="70000", refs="")
    r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", timeout=100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    row = gateway.wait_calls_ended(1)[0]
    assert row["reason"] == "session_expired" and 58 <= row["ended_at"] - row["answered_at"] <= 63
