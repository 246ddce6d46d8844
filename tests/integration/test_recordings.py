"""Call recording with real peers (issue 14): sipp callers, the managed Janus, the Voice API, webhooks.

- auto_record: a dial-in caller (1 kHz) validates into a room where another caller plays 600 Hz: its recording has
  the caller's tone on the left, the prompts and the room (600 Hz) on the right, lasts as long as the call, and
  the recording_ready webhook's SHA-256 matches the downloaded file; a Range request gets its part; another project
  gets 404.
- the Voice API starts and stops recording a live echo call; the file lasts from start to stop.
- kill -9 mid-recording: the next start repairs the file (sox reads it) and announces it.
- a full disk (a tmpfs of 64 kB under the recordings): the recording fails (CDR, webhook, error log), the call
  goes on to its end.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    run_sipp,
    scenario,
    start_gateway,
    stop_gateway,
    wait_until,
)
from tests.integration.ivr_tools import ivr_scenario
from tests.integration.media_tools import make_signal_ulaw
from tests.integration.test_bridge import IVR_DID, api, dominant, run_in_thread
from tests.integration.test_rooms_janus import caller_steps, tone_file
from tests.integration.voice_tools import ALLOW_LOOPBACK, HookServer, VoiceClient, cli

pytestmark = pytest.mark.timeout(150)
ECHO_DID = "15550100001"


def recording_config(hooks: HookServer) -> str:
    """The shipped config, its demo project recording every inbound call and posting webhooks to `hooks`."""
    return make_test_config().replace('notification_url = ""', f'notification_url = "{hooks.url}"\nauto_record = true', 1)


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer(free_port())
    server.start()
    yield server
    server.stop()


def demo_client(gw: Gateway) -> VoiceClient:
    demo = cli(gw.data_dir, "projects", "reset-key", "demo")
    return VoiceClient(gw, demo["app_id"], demo["app_key"])


def download(client: VoiceClient, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    import base64

    req = urllib.request.Request(f"{client.base}{path}", headers={
        "Authorization": "Basic " + base64.b64encode(f"{client.app_id}:{client.app_key}".encode()).decode(),
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30, context=client.tls) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def stereo(data: bytes) -> tuple[np.ndarray, np.ndarray, float]:
    import io

    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 8000)
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)
        return x[0::2], x[1::2], w.getnframes() / 8000


def windows(x: np.ndarray) -> list[tuple[float, float]]:
    return [dominant(x[i : i + 8000]) for i in range(0, len(x) - 8000, 4000)]


def test_auto_record_two_channels_webhook_download_and_projects_apart(tmp_path: Path, hooks: HookServer) -> None:
    gw = start_gateway(tmp_path, recording_config(hooks), ALLOW_LOOPBACK)
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 60, "prompts and rooms")
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "recorded", "settings": {"sip": {"enabled": True}}})
        a = ivr_scenario(tmp_path / "a", caller_steps(room, tone_file(tmp_path / "a.ul", 1000),
                                                      '  <pause milliseconds="8000"/>'), caller="15551230001")
        b = ivr_scenario(tmp_path / "b", caller_steps(room, tone_file(tmp_path / "b.ul", 600),
                                                      '  <pause milliseconds="14000"/>'), caller="15551230002")
        tb, rb = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(b), "-s", IVR_DID, "-m", "1", timeout=90))
        wait_until(lambda: any(r["room_id"] == room["room_id"] for r in gw.calls()), 30, "B in the room")
        ra = run_sipp(gw.sip, "-sf", str(a), "-s", IVR_DID, "-m", "1", timeout=90)
        tb.join(90)
        assert ra.returncode == 0 and rb["value"].returncode == 0, ra.stdout[-1500:]
        call = next(r for r in gw.wait_calls_ended(2) if r["from_number"] == "15551230001")
        ready = wait_until(lambda: [e for e in hooks.events(call["voice_id"]) if e["state"] == "recording_ready"],
                           30, "recording_ready")[0]
        client = demo_client(gw)
        status, data, headers = download(client, ready["url"])
        assert status == 200 and headers["Content-Type"] == "audio/wav", (status, headers)
        assert hashlib.sha256(data).hexdigest() == ready["sha256"] and len(data) == ready["size"]
        left, right, seconds = stereo(data)
        assert abs(seconds - (call["ended_at"] - call["answered_at"])) < 0.5, (seconds, call)
        assert any(abs(f - 1000) < 15 and rms > 1000 for f, rms in windows(left)), "the caller's tone, left"
        heard = windows(right)
        assert any(abs(f - 600) < 15 and rms > 300 for f, rms in heard), ("the room, right", heard)
        speech = [rms for f, rms in heard[:4] if not abs(f - 600) < 15]
        assert speech and max(speech) > 300, ("the prompts, right", heard[:6])
        status, part, headers = download(client, ready["url"], {"Range": "bytes=100-199"})
        assert status == 206 and part == data[100:200], (status, headers)
        events = [e["state"] for e in gw.cdr(call["voice_id"])["events"]]
        assert "recording_started" in events and "recording_stopped" in events and "recording_ready" in events
        assert gw.cdr(call["voice_id"])["state"] == "disconnected", "a recording's events leave the call's state"
        acme = cli(gw.data_dir, "projects", "create", "--name", "acme")
        stranger = VoiceClient(gw, acme["app_id"], acme["app_key"])
        assert download(stranger, ready["url"])[0] == 404
        assert stranger("GET", f"/voice/v1/recordings/{ready['recording_id']}")[0] == 404
        assert stranger("DELETE", f"/voice/v1/recordings/{ready['recording_id']}")[0] == 404
        listed = client("GET", f"/voice/v1/recordings?voice_id={call['voice_id']}")[1]["recordings"]
        assert [r["id"] for r in listed] == [ready["recording_id"]] and listed[0]["state"] == "ready"
        assert client("DELETE", f"/voice/v1/recordings/{ready['recording_id']}")[0] == 200
        assert download(client, ready["url"])[0] == 404
    finally:
        stop_gateway(gw)


def echo_call(tmp_path: Path, gw: Gateway, seconds: int) -> tuple[Any, dict[str, Any]]:
    """A sipp echo call streaming audio for `seconds` (in a thread) and its CDR row once it is answered."""
    audio = tmp_path / "caller.ul"
    make_signal_ulaw(audio, seconds=seconds + 2)
    sf = scenario(tmp_path, "echo_rtp.xml", audio=str(audio), hold=str(seconds * 1000))
    since = time.time()
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(sf), "-s", ECHO_DID, "-m", "1",
                                                    timeout=seconds + 60))
    row = wait_until(lambda: next((r for r in gw.calls() if r["started_at"] >= since and r["answered_at"]), None),
                     20, "the echo call answered")
    return (thread, result), row


def test_the_api_starts_and_stops_recording_a_live_call(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, make_test_config())
    try:
        client = demo_client(gw)
        (thread, result), row = echo_call(tmp_path, gw, 12)
        vid = row["voice_id"]
        status, body, _ = client("POST", f"/voice/v1/call/{vid}/recording")
        assert status == 200 and body["state"] == "recording", body
        assert client("POST", f"/voice/v1/call/{vid}/recording")[1]["error"]["code"] == "already_recording"
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started > 3, 10, "three seconds of recording")  # the scenario's length
        status, stopped, _ = client("DELETE", f"/voice/v1/call/{vid}/recording")
        length = time.monotonic() - started
        assert status == 200 and stopped["recording_id"] == body["recording_id"], stopped
        assert client("DELETE", f"/voice/v1/call/{vid}/recording")[1]["error"]["code"] == "not_recording"
        meta = wait_until(lambda: (m := client("GET", f"/voice/v1/recordings/{body['recording_id']}")[1])
                          and m.get("state") == "ready" and m, 20, "the recording ready")
        assert abs(meta["duration_s"] - length) < 0.5, (meta, length)
        status, data, _ = download(client, meta["url"])
        left, right, _ = stereo(data)
        assert np.sqrt(np.mean(left**2)) > 500 and np.sqrt(np.mean(right**2)) > 500, "the caller and its echo"
        thread.join(60)
        assert result["value"].returncode == 0, result["value"].stdout[-1500:]
        assert client("POST", f"/voice/v1/call/{vid}/recording")[1]["error"]["code"] == "call_ended"
    finally:
        stop_gateway(gw)


def test_kill_9_mid_recording_is_repaired_at_the_next_start(tmp_path: Path, hooks: HookServer) -> None:
    """baresip (ended by its PID afterwards, not waiting on a BYE nobody answers) talks to the echo DID; the
    gateway is killed once three seconds are on disk; the next start repairs and announces the file."""
    from tests.integration.baresip import Baresip
    from tests.integration.test_baresip import tone_wav

    config = recording_config(hooks)
    gw = start_gateway(tmp_path, config, ALLOW_LOOPBACK)
    tone_wav(tmp_path / "tone.wav", 1000.0, 60.0)
    phone = Baresip(tmp_path / "baresip", tmp_path / "tone.wav", record=False)
    try:
        phone.command("dial", f"sip:{ECHO_DID}@{gw.sip}")
        phone.wait_event("CALL_ESTABLISHED", 20)
        part = wait_until(lambda: [p for p in (gw.data_dir / "recordings" / "demo").glob("*.part.wav")
                                   if p.stat().st_size > 44 + 3 * 32000], 20, "three seconds written")[0]
        voice_id = gw.calls()[0]["voice_id"]
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        phone.close()
    again = start_gateway(tmp_path, config, ALLOW_LOOPBACK)  # same data dir, same worker name
    try:
        ready = wait_until(lambda: [e for e in hooks.events(voice_id) if e["state"] == "recording_ready"],
                           30, "the repaired recording announced")[0]
        assert ready["repaired"] is True and ready["duration_s"] >= 3, ready
        final = part.with_name(part.name.replace(".part.wav", ".wav"))
        assert final.exists() and not part.exists()
        sox = subprocess.run(["sox", str(final), "-n", "stat"], capture_output=True, text=True, timeout=30)
        assert sox.returncode == 0 and "Length (seconds):" in sox.stderr, sox.stderr
        assert '"recording.repaired"' in again.log()
    finally:
        stop_gateway(again)


def test_a_full_disk_fails_the_recording_and_the_call_goes_on(tmp_path: Path, hooks: HookServer) -> None:
    recordings = tmp_path / "data" / "recordings"
    recordings.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(recordings)], check=True,
                   timeout=10)
    try:
        gw = start_gateway(tmp_path, recording_config(hooks), ALLOW_LOOPBACK)
        try:
            (thread, result), row = echo_call(tmp_path, gw, 8)
            failed = wait_until(lambda: [e for e in hooks.events(row["voice_id"]) if e["state"] == "recording_failed"],
                                20, "recording_failed")[0]
            assert "No space left" in failed["error"], failed
            thread.join(60)
            assert result["value"].returncode == 0, "the call went on to its end"
            end = gw.wait_calls_ended(1)[0]
            assert end["reason"] == "remote_bye" and end["ended_at"] - end["answered_at"] > 7, end
            assert '"recording.failed"' in gw.log() and '"level": "error"' in next(
                line for line in gw.log().splitlines() if '"recording.failed"' in line)
            assert "recording_failed" in [e["state"] for e in gw.cdr(row["voice_id"])["events"]]
        finally:
            stop_gateway(gw)
    finally:
        subprocess.run(["umount", str(recordings)], check=True, timeout=10)


def test_forged_recording_ids_are_404(tmp_path: Path) -> None:
    """A recording id is 32 hex digits looked up in the project's own folder: anything else is 404, never a path."""
    gw = start_gateway(tmp_path, make_test_config())
    try:
        client = demo_client(gw)
        for rid in ("../../cdr", "0" * 31, "Z" * 32, "%2e%2e"):
            status, body, _ = client("GET", f"/voice/v1/recordings/{rid}")
            assert status == 404 and body["error"]["code"] in ("recording_not_found", "not_found"), (rid, body)
        assert client("GET", "/voice/v1/recordings")[1] == {"recordings": []}
    finally:
        stop_gateway(gw)


