"""The Voice API end to end: sipp as the trunk and far phone (dial-out), sipp as an inbound caller (bridge and
remove), a webhook receiver in the test, the embedded room service, schemathesis against the OpenAPI document."""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    run_sipp,
    scenario,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.test_bridge import api as rooms_api
from tests.integration.voice_tools import HookServer, VoiceClient, cli, far_phone

ACME_NUMBER = "15550109999"  # the project's number: in (route api) and out (caller ID)
TRUNK_USER, TRUNK_PASSWORD = "gw-user", "gw-secret"
DIAL_FLOW = ["initiated", "ringing", "answered", "joined"]


@dataclass
class Voice:
    gw: Gateway
    hooks: HookServer
    late_hooks: HookServer  # the receiver of project "quiet", started late
    uas_port: int
    acme: dict[str, Any]
    quiet: dict[str, Any]
    demo: dict[str, Any]
    board: dict[str, Any]  # a room of acme
    tmp: Path

    def client(self, project: dict[str, Any]) -> VoiceClient:
        return VoiceClient(self.gw, project["app_id"], project["app_key"])

    def participants(self, room_id: str) -> list[dict[str, Any]]:
        return rooms_api(self.gw, "GET", f"/video/v1/rooms/{room_id}/participants")[1]["participants"]  # type: ignore[no-any-return]

    def dial(self, project: dict[str, Any], room_id: str, to: str = "15551230001") -> str:
        status, body, _ = self.client(project)("POST", f"/voice/v1/room/{room_id}/join",
                                               {"name": "Alice", "owner_ref": "ref-1", "from": ACME_NUMBER, "to": to})
        assert status == 200 and body["state"] == "initiated" and body["room_id"] == room_id, body
        return str(body["voice_id"])


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Voice]:
    tmp = tmp_path_factory.mktemp("voice")
    data = tmp / "data"
    hooks, late = HookServer(free_port()), HookServer(free_port())
    hooks.start()
    acme = cli(data, "projects", "create", "--name", "acme", "--number", ACME_NUMBER, "--notification-url", hooks.url)
    quiet = cli(data, "projects", "create", "--name", "quiet", "--number", ACME_NUMBER, "--outbound-only",
                "--notification-url", late.url)
    board = cli(data, "rooms", "create", "--name", "Board", "--project", "acme")
    uas_port = free_port()
    trunk = f"""
[[trunks]]
name = "carrier"
sources = []
[trunks.outbound]
proxy = "sip:127.0.0.1:{uas_port}"
username = "{TRUNK_USER}"
password = "{TRUNK_PASSWORD}"
"""
    gw = start_gateway(tmp, make_test_config(trunk), env={"GATEWAY_WEBHOOKS_MAX_BACKOFF_S": "2",
                                                          "GATEWAY_API_RING_TIMEOUT_S": "15"})
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 90, "prompts and rooms")
        demo = cli(data, "projects", "reset-key", "demo")  # made from the config: its key is shown on reset only
        yield Voice(gw, hooks, late, uas_port, acme, quiet, demo, board, tmp)
    finally:
        stop_gateway(gw)
        hooks.stop()
        late.stop()


def finish(phone: subprocess.Popen[str]) -> str:
    out, _ = phone.communicate(timeout=30)
    assert phone.returncode == 0, out
    return out


def test_dial_out_joins_the_room_and_delete_hangs_up(voice: Voice) -> None:
    phone = far_phone(voice.uas_port, "-sn", "uas")
    try:
        room_id = voice.board["room_id"]
        vid = voice.dial(voice.acme, room_id)
        voice.hooks.wait_state(vid, "joined")
        assert voice.hooks.states(vid, voice.acme["webhook_secret"]) == DIAL_FLOW
        joined = voice.hooks.events(vid)[-1]
        assert joined["room_id"] == room_id and joined["owner_ref"] == "ref-1" and joined["direction"] == "outbound"
        phones = [p for p in voice.participants(room_id) if p["kind"] == "phone"]
        assert len(phones) == 1 and phones[0]["name"].endswith("0001")
        status, call, _ = voice.client(voice.acme)("GET", f"/voice/v1/calls/{vid}")
        assert status == 200 and call["phase"] == "in_room" and call["direction"] == "outbound"
        status, body, _ = voice.client(voice.acme)("DELETE", f"/voice/v1/room/{room_id}/call/{vid}")
        assert status == 200 and body == {**body, "state": "removed", "voice_id": vid, "room_id": room_id}
        voice.hooks.wait_state(vid, "disconnected")
        assert voice.hooks.states(vid, voice.acme["webhook_secret"]) == DIAL_FLOW + ["removed", "disconnected"]
        finish(phone)
    finally:
        stop_process(phone)
    cdr = voice.gw.cdr(vid)
    ended = cdr["events"][-1]
    assert cdr["reason"] == "removed_by_api" and ended["rtp_received"] > 0 and ended["rtp_sent"] > 0
    assert [p for p in voice.participants(room_id) if p["kind"] == "phone"] == []


