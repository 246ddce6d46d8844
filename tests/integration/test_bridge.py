"""Rooms on Janus, end to end: Chromium on the room page, sipp as the phone, `gateway run` (the worker, its
Janus, the room service in its own process). WebRTC needs a non-loopback interface: every test runs inside a
network namespace of its own (tests/integration/netns.py), and so does everything it starts."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import Gateway, free_port, make_test_config, run_sipp, start_gateway, stop_gateway, wait_until
from tests.integration.browser import Browser, tone_wav
from tests.integration.ivr_tools import info, ivr_scenario, rfc4733
from tests.integration.media_tools import Capture
from tests.integration.netns import network_namespace

pytestmark = [pytest.mark.timeout(180), pytest.mark.serial]  # Chromium and WebRTC: alone, after the parallel pass
IVR_DID = "15550100000"
JANUS_RTP = (61000, 61999)  # outside free_port()'s range, the gateway's RTP ports and the ephemeral ports


def api(gw: Gateway, method: str, path: str, body: Any = None, auth: bool = True) -> tuple[int, Any]:
    key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
    req = urllib.request.Request(f"http://127.0.0.1:{gw.rooms_port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"demo:{key}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def bridge_gateway(tmp_path: Path) -> Iterator[Gateway]:
    with network_namespace():
        env = {"GATEWAY_JANUS_HTTP_PORT": str(free_port()), "GATEWAY_JANUS_WS_PORT": str(free_port()),
               "GATEWAY_JANUS_RTP_PORT_MIN": str(JANUS_RTP[0]), "GATEWAY_JANUS_RTP_PORT_MAX": str(JANUS_RTP[1])}
        gw = start_gateway(tmp_path, make_test_config(), env)
        try:
            wait_until(lambda: all(f'"{e}"' in gw.log() for e in ("prompts.ready", "rooms.started", "janus.started")),
                       60, "prompts, the room service and Janus")
            yield gw
        finally:
            stop_gateway(gw)


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[Any]:
    """browsers(name, freq): a Chromium whose microphone plays a tone; all of them closed at the end."""
    opened: list[Browser] = []

    def make(name: str, freq: float) -> Browser:
        b = Browser(tmp_path / name, tone_wav(tmp_path / f"{name}.wav", freq))
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()


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


def sees(b: Browser, others: dict[str, str], timeout: float = 30) -> None:
    """`b` shows a tile per other browser (participant id -> name) and decodes frames of each, still growing."""
    wait_until(lambda: sorted((t["id"], t["label"]) for t in b.tiles()) == sorted(others.items()), timeout,
               f"tiles {sorted(others.values())}")
    first = wait_until(lambda: (f := b.frames_decoded()).keys() == others.keys() and all(f.values()) and f, timeout,
                       "frames decoded from every other browser")
    wait_until(lambda: all(n > first[k] for k, n in b.frames_decoded().items()), 10, "more frames from each")


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


def test_three_browsers_see_and_hear_each_other(bridge_gateway: Gateway, browsers: Any) -> None:
    _, room = api(bridge_gateway, "POST", "/video/v1/rooms", {"name": "video"})
    ann, bob, cat = browsers("ann", 440.0), browsers("bob", 660.0), browsers("cat", 880.0)
    ann.join(room["links"]["join"], "Ann")
    bob.join(room["links"]["join"], "Bob")
    hears(ann, 660, "Ann to hear Bob")  # the AudioBridge's mix, without one's own voice
    hears(bob, 440, "Bob to hear Ann")
    cat.join(room["links"]["join"], "Cat")
    names = {pid(ann): "Ann", pid(bob): "Bob", pid(cat): "Cat"}
    for b in (ann, bob, cat):  # each decodes every other's camera, labelled with its name
        sees(b, {k: v for k, v in names.items() if k != pid(b)})
    wait_until(lambda: len(api(bridge_gateway, "GET", f"/video/v1/rooms/{room['room_id']}/participants")[1]["participants"]) == 3,
               5, "three participants in the API")
    talking = wait_until(lambda: [p for p in ann.participants() if p["talking"]], 10, "talking events from Janus")
    assert {p["kind"] for p in talking} == {"browser"}
    secrets = json.loads((bridge_gateway.data_dir / "janus" / "secrets.json").read_text()).values()
    for b in (ann, bob, cat):  # Janus' secrets reach neither the pages nor the logs
        seen = json.dumps([b.gw(), b.driver.execute_script("return window.gwMedia.streams")]) + b.driver.page_source
        assert not any(secret in seen for secret in secrets)
    assert not any(secret in bridge_gateway.log() for secret in secrets)

    gone = pid(cat)
    cat.driver.get("about:blank")  # Cat leaves: its tile goes away in the others' pages
    for b in (ann, bob):
        wait_until(lambda b=b: gone not in [t["id"] for t in b.tiles()], 15, "the leaving browser's tile to go")
        sees(b, {k: v for k, v in names.items() if k not in (pid(b), gone)})


def test_audio_only_browser(bridge_gateway: Gateway, browsers: Any) -> None:
    _, room = api(bridge_gateway, "POST", "/video/v1/rooms", {"name": "no camera"})
    ann, bob = browsers("ann", 440.0), browsers("bob", 660.0)
    bob.deny_camera()
    ann.join(room["links"]["join"], "Ann")
    bob.join(room["links"]["join"], "Bob")
    assert bob.gw()["camera"] is False and ann.gw()["camera"] is True
    hears(ann, 660, "Ann to hear Bob (no camera)")
    hears(bob, 440, "Bob to hear Ann")
    sees(bob, {pid(ann): "Ann"})  # Bob still sees Ann
    assert ann.tiles() == []  # and Ann has no tile for a camera that does not exist


def test_moderator_mute_holds_and_lock_refuses_a_browser(bridge_gateway: Gateway, browsers: Any) -> None:
    _, room = api(bridge_gateway, "POST", "/video/v1/rooms", {"name": "moderated"})
    host, guest, late = browsers("host", 440.0), browsers("guest", 660.0), browsers("late", 880.0)
    host.join(room["links"]["host"], "Host")
    guest.join(room["links"]["join"], "Guest")
    assert host.gw()["role"] == "moderator" and guest.gw()["role"] == "participant"
    hears(host, 660, "the host to hear the guest")
    gid = pid(guest)
    host.driver.execute_script(f"document.querySelector('#people li[data-id=\"{gid}\"] button').click()")  # Mute
    for b in (host, guest):
        wait_until(lambda b=b: any(li["muted"] == "true" for li in b.listed() if li["kind"] == "browser"
                                   and "Guest" in li["text"]), 10, "the guest shown muted")
    silent(host, "the guest's tone to stop reaching the host")
    guest.driver.find_element("id", "muteme").click()  # "Unmute me": refused, a moderator muted it
    wait_until(lambda: guest.gw()["error"] == "not_allowed", 10, "the guest's unmute to be refused")
    assert [p["muted"] for p in guest.participants() if p["id"] == gid] == [True]
    silent(host, "the guest still silent")
    host.driver.find_element("id", "unmuteall").click()
    hears(host, 660, "the guest heard again after unmute all")

    host.driver.find_element("id", "lock").click()
    wait_until(lambda: (guest.gw()["state"] or {}).get("locked"), 10, "the room locked")
    late.open(room["links"]["join"], "Late")
    wait_until(lambda: late.gw().get("error") == "room_locked", 20, "the late browser to be refused")
    assert not late.gw()["joined"] and len(host.participants()) == 2

    host.driver.execute_script(f"document.querySelector('#people li[data-id=\"{gid}\"] button:last-child').click()")
    wait_until(lambda: guest.gw()["closed"] == "removed", 10, "the guest to be removed")
    wait_until(lambda: len(host.participants()) == 1, 10, "the host alone")


def test_deleting_the_room_closes_the_page(bridge_gateway: Gateway, browsers: Any) -> None:
    _, room = api(bridge_gateway, "POST", "/video/v1/rooms", {"name": "doomed"})
    b = browsers("ann", 440.0)
    b.join(room["links"]["join"], "Ann")
    assert api(bridge_gateway, "DELETE", f"/video/v1/rooms/{room['room_id']}")[0] == 200
    wait_until(lambda: b.gw()["closed"] == "room_closed", 10, "the page to be told the room closed")
    assert "closed" in b.driver.find_element("id", "status").text


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