def test_opus_and_the_spoken_notice(tmp_path: Path, hooks: HookServer) -> None:
    """`format = "opus"` and `notice = true`: a dial-in caller of an auto_record project hears "this call is being
    recorded" first (its RTP captured and compared with the rendering; the welcome is paused, not cut), and the
    recording is a two-channel Ogg Opus file (opusdec decodes it) that the webhook's SHA-256 matches."""
    from gateway.apps.prompts import PromptLibrary, read_wav
    from tests.conftest import ROOT
    from tests.integration.ivr_tools import heard_by_caller
    from tests.integration.test_project_api import _matches

    config = recording_config(hooks).replace("[recordings]", "[recordings]\nformat = \"opus\"\nnotice = true", 1)
    config = config.replace('format = "wav"', "", 1).replace("notice = false", "", 1)
    gw = start_gateway(tmp_path, config, ALLOW_LOOPBACK)
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log(), 60, "prompts")
        heard = heard_by_caller(gw, tmp_path, IVR_DID, 6000, port_offset=20)
        call = gw.wait_calls_ended(1)[0]
        ready = wait_until(lambda: [e for e in hooks.events(call["voice_id"]) if e["state"] == "recording_ready"],
                           30, "recording_ready")[0]
        events = [e["state"] for e in gw.cdr(call["voice_id"])["events"]]
        assert events.index("recording_started") < events.index("recording_notice"), events
        notice = read_wav(PromptLibrary(ROOT / "prompts", gw.data_dir / "prompts-cache").cache_path(
            "This call is being recorded.", "en-US", "female")).astype(float)
        start = next(i for i in range(0, len(heard) - 160, 160) if np.abs(heard[i : i + 160]).max() > 200)
        assert _matches(heard[start:], notice), "the first thing the caller hears is the notice"
        client = demo_client(gw)
        status, data, headers = download(client, ready["url"])
        assert status == 200 and headers["Content-Type"] == "audio/ogg" and data[:4] == b"OggS", headers
        assert hashlib.sha256(data).hexdigest() == ready["sha256"]
        ogg = tmp_path / "call.opus"
        ogg.write_bytes(data)
        decoded = subprocess.run(["opusdec", "--quiet", "--rate", "8000", str(ogg), str(tmp_path / "call.wav")],
                                 capture_output=True, text=True, timeout=60)
        assert decoded.returncode == 0, decoded.stderr
        left, right, seconds = stereo((tmp_path / "call.wav").read_bytes())
        assert abs(seconds - (call["ended_at"] - call["answered_at"])) < 0.5, (seconds, call)
        assert np.sqrt(np.mean(right**2)) > 300, "the prompts (the notice, the welcome) on the heard channel"
        assert not list((gw.data_dir / "recordings" / "demo").glob("*.wav")), "the WAV goes once the Ogg file is whole"
    finally:
        stop_gateway(gw)


