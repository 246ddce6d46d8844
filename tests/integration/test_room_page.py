"""The room page as people use it: headless Chromium with fake devices, a phone (sipp through the IVR), `gateway run`
with its Janus, in a network namespace of the test's own (tests/integration/netns.py). Screenshots of each state
go to build/screenshots/ (GATEWAY_SCREENSHOTS), named after it; the README shows two of them."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from tests.conftest import Gateway, run_sipp, wait_until
from tests.integration.browser import Browser
from tests.integration.chaos_tools import children
from tests.integration.ivr_tools import ivr_scenario, rfc4733
from tests.integration.test_bridge import IVR_DID, api, hears, pid, run_in_thread, silent

pytestmark = [pytest.mark.timeout(240), pytest.mark.serial]  # Chromium and WebRTC: alone, after the parallel pass


@pytest.fixture
def bridge_https() -> bool:
    return True  # as people use the page off localhost: over HTTPS (browsers give the camera to secure pages only)
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
MARKUP = "<b>Cat</b><img src=x>"


def tone_then_silence(path: Path, seconds: float = 3.0) -> Path:
    """A caller's audio, looped by sipp: `seconds` of a 1 kHz tone, then as long of silence (G.711 u-law)."""
    n = int(8000 * seconds)
    tone = (8000 * np.sin(2 * np.pi * 1000 * np.arange(n) / 8000)).astype(np.int16)
    path.write_bytes(g711.encode("PCMU", np.concatenate([tone, np.zeros(n, np.int16)])))
    return path


def grid_is(b: Browser, names: set[str], timeout: float = 30) -> list[dict[str, Any]]:
    """`b`'s grid shows exactly these names, its own marked "(you)"."""
    def shown() -> list[dict[str, Any]] | None:
        tiles = b.tiles()
        return tiles if sorted(t["label"] for t in tiles) == sorted(names) else None
    return wait_until(shown, timeout, f"the grid {sorted(names)}")  # type: ignore[no-any-return]


def decoding(b: Browser, others: dict[str, str], timeout: float = 30) -> None:
    """`b` shows the cameras of `others` (participant id -> name) on their tiles and decodes frames of each."""
    wait_until(lambda: b.camera_tiles() == others, timeout, f"camera tiles {sorted(others.values())}")
    first = wait_until(lambda: (f := b.frames_decoded()).keys() == others.keys() and all(f.values()) and f, timeout,
                       "frames decoded from every camera")
    wait_until(lambda: all(n > first[k] for k, n in b.frames_decoded().items()), 10, "more frames from each")


def fits(b: Browser, name: str) -> None:
    """At each size: no sideways scroll, every visible control on screen; a screenshot of each."""
    for size, (w, h) in SIZES.items():
        b.viewport(w, h)
        try:  # the page lays itself out again on resize
            wait_until(lambda: not b.layout_problems(), 3, "the layout to fit")
        except AssertionError:
            raise AssertionError((name, size, b.layout_problems())) from None
        b.screenshot(f"{name}-{size}")
    b.viewport(*SIZES["desktop"])


def ended(b: Browser, closed: str, title: str) -> None:
    """`b` shows the end screen `title`, and released its camera and microphone."""
    wait_until(lambda: b.gw().get("closed") == closed and b.gw().get("screen") == "ended", 15, f"the {closed} screen")
    assert title in b.text("endtitle"), b.text("endtitle")
    wait_until(lambda: b.tracks() and all(s == "ended" for s in b.tracks()), 5, "tracks stopped")
    assert b.driver.execute_script("return Object.keys(window.gwMedia.pcs).length") == 0  # connections closed