def test_dial_out_busy_fails_with_486(voice: Voice) -> None:
    phone = far_phone(voice.uas_port, "-sf", str(scenario(voice.tmp, "uas_busy.xml")))
    try:
        vid = voice.dial(voice.acme, voice.board["room_id"])
        voice.hooks.wait_state(vid, "failed")
        finish(phone)
    finally:
        stop_process(phone)
    events = voice.hooks.events(vid, voice.acme["webhook_secret"])
    assert [e["state"] for e in events] == ["initiated", "failed"]
    assert events[-1]["code"] == 486 and events[-1]["reason"] == "Busy Here"
    assert voice.gw.cdr(vid)["sip_code"] == 486


VERIFYAUTH = f'<verifyauth assign_to="authvalid" username="{TRUNK_USER}" password="{TRUNK_PASSWORD}"/>'
PROXY_AUTH = (f'<ereg regexp="Digest username=.{TRUNK_USER}." search_in="hdr" header="Proxy-Authorization:" '
              'check_it="true" assign_to="authvalid"/>')


def digest_ok(header: str, method: str, password: str) -> bool:
    """RFC 2617 / 3261 digest with qop=auth, computed here independently of gateway.sip.auth."""
    p = dict(re.findall(r'(\w+)="?([^",]*)"?', header.split(" ", 1)[1]))
    md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731
    ha1, ha2 = md5(f"{p['username']}:{p['realm']}:{password}"), md5(f"{method}:{p['uri']}")
    return p["response"] == md5(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:{p['qop']}:{ha2}")


@pytest.mark.parametrize("challenge", [407, 401])
def test_dial_out_through_a_trunk_that_challenges(voice: Voice, challenge: int) -> None:
    subs = {407: {"status": "407 Proxy Authentication Required", "challenge_header": "Proxy-Authenticate",
                  "check": PROXY_AUTH},
            401: {"status": "401 Unauthorized", "challenge_header": "WWW-Authenticate", "check": VERIFYAUTH}}[challenge]
    uas = scenario(voice.tmp, "uas_auth.xml", **subs)
    messages = voice.tmp / f"uas-{challenge}-messages.log"
    phone = far_phone(voice.uas_port, "-sf", str(uas), "-trace_msg", "-message_file", str(messages))
    try:
        room_id = voice.board["room_id"]
        vid = voice.dial(voice.acme, room_id)
        voice.hooks.wait_state(vid, "joined")
        assert voice.hooks.states(vid) == DIAL_FLOW
        assert voice.client(voice.acme)("DELETE", f"/voice/v1/room/{room_id}/call/{vid}")[0] == 200
        finish(phone)
    finally:
        stop_process(phone)
    states = [e["state"] for e in voice.gw.cdr(vid)["events"]]
    assert "auth_challenged" in states and states.index("auth_challenged") < states.index("answered")
    header = "Proxy-Authorization" if challenge == 407 else "Authorization"
    answers = re.findall(rf"^{header}: (.*)$", messages.read_text(), re.MULTILINE)
    assert answers and all(digest_ok(a.strip(), "INVITE", TRUNK_PASSWORD) for a in answers)
    assert TRUNK_PASSWORD not in voice.gw.log()


def caller_audio(tmp: Path) -> Path:
    t = np.arange(8000 * 2) / 8000
    path = tmp / "caller.ul"
    path.write_bytes(g711.encode("PCMU", (6000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)))
    return path


def test_inbound_call_bridged_into_a_new_room_parked_moved_and_removed(voice: Voice) -> None:
    client = voice.client(voice.acme)
    sc = scenario(voice.tmp, "caller_waits.xml", audio=str(caller_audio(voice.tmp)))
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(r=run_sipp(voice.gw.sip, "-sf", str(sc), "-s", ACME_NUMBER,
                                                                      "-m", "1", timeout=90)), daemon=True)
    caller.start()
    incoming = voice.hooks.first("incoming")
    vid = incoming["voice_id"]
    assert incoming["to"] == ACME_NUMBER and incoming["direction"] == "inbound"
    status, body, _ = client("PUT", f"/voice/v1/room/new/call/{vid}/join")
    assert status == 200 and body["state"] == "joined", body
    new_room = body["room_id"]
    assert new_room != "new" and len(voice.participants(new_room)) == 1
    # a second PUT into the same room is refused; another project cannot see the call
    assert client("PUT", f"/voice/v1/room/{new_room}/call/{vid}/join")[0] == 409
    assert voice.client(voice.demo)("PUT", f"/voice/v1/room/new/call/{vid}/join")[0] == 404
    status, body, _ = client("DELETE", f"/voice/v1/room/{new_room}/call/{vid}?park=true")
    assert status == 200 and body["state"] == "removed"
    assert client("GET", f"/voice/v1/calls/{vid}")[1]["phase"] == "parked"
    assert voice.participants(new_room) == []
    board = voice.board["room_id"]
    assert client("PUT", f"/voice/v1/room/{board}/call/{vid}/join")[1]["state"] == "joined"
    assert len([p for p in voice.participants(board) if p["kind"] == "phone"]) == 1
    assert client("DELETE", f"/voice/v1/room/{board}/call/{vid}")[0] == 200
    caller.join(90)
    assert result["r"].returncode == 0, result["r"].stdout
    voice.hooks.wait_state(vid, "disconnected")
    assert voice.hooks.states(vid, voice.acme["webhook_secret"]) == [
        "incoming", "answered", "joined", "removed", "joined", "removed", "disconnected"]
    # too late to bridge: the call has ended (say so, with why), which is not the same as a call that never was
    status, body, _ = client("PUT", f"/voice/v1/room/{board}/call/{vid}/join")
    assert status == 409 and body["error"]["code"] == "call_ended" and "removed_by_api" in body["error"]["message"], body
    status, body, _ = voice.client(voice.demo)("PUT", f"/voice/v1/room/{board}/call/{vid}/join")
    assert status == 404, body  # another project's call stays unknown to it


