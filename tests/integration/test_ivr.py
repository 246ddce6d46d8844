"""The dial-in IVR with real callers on loopback: sipp (RFC 4733, SIP INFO, in-band tones) and baresip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, Gateway, make_test_config, run_sipp, start_gateway, stop_gateway, wait_until
from tests.integration.ivr_tools import inband, info, ivr_scenario, rfc4733

IVR_DID = "15550100000"


def create_room(gw: Gateway, meeting_id: str | None = None) -> dict:  # type: ignore[type-arg]
    args = [sys.executable, "-m", "gateway", "rooms", "create", "--json", "--name", "test",
            "--data-dir", str(gw.data_dir)]
    if meeting_id:
        args += ["--meeting-id", meeting_id]
    return json.loads(subprocess.run(args, capture_output=True, timeout=30, cwd=ROOT, check=True).stdout)


def events(gw: Gateway, count: int = 1) -> list[dict]:  # type: ignore[type-arg]
    row = gw.wait_calls_ended(count, timeout=30)[0]
    return gw.cdr(row["voice_id"])["events"]


def validated(evs: list[dict]) -> dict:  # type: ignore[type-arg]
    found = [e for e in evs if e["state"] == "validated"]
    assert found, [e["state"] for e in evs]
    return found[0]


@pytest.fixture
def ivr_gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, make_test_config())
    wait_until(lambda: '"prompts.ready"' in gw.log(), 60, "prompts rendered")
    yield gw
    stop_gateway(gw)


@pytest.mark.parametrize("role", ["participant", "moderator"])
def test_rfc4733_meeting_id_and_pin(ivr_gateway: Gateway, tmp_path: Path, role: str) -> None:
    room = create_room(ivr_gateway)
    pin = room["sip"]["pin" if role == "participant" else "mpin"]
    sf = ivr_scenario(tmp_path, [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(pin + "#")])
    r = run_sipp(ivr_gateway.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    v = validated(events(ivr_gateway))
    assert v["room_id"] == room["room_id"] and v["role"] == role
    assert pin not in ivr_gateway.log(), "a PIN must never reach the logs"


def test_sip_info_digits(ivr_gateway: Gateway, tmp_path: Path) -> None:
    room = create_room(ivr_gateway)
    sf = ivr_scenario(tmp_path, [info(room["sip"]["meeting_id"] + "#", "15551230000", 2),
                                 '  <pause milliseconds="500"/>', info(room["sip"]["pin"] + "#", "15551230000", 30)])
    r = run_sipp(ivr_gateway.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    evs = events(ivr_gateway)
    assert validated(evs)["role"] == "participant"
    end = next(e for e in evs if e["state"] == "disconnected")
    assert end["dtmf"]["info"] >= 16 and end["dtmf"]["rfc4733"] == 0  # digits by source in the CDR


def test_inband_tones_only(ivr_gateway: Gateway, tmp_path: Path) -> None:
    room = create_room(ivr_gateway)
    steps = [inband(tmp_path / "mid.ul", room["sip"]["meeting_id"] + "#"), inband(tmp_path / "pin.ul", room["sip"]["mpin"] + "#")]
    r = run_sipp(ivr_gateway.sip, "-sf", str(ivr_scenario(tmp_path, steps)), "-s", IVR_DID, "-m", "1", timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    assert validated(events(ivr_gateway))["role"] == "moderator"


def test_wrong_pin_three_times_ends_with_bye(ivr_gateway: Gateway, tmp_path: Path) -> None:
    room = create_room(ivr_gateway)
    wrong = "000000" if room["sip"]["pin"] != "000000" and room["sip"]["mpin"] != "000000" else "111111"
    steps = [rfc4733(room["sip"]["meeting_id"] + "#")] + [rfc4733(wrong + "#")] * 3
    sf = ivr_scenario(tmp_path, steps, end="gateway", tail=20000)
    r = run_sipp(ivr_gateway.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    evs = events(ivr_gateway)
    assert [e["attempt"] for e in evs if e["state"] == "pin_invalid"] == [1, 2, 3]
    assert evs[-1]["reason"] == "too_many_pin_attempts" and evs[-1]["by"] == "gateway"


def test_directory_down_service_unavailable_then_bye(tmp_path: Path) -> None:
    from tests.conftest import free_port

    dead = free_port()  # nothing listens there
    cfg = make_test_config().replace('kind = "embedded"', 'kind = "http"').replace(
        '\nurl = ""', f'\nurl = "http://127.0.0.1:{dead}/directory"', 1).replace("timeout_ms = 3000", "timeout_ms = 1000")
    gw = start_gateway(tmp_path, cfg)
    try:
        sf = ivr_scenario(tmp_path, [rfc4733("123456789#")], end="gateway", tail=20000)
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        evs = events(gw)
        assert "directory_unavailable" in [e["state"] for e in evs]
        assert evs[-1]["reason"] == "directory_unavailable" and evs[-1]["by"] == "gateway"
    finally:
        stop_gateway(gw)


def test_baresip_sndcode_repeated_digits(ivr_gateway: Gateway, tmp_path: Path) -> None:
    from tests.integration.baresip import Baresip
    from tests.integration.test_baresip import tone_wav

    room = create_room(ivr_gateway, meeting_id="112233")
    src = tmp_path / "quiet.wav"
    tone_wav(src, 300.0, 60.0)
    phone = Baresip(tmp_path / "baresip", src, record=False)
    try:
        phone.command("dial", f"sip:{IVR_DID}@{ivr_gateway.sip}")
        phone.wait_event("CALL_ESTABLISHED")
        phone.command("sndcode", "112233#")
        wait_until(lambda: '"call.meeting_id_' in ivr_gateway.log(), 20, "the meeting ID checked")
        phone.command("sndcode", room["sip"]["pin"] + "#")
        wait_until(lambda: '"call.validated"' in ivr_gateway.log() or '"call.pin_invalid"' in ivr_gateway.log(), 20,
                   "PIN checked")
        phone.command("hangup")
        phone.wait_event("CALL_CLOSED")
    finally:
        phone.close()
    evs = events(ivr_gateway)
    assert "meeting_id_invalid" not in [e["state"] for e in evs]
    assert validated(evs)["room_id"] == room["room_id"]


@pytest.fixture
def fresh_ivr_gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An IVR gateway that renders its prompts itself (none copied from earlier test gateways)."""
    gw = start_gateway(tmp_path, make_test_config(), fresh_prompts=True)
    wait_until(lambda: '"prompts.ready"' in gw.log(), 60, "prompts rendered")
    yield gw
    stop_gateway(gw)