def test_a_phone_and_three_browsers_on_every_grid(bridge_gateway: Gateway, browsers: Any, tmp_path: Path) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "Design review", "settings": {"sip": {"enabled": True}}})
    assert room["links"]["join"].startswith("https://")  # the page over HTTPS (a pinned self-signed certificate)
    ann, bob, cat = browsers("ann", 440.0), browsers("bob", 660.0), browsers("cat", 880.0)
    ann.join(room["links"]["host"], "Ann")
    bob.join(room["links"]["join"], "Bob")
    hears(ann, 660, "Ann to hear Bob")  # the AudioBridge's mix, without one's own voice
    hears(bob, 440, "Bob to hear Ann")
    cat.join(room["links"]["join"], MARKUP)

    steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
             f'  <nop><action><exec rtp_stream="{tone_then_silence(tmp_path / "caller.ul")},-1,0"/></action></nop>',
             '  <pause milliseconds="60000"/>']
    sf = ivr_scenario(tmp_path, steps, tail=0)
    thread, _ = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=120))
    ids = {pid(ann): "Ann", pid(bob): "Bob", pid(cat): MARKUP}
    phone = wait_until(lambda: [p for p in ann.participants() if p["kind"] == "phone"], 60, "the phone in the room")[0]
    assert phone["name"].endswith("0000") and "1555123" not in phone["name"], "the caller's number masked"
    for b in (ann, bob, cat):  # four tiles, the right names; every other browser's camera decoding
        names = {n + (" (you)" if i == pid(b) else "") for i, n in ids.items()} | {phone["name"]}
        tiles = {t["id"]: t for t in grid_is(b, names)}
        assert tiles[phone["id"]]["kind"] == "phone" and tiles[phone["id"]]["phone_mark"]
        assert not tiles[phone["id"]]["video"]  # an avatar
        decoding(b, {i: n for i, n in ids.items() if i != pid(b)})
    # a camera turned off: its light off (the track stopped), the others see the avatar; on again: frames again
    ann.click("#camera")
    wait_until(lambda: [t["video"] for t in bob.tiles() if t["id"] == pid(ann)] == [False], 10, "Ann's avatar")
    assert ann.driver.execute_script("return window.gwMedia.local.getVideoTracks().length") == 0
    before = bob.frames_decoded()[pid(ann)]
    ann.click("#camera")
    wait_until(lambda: bob.camera_tiles().get(pid(ann)) == "Ann", 15, "Ann's camera back on Bob's grid")
    wait_until(lambda: bob.frames_decoded()[pid(ann)] > before + 10, 15, "frames of Ann's new camera track")
    for b in (ann, bob, cat):  # markup in a name is text
        assert b.driver.execute_script("return document.querySelectorAll('#grid b, #grid img, #people b, #people img').length") == 0
    # the phone's tile says when it speaks: its tone, then its silence
    speaking = lambda on: wait_until(  # noqa: E731
        lambda: any(t["id"] == phone["id"] and t["speaking"] is on for t in ann.tiles()), 15, f"the phone speaking={on}")
    speaking(True)
    speaking(False)
    speaking(True)
    ann.viewport(*SIZES["desktop"])
    ann.screenshot("room-grid")
    ann.click("#peoplebtn")
    fits(ann, "room-host")  # the host's panel open: people, controls, call a phone, dial-in details
    fits(bob, "room-participant")
    dial_in = ann.text("dialin")
    assert room["sip"]["meeting_id"] in dial_in and room["sip"]["mpin"] in dial_in and f"+{IVR_DID}" in dial_in
    assert room["sip"]["pin"] in bob.text("dialin") and room["sip"]["mpin"] not in bob.text("dialin")
    assert ann.driver.title.startswith("Design review") and ann.text("title") == "Design review"

    secrets = json.loads((gw.data_dir / "janus" / "secrets.json").read_text()).values()
    for b in (ann, bob, cat):  # Janus' secrets reach neither the pages nor the logs
        seen = json.dumps([b.gw(), b.driver.execute_script("return window.gwMedia.streams")]) + b.driver.page_source
        assert not any(secret in seen for secret in secrets)
    assert not any(secret in gw.log() for secret in secrets)

    gone = pid(bob)
    bob.click("#leave")
    left = time.monotonic()
    for b in (ann, cat):  # the leaving browser's tile goes (no frozen frame) within 2 s
        wait_until(lambda b=b: gone not in [t["id"] for t in b.tiles()], 5, "Bob's tile to go")
    took = time.monotonic() - left
    assert took < 2.0, f"Bob's tile went after {took:.1f} s"
    ended(bob, "left", "You left")
    bob.screenshot("ended-left")

    # many in the room (five more, by their WebSockets alone: avatars): the speaker view, still on screen at both sizes
    import websocket  # websocket-client (Selenium's), from this thread: in the namespace
    base = f"wss://127.0.0.1:{gw.rooms_port}/rooms/{room['room_id']}/ws"
    crowd = [websocket.create_connection(base, timeout=10, sslopt={"context": gw.tls}) for _ in range(5)]
    try:
        for i, ws in enumerate(crowd):
            ws.send(json.dumps({"type": "join", "kind": "browser", "name": f"Guest {i + 1}"}))
        wait_until(lambda: len(ann.tiles()) == 8, 15, "eight tiles")
        assert ann.driver.execute_script("return document.getElementById('grid').classList.contains('speaker')")
        ann.click("#peoplebtn")  # the panel closed: the grid alone
        fits(ann, "room-many")
    finally:
        for ws in crowd:
            ws.close()
    thread.join(1)