def test_ivr_caller_taken_out_of_the_prompts_into_a_room(voice: Voice) -> None:
    client = voice.client(voice.demo)
    room = cli(voice.gw.data_dir, "rooms", "create", "--name", "Demo room")
    sc = scenario(voice.tmp, "caller_waits.xml", audio=str(caller_audio(voice.tmp)))
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(r=run_sipp(voice.gw.sip, "-sf", str(sc), "-s", "15550100000",
                                                                      "-m", "1", timeout=90)), daemon=True)
    caller.start()

    def live() -> str | None:
        calls = client("GET", "/voice/v1/calls?active=true")[1]["calls"]
        return next((c["voice_id"] for c in calls if c["state"] == "answered"), None)

    vid = wait_until(live, 20, "the IVR call")
    assert client("GET", f"/voice/v1/calls/{vid}")[1]["phase"] == "ivr"
    status, body, _ = client("PUT", f"/voice/v1/room/{room['room_id']}/call/{vid}/join")
    assert status == 200 and body["state"] == "joined", body
    assert client("DELETE", f"/voice/v1/room/{room['room_id']}/call/{vid}")[0] == 200
    caller.join(90)
    assert result["r"].returncode == 0
    states = [e["state"] for e in voice.gw.cdr(vid)["events"]]
    assert "joined" in states and "validated" not in states and voice.gw.cdr(vid)["reason"] == "removed_by_api"


