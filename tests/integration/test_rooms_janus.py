"""Phones in rooms whose media is on Janus: sipp callers validate through the IVR, the worker joins each to the
room's AudioBridge as a plain-RTP participant (started by `gateway run`, like the room service). No browser, so
no network namespace: plain RTP works on loopback."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np

from gateway.cluster.janus import JanusSecrets, janus_child, render_config
from gateway.config import load_config
from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import (
    ROOT,
    Gateway,
    free_port,
    make_test_config,
    port_block,
    run_sipp,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.ivr_tools import info, ivr_scenario, rfc4733
from tests.integration.media_tools import Capture
from tests.integration.test_bridge import IVR_DID, api, dominant, run_in_thread


def tone_file(path: Path, freq: float, seconds: float = 40.0) -> Path:
    t = np.arange(int(8000 * seconds)) / 8000
    path.write_bytes(g711.encode("PCMU", (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)))
    return path


def heard(cap: Capture) -> np.ndarray:
    """What a caller received from the gateway, decoded in arrival order."""
    return g711.decode("PCMU", b"".join(RtpPacket.parse(p).payload for _, _, _, p in cap.udp_payloads())).astype(float)


def caller_steps(room: dict, tone: Path, *after: str) -> list[str]:  # type: ignore[type-arg]
    return [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
            f'  <nop><action><exec rtp_stream="{tone},-1,0"/></action></nop>', *after]


def start(tmp_path: Path, env: dict[str, str] | None = None) -> Gateway:
    gw = start_gateway(tmp_path, make_test_config(), env)
    wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 60, "prompts and rooms")
    return gw


def test_two_phones_hear_each_other_through_the_audiobridge_and_star6_mutes(tmp_path: Path) -> None:
    gw = start(tmp_path)
    try:
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "phones", "settings": {"sip": {"enabled": True}}})
        lo, hi = gw.rtp_range
        ports = [free_port("udp") // 2 * 2 for _ in range(2)]
        caps = [Capture(tmp_path / f"c{i}.pcap", f"udp and dst port {p} and src portrange {lo}-{hi}")
                for i, p in enumerate(ports)]
        # A: 1 kHz for 10 s in the room, then *6 (muted in the mix) and 6 s more; B: 600 Hz, stays 20 s
        a = ivr_scenario(tmp_path / "a", caller_steps(room, tone_file(tmp_path / "a.ul", 1000), '  <pause milliseconds="10000"/>',
                                                      info("*6", "15551230001", 40), '  <pause milliseconds="6000"/>'),
                         caller="15551230001")
        b = ivr_scenario(tmp_path / "b", caller_steps(room, tone_file(tmp_path / "b.ul", 600), '  <pause milliseconds="20000"/>'),
                         caller="15551230002")
        try:
            ta, ra = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(a), "-s", IVR_DID, "-m", "1", timeout=90,
                                                    media_port=ports[0]))
            tb, rb = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(b), "-s", IVR_DID, "-m", "1", timeout=90,
                                                    media_port=ports[1]))
            ta.join(90)
            tb.join(90)
        finally:
            for cap in caps:
                cap.stop()
        assert ra["value"].returncode == 0, ra["value"].stdout[-2000:]
        assert rb["value"].returncode == 0, rb["value"].stdout[-2000:]
        got_a, got_b = heard(caps[0]), heard(caps[1])
        # A's last seconds before its *6: B's 600 Hz; B's audio while A streams: A's 1 kHz; after *6: silence
        windows = [dominant(got_a[i : i + 8000]) for i in range(0, len(got_a) - 8000, 4000)]
        assert any(abs(f - 600) < 15 and rms > 300 for f, rms in windows), windows
        windows = [dominant(got_b[i : i + 8000]) for i in range(0, len(got_b) - 8000, 4000)]
        assert any(abs(f - 1000) < 15 and rms > 300 for f, rms in windows), windows
        assert dominant(got_b[-8000 * 5 : -8000 * 2])[1] < 50, "A muted by *6: B hears silence"
        for row in gw.wait_calls_ended(2):
            events = {e["state"]: e for e in gw.cdr(row["voice_id"])["events"]}
            assert "joined" in events and "left" in events
            assert events["left"]["rtp_to_room"] > 400 and events["left"]["rtp_from_room"] > 400
        assert '"janus.started"' in gw.log()
    finally:
        stop_gateway(gw)


def janus_pids(gw: Gateway) -> list[int]:
    return [int(p) for p in re.findall(r'"janus\.started".*?"pid": (\d+)', gw.log())]


def test_janus_killed_mid_call_ends_the_call_and_is_restarted(tmp_path: Path) -> None:
    gw = start(tmp_path)
    try:
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "chaos", "settings": {"sip": {"enabled": True}}})
        tone = tone_file(tmp_path / "t.ul", 1000)
        sf = ivr_scenario(tmp_path / "a", caller_steps(room, tone), end="gateway", tail=60000)
        thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=90))
        wait_until(lambda: '"call.joined"' in gw.log(), 40, "the caller in the room")
        first = janus_pids(gw)[0]
        os.kill(first, signal.SIGKILL)
        thread.join(90)
        assert result["value"].returncode == 0, result["value"].stdout[-2000:]  # the gateway said BYE
        row = gw.wait_calls_ended(1)[0]
        assert row["reason"] == "media_server_lost", row
        wait_until(lambda: len(janus_pids(gw)) >= 2, 30, "the supervisor to restart Janus")
        # a new caller joins the room on the restarted Janus
        sf = ivr_scenario(tmp_path / "b", caller_steps(room, tone, '  <pause milliseconds="3000"/>'))
        again = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
        assert again.returncode == 0, again.stdout[-2000:]
        rows = gw.wait_calls_ended(2)
        newest = max(rows, key=lambda r: r["started_at"])
        states = [e["state"] for e in gw.cdr(newest["voice_id"])["events"]]
        assert "joined" in states, states
    finally:
        stop_gateway(gw)


def test_janus_unreachable_callers_hear_service_unavailable(tmp_path: Path) -> None:
    closed = free_port()
    gw = start(tmp_path, {"GATEWAY_JANUS_MANAGED": "false", "GATEWAY_JANUS_URLS": f'["http://127.0.0.1:{closed}/janus"]',
                          "GATEWAY_JANUS_ADMIN_KEY": "operator-key", "GATEWAY_JANUS_API_SECRET": "operator-secret"})
    try:
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "down", "settings": {"sip": {"enabled": True}}})
        sf = ivr_scenario(tmp_path, caller_steps(room, tone_file(tmp_path / "t.ul", 1000)), end="gateway", tail=30000)
        result = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
        assert result.returncode == 0, result.stdout[-2000:]
        row = gw.wait_calls_ended(1)[0]
        assert row["reason"] == "media_server_unavailable", row
        states = [e["state"] for e in gw.cdr(row["voice_id"])["events"]]
        assert "validated" in states and "room_join_failed" in states
    finally:
        stop_gateway(gw)


def start_janus(tmp: Path, secret: str, key: str) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    """A Janus of our own rendering, as an operator would run one beside the gateway (an external server)."""
    port, low = free_port(), port_block(302)
    env = {"GATEWAY_JANUS_HTTP_PORT": str(port), "GATEWAY_JANUS_WS_PORT": str(free_port()),
           "GATEWAY_JANUS_RTP_PORT_MIN": str(low), "GATEWAY_JANUS_RTP_PORT_MAX": str(low + 300),
           "GATEWAY_JANUS_API_SECRET": secret, "GATEWAY_JANUS_ADMIN_KEY": key, "GATEWAY_DATA_DIR": str(tmp)}
    config = load_config(ROOT / "config" / "gateway.toml", env)
    conf = render_config(config, JanusSecrets.load(config))
    proc = subprocess.Popen(["janus", "-C", str(conf / "janus.jcfg"), "-F", str(conf)], preexec_fn=janus_child,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/janus"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/info", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(answers, 15, f"Janus on port {port}")
    return proc, url


def test_two_janus_servers_rooms_spread_and_callers_reach_their_room(tmp_path: Path) -> None:
    secret, key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    servers = [start_janus(tmp_path / f"j{i}", secret, key) for i in range(2)]
    gw = None
    (tmp_path / "gw").mkdir()
    try:
        gw = start(tmp_path / "gw", {"GATEWAY_JANUS_MANAGED": "false", "GATEWAY_JANUS_API_SECRET": secret,
                                     "GATEWAY_JANUS_ADMIN_KEY": key,
                                     "GATEWAY_JANUS_URLS": json.dumps([url for _, url in servers])})
        rooms = [api(gw, "POST", "/video/v1/rooms", {"name": f"r{i}", "settings": {"sip": {"enabled": True}}})[1]
                 for i in range(2)]
        tone = tone_file(tmp_path / "t.ul", 1000)
        runs = []
        for i, room in enumerate(rooms):
            stay = 25000 if i == 0 else 4000  # the first room is still live when the second one is placed
            sf = ivr_scenario(tmp_path / f"c{i}", caller_steps(room, tone, f'  <pause milliseconds="{stay}"/>'),
                              caller=f"1555123000{i}")
            runs.append(run_in_thread(lambda sf=sf: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1",  # type: ignore[union-attr]
                                                            timeout=60)))
            wait_until(lambda n=i + 1: gw.log().count('"call.joined"') >= n, 40, f"caller {i} in its room")  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.rooms_port}/healthz", timeout=5) as r:
            health = json.loads(r.read())
        assert sorted(s["rooms"] for s in health["janus"]) == [1, 1], health  # one room on each server
        for thread, result in runs:
            thread.join(60)
            assert result["value"].returncode == 0, result["value"].stdout[-2000:]
        for row in gw.wait_calls_ended(2):
            left = next(e for e in gw.cdr(row["voice_id"])["events"] if e["state"] == "left")
            assert left["rtp_to_room"] > 200
        assert secret not in gw.log() and key not in gw.log()
    finally:
        if gw is not None:
            stop_gateway(gw)
        for proc, _ in servers:
            stop_process(proc)