def test_joining_without_devices_moderation_notices_the_start_page_and_end_screens(bridge_gateway: Gateway,
                                                                                   browsers: Any) -> None:
    gw = bridge_gateway
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "Ends", "settings": {"sip": {"enabled": True}}})
    host, quiet, voice = browsers("host", 440.0), browsers("quiet", 660.0), browsers("voice", 880.0)
    host.driver.get(room["links"]["join"].split("/rooms/")[0] + "/")  # the start page
    assert host.driver.execute_script("return document.querySelector('link[rel=icon]').href").endswith("favicon.svg")
    fits(host, "start")
    host.driver.find_element("id", "meeting").send_keys(room["sip"]["meeting_id"])
    host.driver.find_element("id", "pin").send_keys(str((int(room["sip"]["pin"]) + 1) % 10))
    host.click("#bymeeting button")
    wait_until(lambda: "no meeting" in host.text("startmsg"), 10, "a wrong PIN refused")
    # the pre-join screen: a preview, devices to choose, the microphone's level, a name
    host.driver.get(room["links"]["host"])
    wait_until(lambda: host.driver.execute_script(
        "const v = document.getElementById('preview'); return v.videoWidth > 0 && "
        "document.getElementById('camsel').options.length > 0 && document.getElementById('micsel').options.length > 0"),
        15, "the preview with the camera and the devices listed")
    wait_until(lambda: host.driver.execute_script("return parseFloat(document.getElementById('level').style.width) > 0"),
               10, "the level meter moving with the microphone")
    fits(host, "prejoin")
    host.driver.find_element("id", "name").send_keys("Hosta")
    host.click("#joinbtn")
    wait_until(lambda: host.gw().get("joined"), 30, "the host to join from the pre-join screen")
    assert host.gw()["role"] == "moderator"

    quiet.deny_all()  # permission denied for both: listen-only, and told so
    quiet.join(room["links"]["join"], "Quiet")
    assert not quiet.gw()["camera"] and not quiet.gw()["mic"]
    assert "listen-only" in (quiet.gw().get("notice") or ""), quiet.gw()
    voice.deny_camera()  # no camera: audio only
    voice.join(room["links"]["join"], "Voice")
    hears(quiet, 440, "the listen-only browser to hear the host")
    hears(host, 880, "the host to hear the camera-less browser")
    tiles = {t["label"]: t for t in grid_is(host, {"Hosta (you)", "Quiet", "Voice"})}
    assert not tiles["Quiet"]["video"] and not tiles["Voice"]["video"] and tiles["Quiet"]["muted"]
    decoding(voice, {pid(host): "Hosta"})  # the camera-less still see the host

    vid = pid(voice)  # a moderator's mute: the muted one is told, and cannot undo it
    host.click(f'#people li[data-id="{vid}"] .actions button')
    wait_until(lambda: voice.gw().get("notice") == "A moderator muted you", 10, "the notice")
    voice.screenshot("notice-muted")
    silent(host, "the muted browser's tone to stop reaching the host")
    voice.click("#muteme")
    wait_until(lambda: voice.gw()["error"] == "not_allowed", 10, "its own unmute refused")
    assert [p["muted"] for p in voice.participants() if p["id"] == vid] == [True]
    host.click("#unmuteall")
    hears(host, 880, "the browser heard again after unmute all")

    host.click("#lock")  # locked out: its own screen, the camera and microphone released
    wait_until(lambda: (host.gw()["state"] or {}).get("locked"), 10, "the room locked")
    late = browsers("late", 330.0)  # who comes by the start page: the meeting ID and PIN, then the pre-join screen
    late.driver.get(room["links"]["join"].split("/rooms/")[0] + "/")
    late.driver.find_element("id", "meeting").send_keys(room["sip"]["meeting_id"])
    late.driver.find_element("id", "pin").send_keys(room["sip"]["pin"])
    late.click("#bymeeting button")
    wait_until(lambda: late.driver.current_url.endswith(f"/rooms/{room['room_id']}"), 10, "the room's page")
    wait_until(lambda: late.text("title") == "Ends", 10, "the room's name")
    late.click("#joinbtn")
    ended(late, "room_locked", "locked")
    assert not late.gw()["joined"]
    late.screenshot("ended-locked")
    host.click("#lock")

    host.click(f'#people li[data-id="{vid}"] .actions button:last-child')  # removed
    ended(voice, "removed", "removed")
    voice.screenshot("ended-removed")

    # connection lost: the room service dies (`gateway run` starts it again); the page offers to rejoin
    (rooms_pid,) = children(gw.proc.pid, "rooms serve")
    os.kill(rooms_pid, signal.SIGKILL)
    ended(host, "disconnected", "Connection lost")
    host.screenshot("ended-connection-lost")
    wait_until(lambda: children(gw.proc.pid, "rooms serve") not in ([], [rooms_pid]), 30, "the room service back")
    def answering() -> bool:
        try:
            return api(gw, "GET", f"/video/v1/rooms/{room['room_id']}")[0] == 200
        except OSError:  # not listening yet
            return False
    wait_until(answering, 30, "the room service answering")
    host.click("#rejoin")
    wait_until(lambda: host.gw().get("joined"), 30, "the host back in the room")
    assert host.gw()["role"] == "moderator"

    assert api(gw, "DELETE", f"/video/v1/rooms/{room['room_id']}")[0] == 200  # the room closed
    ended(host, "room_closed", "ended")
    host.screenshot("ended-room-closed")