def test_prompt_audio_is_speech_and_rendered_once(fresh_ivr_gateway: Gateway, tmp_path: Path) -> None:
    """The caller hears the welcome prompt as 8 kHz speech (not silence); the second call uses the cache."""
    ivr_gateway = fresh_ivr_gateway
    from gateway.apps.prompts import read_wav
    from gateway.media import g711
    from gateway.media.rtp import RtpPacket
    from tests.integration.media_tools import Capture

    media_port = 42000 + (ivr_gateway.sip_port % 1000) * 2
    lo, hi = ivr_gateway.rtp_range
    cap = Capture(tmp_path / "prompt.pcap", f"udp and dst port {media_port} and src portrange {lo}-{hi}")
    try:
        for _ in range(2):
            sf = ivr_scenario(tmp_path, ['  <pause milliseconds="3000"/>'], tail=0)
            r = run_sipp(ivr_gateway.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", media_port=media_port)
            assert r.returncode == 0, r.stdout[-2000:]
    finally:
        cap.stop()
    ivr_gateway.wait_calls_ended(2)
    payload = b"".join(RtpPacket.parse(p).payload for _, _, _, p in cap.udp_payloads())
    heard = g711.decode("PCMU", payload[: 8000 * 2]).astype(float)  # first call, first 2 s
    assert np.sqrt(np.mean(heard**2)) > 500, "the caller must hear speech, not silence"
    cache = sorted((ivr_gateway.data_dir / "prompts-cache").rglob("*.wav"))
    welcome = next(p for p in cache if _matches(heard, read_wav(p).astype(float)))
    assert welcome, "what the caller hears is the rendered welcome prompt"
    assert ivr_gateway.log().count('"key": "welcome"') == 1, "a prompt is rendered once; later calls hit the cache"
    spectrum = np.abs(np.fft.rfft(heard))
    freqs = np.fft.rfftfreq(len(heard), 1 / 8000)
    assert spectrum[(freqs > 200) & (freqs < 3400)].sum() > 0.9 * spectrum.sum(), "speech band at 8 kHz"


def _matches(heard: np.ndarray, prompt: np.ndarray) -> bool:
    n = min(len(heard), len(prompt), 8000)
    if n < 4000:
        return False
    a, b = heard[:n], prompt[:n]
    best = max(abs(np.corrcoef(a[k:], b[: n - k])[0, 1]) for k in range(0, 400, 1) if np.std(a[k:]) > 0)
    return best > 0.9


def test_star_clears_and_timeouts_count_as_attempts(tmp_path: Path) -> None:
    cfg = make_test_config().replace("first_digit_timeout_ms = 10000", "first_digit_timeout_ms = 1500")
    gw = start_gateway(tmp_path, cfg)
    try:
        room = create_room(gw)
        # "12*" is cleared, then the right meeting ID; then silence: the PIN step times out three times
        sf = ivr_scenario(tmp_path, [rfc4733("12*" + room["sip"]["meeting_id"] + "#")], end="gateway", tail=60000)
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=90)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        evs = events(gw)
        states = [e["state"] for e in evs]
        assert "meeting_id_accepted" in states and "meeting_id_invalid" not in states
        assert states.count("pin_invalid") == 3 and evs[-1]["reason"] == "too_many_pin_attempts"
    finally:
        stop_gateway(gw)