def mono(data: bytes) -> tuple[np.ndarray, int]:
    import io

    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 1, w.getnchannels()
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float), w.getframerate()


def test_a_room_recording_has_every_phone_and_is_served_like_a_calls(tmp_path: Path, hooks: HookServer) -> None:
    """Two phones (1 kHz, 600 Hz) in a room on the managed Janus; the Video API records the room's mix (Janus's
    own recording) and stops it; recording_ready's SHA-256 matches the download, both tones are in it, the listing
    by room_id finds it, another project gets 404; a second start while recording is 409; a room nobody is in
    cannot record (409)."""
    config = make_test_config().replace('notification_url = ""', f'notification_url = "{hooks.url}"', 1)
    gw = start_gateway(tmp_path, config, ALLOW_LOOPBACK)
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 60, "prompts and rooms")
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "taped", "settings": {"sip": {"enabled": True}}})
        rid = room["room_id"]
        assert api(gw, "POST", f"/video/v1/rooms/{rid}/recording")[0] == 409, "nobody in the room yet"
        steps = {}
        for name, freq, caller in (("a", 1000, "15551230001"), ("b", 600, "15551230002")):
            sf = ivr_scenario(tmp_path / name, caller_steps(room, tone_file(tmp_path / f"{name}.ul", freq),
                                                            '  <pause milliseconds="16000"/>'), caller=caller)
            steps[name] = run_in_thread(lambda sf=sf: run_sipp(gw.sip, "-sf", str(sf), "-s", IVR_DID, "-m", "1",
                                                                timeout=90))
        wait_until(lambda: len(api(gw, "GET", f"/video/v1/rooms/{rid}/participants")[1]["participants"]) == 2, 40,
                   "both phones in the room")
        status, started = api(gw, "POST", f"/video/v1/rooms/{rid}/recording")
        assert status == 200 and started["state"] == "recording", started
        assert api(gw, "POST", f"/video/v1/rooms/{rid}/recording")[1]["error"]["code"] == "already_recording"
        began = time.monotonic()
        wait_until(lambda: time.monotonic() - began > 4, 10, "four seconds of the room")  # the recording's length
        status, stopped = api(gw, "DELETE", f"/video/v1/rooms/{rid}/recording")
        assert status == 200 and stopped["recording_id"] == started["recording_id"], stopped
        for thread, result in steps.values():
            thread.join(90)
            assert result["value"].returncode == 0, result["value"].stdout[-1500:]
        ready = hooks.first("recording_ready", 30)
        assert ready["room_id"] == rid and ready["recording_id"] == started["recording_id"], ready
        assert "repaired" not in ready, "Janus closed the file: published as it is, not repaired"
        client = demo_client(gw)
        status, data, headers = download(client, ready["url"])
        assert status == 200 and headers["Content-Type"] == "audio/wav", headers
        assert hashlib.sha256(data).hexdigest() == ready["sha256"]
        mix, rate = mono(data)
        assert rate == 16000 and 3.5 < len(mix) / rate < 6.5, (rate, len(mix) / rate)
        spectrum = np.abs(np.fft.rfft(mix))
        freqs = np.fft.rfftfreq(len(mix), 1 / rate)

        def level(hz: float) -> float:
            return float(spectrum[(freqs > hz - 10) & (freqs < hz + 10)].max())

        assert level(1000) > 20 * np.median(spectrum) and level(600) > 20 * np.median(spectrum), "both phones"
        listed = client("GET", f"/voice/v1/recordings?room_id={rid}")[1]["recordings"]
        assert [r["id"] for r in listed] == [ready["recording_id"]] and listed[0]["voice_id"] == ""
        acme = cli(gw.data_dir, "projects", "create", "--name", "acme")
        assert download(VoiceClient(gw, acme["app_id"], acme["app_key"]), ready["url"])[0] == 404
        path = next((gw.data_dir / "recordings" / "demo").glob(f"{ready['recording_id']}.wav"))
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        stop_gateway(gw)
