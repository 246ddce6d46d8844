"""Rooms on Janus, end to end: Chromium on the room page, sipp as the phone, `gateway run` (the worker, its
Janus, the room service in its own process). WebRTC needs a non-loopback interface: every test runs inside a
network namespace of its own (tests/integration/netns.py), and so does everything it starts. What the page itself
shows (the grid, the end screens, moderation from the page) is tested in test_room_page.py."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import Gateway, run_sipp, wait_until
from tests.integration.browser import Browser
from tests.integration.ivr_tools import info, ivr_scenario, rfc4733
from tests.integration.media_tools import Capture

pytestmark = [pytest.mark.timeout(180), pytest.mark.serial]  # Chromium and WebRTC: alone, after the parallel pass
IVR_DID = "15550100000"



def api(gw: Gateway, method: str, path: str, body: Any = None, auth: bool = True) -> tuple[int, Any]:
    key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
    req = urllib.request.Request(f"{gw.rooms_url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"demo:{key}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=gw.tls) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def dominant(samples: np.ndarray) -> tuple[float, float]:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / 8000)[int(np.argmax(spectrum))]), float(np.sqrt(np.mean(samples**2)))


def run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn` in a thread started from here: it shares this thread's network namespace."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    thread.start()
    return thread, result


def hears(b: Browser, hz: float, what: str, timeout: float = 20) -> None:
    wait_until(lambda: abs(b.gw()["peakHz"] - hz) < 30 and b.gw()["rms"] > 0.01, timeout, what)


def silent(b: Browser, what: str, timeout: float = 10) -> None:
    wait_until(lambda: b.gw()["rms"] < 0.005, timeout, what)


def pid(b: Browser) -> str:
    return str(b.gw()["id"])


def test_room_api(bridge_gateway: Gateway) -> None:
    gw = bridge_gateway
    assert api(gw, "POST", "/video/v1/rooms", {"name": "x"}, auth=False)[0] == 401
    status, err = api(gw, "POST", "/video/v1/rooms", {"name": ""})
    assert status == 400 and "name" in err["error"]["message"]
    status, err = api(gw, "POST", "/video/v1/rooms", {"name": "a", "settings": {"sip": {"enabled": "yes"}}})
    assert status == 400 and "settings.sip.enabled" in err["error"]["message"]
    status, room = api(gw, "POST", "/video/v1/rooms", {"name": "Weekly", "settings": {"sip": {"enabled": True}}})
    assert status == 201 and room["sip"]["enabled"] and len(room["sip"]["meeting_id"]) == 9
    rid = room["room_id"]
    assert api(gw, "GET", f"/video/v1/rooms/{rid}")[1]["name"] == "Weekly"
    assert api(gw, "GET", f"/video/v1/rooms/{rid}/participants")[1]["participants"] == []
    # the IVR's directory and the room service are the same rooms
    assert rid in [r["room_id"] for r in gw.cli("rooms", "list")]  # type: ignore[index]
    assert api(gw, "DELETE", f"/video/v1/rooms/{rid}")[0] == 200
    assert api(gw, "GET", f"/video/v1/rooms/{rid}")[0] == 404
    assert rid not in [r["room_id"] for r in gw.cli("rooms", "list")]  # type: ignore[index]


def test_caller_and_browser_hear_each_other_and_star6_mutes(bridge_gateway: Gateway, browsers: Any,
                                                            tmp_path: Path) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "e2e", "settings": {"sip": {"enabled": True}}})
    browser = browsers("alice", 440.0)
    caller_tone = tmp_path / "caller.ul"
    caller_tone.write_bytes(g711.encode("PCMU", (8000 * np.sin(2 * np.pi * 1000 * np.arange(8000 * 40) / 8000)).astype(np.int16)))
    media_port = 40000 + (gw.sip_port % 1000) * 2
    lo, hi = gw.rtp_range
    cap = Capture(tmp_path / "caller.pcap", f"udp and dst port {media_port} and src portrange {lo}-{hi}")
    try:
        browser.join(room["links"]["join"], "Alice")
        steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
                 f'  <nop><action><exec rtp_stream="{caller_tone},-1,0"/></action></nop>',
                 '  <pause milliseconds="8000"/>', info("*6", "15551230000", 40), '  <pause milliseconds="7000"/>']
        sf = ivr_scenario(tmp_path, steps, tail=0)
        thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1",
                                                       timeout=120, media_port=media_port))
        phone = wait_until(lambda: [p for p in browser.participants() if p["kind"] == "phone"], 40, "the phone in the list")
        assert phone[0]["name"].endswith("0000") and "1555123" not in phone[0]["name"], "caller number masked"
        assert any(li["kind"] == "phone" and "0000" in li["text"] for li in browser.listed())
        hears(browser, 1000, "the page to hear the caller's 1 kHz tone (through the AudioBridge)", 15)
        wait_until(lambda: any(li["kind"] == "phone" and li["muted"] == "true" for li in browser.listed()), 20,
                   "the page to show the phone muted after *6")
        silent(browser, "the caller's tone to stop reaching the browser (muted in Janus)")
        thread.join(120)
    finally:
        cap.stop()
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
    audio = g711.decode("PCMU", b"".join(RtpPacket.parse(p).payload for _, _, _, p in cap.udp_payloads())).astype(float)
    freq, rms = dominant(audio[-8000 * 4 :])  # the last seconds: bridged, no prompt playing
    assert abs(freq - 440) < 15 and rms > 300, (freq, rms)
    evs = gw.cdr(gw.wait_calls_ended(1)[0]["voice_id"])["events"]
    states = [e["state"] for e in evs]
    assert "joined" in states and "muted" in states and "left" in states


def test_moderator_star4_mutes_the_browser_and_removal_ends_the_call(bridge_gateway: Gateway, browsers: Any,
                                                                      tmp_path: Path) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "mod", "settings": {"sip": {"enabled": True}}})
    browser = browsers("host", 440.0)
    browser.join(room["links"]["host"], "Host")  # the browser is a moderator too: it will remove the phone
    steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["mpin"] + "#"),
             '  <pause milliseconds="4000"/>', info("*4", "15551230000", 40)]
    sf = ivr_scenario(tmp_path, steps, end="gateway", tail=60000)
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=120))
    wait_until(lambda: any(p["kind"] == "browser" and p["muted"] for p in browser.participants()), 40,
               "the moderator's *4 to mute the browser")
    phone = [p for p in browser.participants() if p["kind"] == "phone"][0]
    assert phone["role"] == "moderator" and not phone["muted"]
    browser.driver.execute_script(f"document.querySelector('#people li[data-id=\"{phone['id']}\"] button:last-child').click()")
    thread.join(120)
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
    row = gw.wait_calls_ended(1)[0]
    assert row["reason"] == "removed_from_room"
    assert "mute_all" in [e["state"] for e in gw.cdr(row["voice_id"])["events"]]


def test_wait_for_moderator_then_room_closed_ends_the_call(bridge_gateway: Gateway, browsers: Any,
                                                           tmp_path: Path) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms",
                  {"name": "wait", "settings": {"sip": {"enabled": True}, "wait_for_moderator": True}})
    steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#")]
    sf = ivr_scenario(tmp_path, steps, end="gateway", tail=90000)
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=120))
    wait_until(lambda: '"call.waiting_for_moderator"' in gw.log(), 40, "the caller to wait for a moderator")
    browser = browsers("host", 440.0)
    browser.join(room["links"]["host"], "Host")
    # the moderator is here: the caller leaves the hold audio and joins the room
    wait_until(lambda: any(p["kind"] == "phone" for p in browser.participants()), 20, "the phone in the room")
    status, _ = api(gw, "DELETE", f"/video/v1/rooms/{room['room_id']}")
    assert status == 200
    wait_until(lambda: browser.gw()["closed"] == "room_closed", 10, "the page to be told the room closed")
    thread.join(120)
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
    row = gw.wait_calls_ended(1)[0]
    assert row["reason"] == "room_closed"
    states = [e["state"] for e in gw.cdr(row["voice_id"])["events"]]
    assert states.index("waiting_for_moderator") < states.index("left")


def test_moderator_star5_locks_out_new_callers_and_browsers_and_star9_unmutes_all(
        bridge_gateway: Gateway, browsers: Any, tmp_path: Path) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "lock", "settings": {"sip": {"enabled": True}}})
    mid = room["sip"]["meeting_id"]
    host = ivr_scenario(tmp_path / "host", [rfc4733(mid + "#"), rfc4733(room["sip"]["mpin"] + "#"),
                                            '  <pause milliseconds="3000"/>', info("*5", "15551110000", 40),
                                            '  <pause milliseconds="3000"/>', info("*9", "15551110000", 50),
                                            '  <pause milliseconds="15000"/>'], caller="15551110000", tail=0)
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(host), "-s", IVR_DID, "-m", "1", timeout=120))
    wait_until(lambda: '"call.room_locked"' in gw.log(), 60, "the moderator's *5 to lock the room")
    late_browser = browsers("late", 660.0)
    late_browser.open(room["links"]["join"], "Late")
    late = ivr_scenario(tmp_path / "late", [rfc4733(mid + "#"), rfc4733(room["sip"]["pin"] + "#")],
                        caller="15552220000", end="gateway", tail=30000)
    r = run_sipp(gw.sip, "-sf", str(late), "-s", IVR_DID, "-m", "1", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:]
    wait_until(lambda: late_browser.gw().get("error") == "room_locked", 10, "the late browser to be refused")
    assert not late_browser.gw()["joined"]
    thread.join(120)
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
    rows = {row["from_number"]: row for row in gw.wait_calls_ended(2)}
    assert rows["15552220000"]["reason"] == "room_locked"
    states = [e["state"] for e in gw.cdr(rows["15551110000"]["voice_id"])["events"]]
    assert "room_locked" in states and "unmute_all" in states


def test_the_moderator_records_the_room_from_the_page(bridge_gateway: Gateway, browsers: Any, tmp_path: Path) -> None:
    """A moderator's page (440 Hz microphone) and a phone (1 kHz) in a room: Record on the page starts Janus's
    recording of the mix, every page shows the Recording badge (screenshots at both sizes), Stop ends it; the file,
    fetched through the Voice API by room_id, holds both the browser and the phone."""
    from tests.integration.test_recordings import demo_client, download, mono
    from tests.integration.test_room_page import fits

    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "taped", "settings": {"sip": {"enabled": True}}})
    host = browsers("host", 440.0)
    host.join(room["links"]["host"], "Host")
    tone = tmp_path / "phone.ul"
    tone.write_bytes(g711.encode("PCMU", (8000 * np.sin(2 * np.pi * 1000 * np.arange(8000 * 40) / 8000)).astype(np.int16)))
    steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
             f'  <nop><action><exec rtp_stream="{tone},-1,0"/></action></nop>', '  <pause milliseconds="20000"/>']
    sf = ivr_scenario(tmp_path, steps, tail=0)
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=120))
    hears(host, 1000, "the page to hear the phone (the mix is flowing)", 40)
    host.click("#record")
    wait_until(lambda: host.driver.execute_script("return !document.getElementById('recbadge').hidden"), 10,
               "the Recording badge")
    assert (host.gw().get("state") or {}).get("recording") is True
    fits(host, "room-recording")
    began = time.monotonic()
    wait_until(lambda: time.monotonic() - began > 4, 10, "four seconds of the room")  # the recording's length
    host.click("#record")
    wait_until(lambda: host.driver.execute_script("return document.getElementById('recbadge').hidden"), 10,
               "the badge gone once stopped")
    client = demo_client(gw)
    meta = wait_until(lambda: (r := client("GET", f"/voice/v1/recordings?room_id={room['room_id']}")[1]["recordings"])
                      and r[0]["state"] == "ready" and r[0], 30, "the room recording ready")
    assert meta["started_by"].startswith("participant:"), meta
    status, data, _ = download(client, meta["url"])
    assert status == 200
    mix, rate = mono(data)
    spectrum, freqs = np.abs(np.fft.rfft(mix)), np.fft.rfftfreq(len(mix), 1 / rate)
    floor = float(np.median(spectrum))
    for hz, who in ((440, "the browser"), (1000, "the phone")):
        assert spectrum[(freqs > hz - 10) & (freqs < hz + 10)].max() > 20 * floor, f"{who} in the room recording"
    thread.join(120)
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