def test_pin_guessing_limit_refuses_further_attempts(tmp_path: Path) -> None:
    cfg = make_test_config().replace("pin_failures_per_caller = 10", "pin_failures_per_caller = 2")
    gw = start_gateway(tmp_path, cfg)
    try:
        room = create_room(gw)
        wrong = "0000000"  # 7 digits: never a 6-digit PIN
        steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(wrong + "#"), rfc4733(wrong + "#")]
        sf = ivr_scenario(tmp_path, steps, end="gateway", tail=20000)
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=90)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        evs = events(gw)
        blocked = [e for e in evs if e["state"] == "pin_blocked"]
        assert blocked and blocked[0]["limit"] == "caller"
        # the limit is per caller number: another number may still try
        room2 = create_room(gw)
        sf2 = ivr_scenario(tmp_path, [rfc4733(room2["sip"]["meeting_id"] + "#"), rfc4733(room2["sip"]["pin"] + "#")],
                           caller="15559990000")
        r2 = run_sipp(gw.sip, "-sf", str(sf2), "-s", IVR_DID, "-m", "1", timeout=90)
        assert r2.returncode == 0, r2.stdout[-2000:]
        assert evs[-1]["reason"] == "pin_attempts_blocked"
    finally:
        stop_gateway(gw)


def test_fixed_room_did_asks_pin_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, "-m", "gateway", "rooms", "create", "--json", "--name", "fixed",
                          "--data-dir", str(data)],
                         capture_output=True, timeout=30, cwd=ROOT, check=True).stdout
    room = json.loads(out)
    cfg = make_test_config() + f'\n[[dids]]\nnumber = "15550100003"\nroute = "room"\nproject = "demo"\nroom_id = "{room["room_id"]}"\n'
    gw = start_gateway(tmp_path, cfg)
    try:
        sf = ivr_scenario(tmp_path, [rfc4733(room["sip"]["pin"] + "#")])
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", "15550100003", "-m", "1", timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        assert validated(events(gw))["room_id"] == room["room_id"]
    finally:
        stop_gateway(gw)


def test_http_directory(tmp_path: Path) -> None:
    """An external room service speaking the documented directory protocol (a small aiohttp app)."""
    import asyncio
    import threading

    from aiohttp import web

    from tests.conftest import free_port

    port = free_port()
    seen: list[str] = []

    async def meeting(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"room_id": "ext-room"}) if request.match_info["mid"] == "4242" else web.json_response({}, status=404)

    async def verify(request: web.Request) -> web.Response:
        pin = (await request.json())["pin"]
        role = {"1111": "participant", "2222": "moderator"}.get(pin)
        return web.json_response({"room_id": "ext-room", "role": role}) if role else web.json_response({}, status=403)

    app = web.Application()
    app.router.add_get("/dir/meetings/{mid}", meeting)
    app.router.add_post("/dir/meetings/{mid}/verify", verify)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = make_test_config().replace('kind = "embedded"', 'kind = "http"').replace(
        '\nurl = ""', f'\nurl = "http://127.0.0.1:{port}/dir"', 1).replace('username = ""\npassword = ""\ntimeout', 'username = "gw"\npassword = "pw"\ntimeout')
    gw = start_gateway(tmp_path, cfg)
    try:
        sf = ivr_scenario(tmp_path, [rfc4733("4242#"), rfc4733("2222#")])
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1", timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
        v = validated(events(gw))
        assert (v["room_id"], v["role"]) == ("ext-room", "moderator")
        assert seen and seen[0].startswith("Basic ")
    finally:
        stop_gateway(gw)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