def test_api_auth_and_errors(voice: Voice) -> None:
    client = voice.client(voice.acme)
    room = voice.board["room_id"]
    for creds in (None, f"{voice.acme['app_id']}:wrong", "nobody:x"):
        status, body, headers = client("GET", "/voice/v1/calls", auth=creds)
        assert status == 401 and body["error"]["code"] == "unauthorized" and "Basic" in headers["WWW-Authenticate"]
    assert voice.gw.http_get("/healthz")[0] == 200  # health needs no credentials
    status, body, _ = client("POST", f"/voice/v1/room/{room}/join", {"to": "15551230001"})
    assert status == 400 and body["error"]["field"] == "from"
    status, body, _ = client("POST", f"/voice/v1/room/{room}/join", {"from": "15550000000", "to": "15551230001"})
    assert status == 400 and body["error"]["field"] == "from"  # not one of the project's numbers
    status, body, _ = client("POST", f"/voice/v1/room/{room}/join", {"from": ACME_NUMBER, "to": "call me"})
    assert status == 400 and body["error"]["field"] == "to"
    status, body, _ = voice.client(voice.quiet)("POST", f"/voice/v1/room/{room}/join",
                                                {"from": ACME_NUMBER, "to": "15551230001"})
    assert status == 404 and body["error"]["field"] == "room_id"  # another project's room
    assert client("PUT", f"/voice/v1/room/{room}/call/nope/join")[0] == 404
    assert client("DELETE", f"/voice/v1/room/{room}/call/nope")[0] == 404
    assert client("GET", "/voice/v1/calls?limit=0")[1]["error"]["field"] == "limit"
    status, body, _ = client("GET", "/voice/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, doc, _ = client("GET", "/voice/v1/openapi.json")
    assert status == 200 and "/voice/v1/room/{room_id}/join" in doc["paths"]


def test_webhooks_survive_a_receiver_down_for_30_seconds(voice: Voice) -> None:
    phone = far_phone(voice.uas_port, "-sn", "uas")
    try:
        room = cli(voice.gw.data_dir, "rooms", "create", "--name", "Quiet room", "--project", "quiet")
        vid = voice.dial(voice.quiet, room["room_id"])
        client = voice.client(voice.quiet)
        wait_until(lambda: client("GET", f"/voice/v1/calls/{vid}")[1].get("phase") == "in_room", 20, "in the room")
        assert client("DELETE", f"/voice/v1/room/{room['room_id']}/call/{vid}")[0] == 200
        finish(phone)
    finally:
        stop_process(phone)
    down_since = time.monotonic()
    wait_until(lambda: '"webhook.retry"' in voice.gw.log(), 10, "a failed delivery")
    assert voice.late_hooks.received == []
    time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))  # the scenario itself: 30 s with no receiver
    voice.late_hooks.start()
    wait_until(lambda: "disconnected" in voice.late_hooks.states(vid), 20, "every event after the receiver is up")
    assert voice.late_hooks.states(vid, voice.quiet["webhook_secret"]) == DIAL_FLOW + ["removed", "disconnected"]


@pytest.mark.serial  # Chromium
def test_moderator_calls_a_phone_from_the_room_page(voice: Voice) -> None:
    from tests.integration.browser import Browser, tone_wav

    room = voice.board
    links = rooms_api(voice.gw, "GET", f"/video/v1/rooms/{room['room_id']}")[1]["links"]
    phone = far_phone(voice.uas_port, "-sn", "uas")
    browser = Browser(voice.tmp, tone_wav(voice.tmp / "mic.wav", 440.0, seconds=20))
    try:
        browser.join(links["host"], "Host")
        assert browser.gw()["role"] == "moderator"
        browser.click("#peoplebtn")  # the panel: people, the host's controls
        browser.driver.find_element("id", "dialto").send_keys("15551230042")
        browser.driver.find_element("id", "dialbtn").click()
        dial = wait_until(lambda: browser.gw().get("dial"), 15, "the page's dial answer")
        assert dial["status"] == 200 and dial["state"] == "initiated", dial
        wait_until(lambda: any(p["kind"] == "phone" for p in browser.participants()), 30, "the phone on the page")
        assert any(p["kind"] == "phone" and "0042" in p["text"] for p in browser.listed())
        assert voice.hooks.wait_state(dial["voice_id"], "joined")[-1] == "joined"
        # the host follows the call: answered, then in the room (ringing too, when it lasts a poll or more)
        wait_until(lambda: "in the room" in browser.gw()["dialProgress"], 15, "the call's progress on the page")
        assert "15551230042: in the room" in browser.text("dialstatus")
        progress = browser.gw()["dialProgress"]
        assert progress.index("in the room") == len(progress) - 1 and set(progress) <= {"calling", "ringing", "answered",
                                                                                          "in the room"}, progress
        vid = dial["voice_id"]
        assert voice.client(voice.acme)("DELETE", f"/voice/v1/room/{room['room_id']}/call/{vid}")[0] == 200
        wait_until(lambda: browser.gw()["dialProgress"][-1] == "ended", 15, "the call's end on the page")
        assert "15551230042: ended" in browser.text("dialstatus")
        finish(phone)
    finally:
        browser.close()
        stop_process(phone)
    # a participant link (no host token) cannot call out
    status, body = rooms_api(voice.gw, "POST", f"/rooms/{room['room_id']}/dial", {"to": "15551230042", "host": "x"})
    assert status == 403 and body["error"]["code"] == "not_moderator"
    # and a host link cannot be turned into a dialler: 10 calls per minute per room (1 placed above)
    host = links["host"].split("host=")[1]
    answers = [rooms_api(voice.gw, "POST", f"/rooms/{room['room_id']}/dial", {"to": "not a number", "host": host})
               for _ in range(10)]
    assert [a[0] for a in answers] == [400] * 9 + [429], answers
    assert answers[0][1]["error"]["field"] == "to" and answers[-1][1]["error"]["code"] == "too_many_calls"
