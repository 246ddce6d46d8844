"""Calls from sipp (a real SIP peer) over real sockets on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SCENARIOS, Gateway, make_test_config, run_sipp, scenario, start_gateway, stop_gateway


def test_builtin_uac_calls_echo(gateway: Gateway) -> None:
    r = run_sipp(gateway.sip, "-sn", "uac", "-s", "15550100001", "-m", "5", "-r", "5", "-d", "1000")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = gateway.wait_calls_ended(5)
    assert len(rows) == 5
    for row in rows:
        assert row["did"] == "15550100001" and row["reason"] == "remote_bye" and row["answered_at"]
        cdr = gateway.cdr(row["voice_id"])
        states = [e["state"] for e in cdr["events"]]
        assert states == ["initiated", "answered", "disconnected"], states


def test_public_host_is_announced_while_the_sockets_bind_to_host(tmp_path: Path) -> None:
    """Behind a 1:1 NAT (README "Deploying"): `public_host` is an address the machine does not have. The answer's
    Contact and SDP name it, the RTP socket binds to `host`: the call is answered (it was 503 no_rtp_port when the
    socket tried to bind to the public address). sipp's built-in caller sends no RTP: nothing leaves loopback."""
    gw = start_gateway(tmp_path, env={"GATEWAY_SIP_PUBLIC_HOST": "192.0.2.10"})  # TEST-NET-1: never this host's
    try:
        r = run_sipp(gw.sip, "-sn", "uac", "-s", "15550100001", "-m", "1", "-d", "500", "-trace_msg",
                     "-message_file", str(tmp_path / "messages.log"), cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        answer = (tmp_path / "messages.log").read_text()
        assert "c=IN IP4 192.0.2.10" in answer and "@192.0.2.10:" in answer, answer[-2000:]
        row = gw.wait_calls_ended(1)[0]
        assert row["reason"] == "remote_bye" and row["answered_at"], row
    finally:
        stop_gateway(gw)


def test_tcp_call(gateway: Gateway) -> None:
    r = run_sipp(gateway.sip, "-sn", "uac", "-s", "15550100001", "-m", "2", "-r", "2", "-d", "500", "-t", "t1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = gateway.wait_calls_ended(2)
    assert all(r["reason"] == "remote_bye" for r in rows)
    assert all(gateway.cdr(r["voice_id"])["events"][0]["transport"] == "tcp" for r in rows)


def test_options_gets_200(gateway: Gateway) -> None:
    r = run_sipp(gateway.sip, "-sf", str(SCENARIOS / "options.xml"), "-m", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert gateway.calls() == []  # a probe is not a call


def test_unknown_did_gets_404(gateway: Gateway, tmp_path: Path) -> None:
    sf = scenario(tmp_path, "rejected.xml", status="404")
    r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "19999999999", "-m", "1")
    assert r.returncode == 0, r.stdout + r.stderr


def test_source_outside_allow_list_gets_403(tmp_path: Path) -> None:
    cfg = make_test_config().replace('sources = ["127.0.0.0/8"]', 'sources = ["127.0.0.2/32"]')
    gw = start_gateway(tmp_path, cfg)
    try:
        sf = scenario(tmp_path, "rejected.xml", status="403")
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", "15550100001", "-m", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert gw.calls() == []
        assert '"reason": "source_not_allowed"' in gw.log()
    finally:
        stop_gateway(gw)


def test_retransmitted_invite_is_absorbed_and_2xx_retransmitted(test_gateway: Gateway, tmp_path: Path) -> None:
    r = run_sipp(test_gateway.sip, "-sf", str(SCENARIOS / "retransmit.xml"), "-s", "15550100002", "-m", "1",
                 "-trace_msg", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    trace = next(tmp_path.glob("retransmit_*_messages.log")).read_text()
    received = [chunk.split("message sent")[0] for chunk in trace.split("message received")[1:]]
    invites = trace.count("INVITE sip:15550100002")
    ringing = [b for b in received if "SIP/2.0 180 " in b]
    ok = [b for b in received if "SIP/2.0 200 OK" in b and "CSeq: 1 INVITE" in b]
    assert invites >= 2, f"sipp should have retransmitted the INVITE (sent {invites})"
    assert len(ringing) >= invites, "each retransmitted INVITE is answered with the last provisional again"
    assert len(ok) >= 3, f"2xx must be retransmitted (T1, 2*T1) until the ACK; got {len(ok)}"
    rows = test_gateway.wait_calls_ended(1)
    assert len(rows) == 1, "a retransmitted INVITE must not make a second call"
    assert rows[0]["reason"] == "remote_bye"


def test_cancel_gives_200_and_487(test_gateway: Gateway) -> None:
    r = run_sipp(test_gateway.sip, "-sf", str(SCENARIOS / "cancel.xml"), "-s", "15550100002", "-m", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = test_gateway.wait_calls_ended(1)
    assert rows[0]["reason"] == "cancelled" and rows[0]["sip_code"] == 487 and rows[0]["answered_at"] is None
    states = [e["state"] for e in test_gateway.cdr(rows[0]["voice_id"])["events"]]
    assert states == ["initiated", "ringing", "disconnected"]
    assert test_gateway.http_get("/healthz")[1]["rtp_ports_in_use"] == 0


def test_echo_returns_the_callers_audio(gateway: Gateway, tmp_path: Path) -> None:
    """sipp streams a known mu-law file; what the gateway sends back must contain it byte for byte."""
    from gateway.media.rtp import RtpPacket
    from tests.integration.media_tools import Capture, make_signal_ulaw

    audio = tmp_path / "caller.ul"
    sent = make_signal_ulaw(audio, seconds=2.0)
    media_port = 46000 + (gateway.sip_port % 1000) * 2
    lo, hi = gateway.rtp_range
    cap = Capture(tmp_path / "echo.pcap", f"udp and dst port {media_port} and src portrange {lo}-{hi}")
    try:
        sf = scenario(tmp_path, "echo_rtp.xml", audio=str(audio), hold="3000")
        r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", media_port=media_port)
    finally:
        cap.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    packets = [RtpPacket.parse(p) for _, _, _, p in cap.udp_payloads()]
    assert packets, "the gateway sent no RTP to the caller"
    assert all(p.payload_type == 0 for p in packets)
    # capture order is send order on loopback (sorting by sequence would break on a 16-bit wrap)
    received = b"".join(p.payload for p in packets)
    frames = [sent[i : i + 160] for i in range(0, len(sent), 160)]
    missing = [i for i, f in enumerate(frames) if f not in received]
    assert not missing, f"{len(missing)} of {len(frames)} frames not echoed: {missing[:20]}; {len(packets)} packets"
    # In order, byte for byte. The jitter buffer may pause playout for a frame or two when a packet comes late
    # (sipp and the gateway share 2 cores): it plays silence then and loses nothing, so silence between the
    # caller's frames is allowed, a little of it.
    silence = b"\xff" * 160
    echoed = [p.payload for p in packets]
    first = echoed.index(frames[0])
    span = echoed[first : echoed.index(frames[-1], first) + 1]
    assert [f for f in span if f != silence] == frames, "the echoed frames are not in the order sent"
    assert span.count(silence) <= 5, f"{span.count(silence)} silence frames inserted in the echo"
    rows = gateway.wait_calls_ended(1)
    assert rows[0]["reason"] == "remote_bye"


@pytest.mark.serial  # loads the machine on purpose
def test_200_concurrent_echo_calls(gateway: Gateway, tmp_path: Path) -> None:
    """200 calls up at once, each streaming audio for 6 s: all complete, and 200 were active together."""
    import threading

    from tests.integration.media_tools import make_signal_ulaw

    audio = tmp_path / "caller.ul"
    make_signal_ulaw(audio, seconds=4.0)
    sf = scenario(tmp_path, "echo_rtp.xml", audio=str(audio), hold="6000")
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], gateway.http_get("/healthz")[1].get("active_calls", 0))
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = run_sipp(gateway.sip, "-sf", str(sf), "-s", "15550100001", "-m", "200", "-l", "200", "-r", "100",
                     timeout=90)
    finally:
        done.set()
        watcher.join(5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = gateway.wait_calls_ended(200, timeout=30)
    assert len(rows) == 200 and all(row["reason"] == "remote_bye" for row in rows)
    assert peak[0] >= 190, f"only {peak[0]} calls were up at once"
    health = gateway.http_get("/healthz")[1]
    assert health["active_calls"] == 0 and health["rtp_ports_in_use"] == 0, "every RTP port must be released"
