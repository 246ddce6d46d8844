"""SRTP with SDES on trunks (issue 13, part 2), against baresip (a real softphone; its srtp module does SDES) and
sipp. One gateway for the module, its trunks chosen by source address (the most specific network wins):
127.0.0.1 is the "secure" trunk (media_encryption required), 127.0.0.3 the "mixed" one (optional), and "carrier"
a dial-out trunk to a far baresip over TLS with SRTP required."""

from __future__ import annotations

import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gateway.media import g711
from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    run_sipp,
    sip_tls_env,
    start_gateway,
    stop_gateway,
    tls_files,
    wait_until,
)
from tests.integration.baresip import Baresip
from tests.integration.chaos_tools import ACME_NUMBER
from tests.integration.ivr_tools import ivr_scenario
from tests.integration.media_tools import Capture
from tests.integration.test_baresip import dominant_frequency, tone_wav
from tests.integration.test_bridge import IVR_DID, api, dominant, run_in_thread
from tests.integration.test_rooms_janus import caller_steps, tone_file
from tests.integration.voice_tools import VoiceClient, cli

pytestmark = pytest.mark.timeout(120)
ECHO_DID = "15550100001"
SUITE_80 = "AES_CM_128_HMAC_SHA1_80"


@dataclass
class Secure:
    gw: Gateway
    tls_port: int
    cert: Path
    far: Baresip  # answers dial-outs over TLS with SRTP required


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    tmp = tmp_path_factory.mktemp("srtp")
    far_cert, far_key = tls_files(tmp / "far")
    both = tmp / "far" / "baresip.pem"
    both.write_bytes(far_cert.read_bytes() + far_key.read_bytes())
    tone_wav(tmp / "far.wav", 700.0, 90.0)
    far = Baresip(tmp / "far-phone", tmp / "far.wav", record=False, certificate=both, answer=True, user="15551230001",
                  mediaenc="srtp-mand")
    trunks = f"""
[[trunks]]
name = "secure"
sources = ["127.0.0.1/32"]
media_encryption = "required"

[[trunks]]
name = "mixed"
sources = ["127.0.0.3/32"]
media_encryption = "optional"

[[trunks]]
name = "carrier"
sources = []
media_encryption = "required"
[trunks.outbound]
proxy = "sips:127.0.0.1:{far.tls_port}"  # sips: TLS, and a sips: Request-URI and Contact
"""
    cert, key = tls_files(tmp)
    port = free_port()
    gw = start_gateway(tmp, make_test_config(trunks), sip_tls_env(port, cert, key, tls_ca=str(far_cert)))
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 60, "prompts and rooms")
        yield Secure(gw, port, cert, far)
    finally:
        stop_gateway(gw)
        far.close()


def ended_since(gw: Gateway, since: float, count: int = 1) -> list[dict]:  # type: ignore[type-arg]
    """The `count` calls started since `since`, once all of them ended, oldest first."""
    def done() -> list[dict] | None:  # type: ignore[type-arg]
        rows = [r for r in gw.calls() if r["started_at"] >= since]
        return rows if len(rows) >= count and all(r["state"] == "disconnected" for r in rows) else None
    rows: list[dict] = wait_until(done, 30, f"{count} calls to end in the CDR", interval=0.2)  # type: ignore[type-arg]
    return sorted(rows, key=lambda r: r["started_at"])


def answered(gw: Gateway, voice_id: str) -> dict:  # type: ignore[type-arg]
    return next(e for e in gw.cdr(voice_id)["events"] if e["state"] == "answered")


def tone_share(payloads: list[bytes], hz: float) -> float:
    """The share of the spectrum within 20 Hz of `hz` when the payloads are read as G.711 mu-law."""
    x = g711.decode("PCMU", b"".join(payloads)).astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / 8000)
    return float(spectrum[np.abs(freqs - hz) < 20].sum() / spectrum.sum())


def test_baresip_over_tls_with_srtp_required_hears_itself_and_the_wire_carries_no_tone(secure: Secure,
                                                                                       tmp_path: Path) -> None:
    gw = secure.gw
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)
    lo, hi = gw.rtp_range
    cap = Capture(tmp_path / "rtp.pcap", f"udp and src portrange {lo}-{hi}")  # what the gateway sends
    since = time.time()
    phone = Baresip(tmp_path / "baresip", src, ca_file=secure.cert, mediaenc="srtp-mand")
    try:
        phone.talk(f"sip:{ECHO_DID}@127.0.0.1:{secure.tls_port};transport=tls", 4)
    finally:
        phone.close()
        cap.stop()
    row = ended_since(gw, since)[0]
    assert row["reason"] == "remote_bye" and row["trunk"] == "secure", row
    assert row["transport"] == "tls" and row["media_encryption"] == "srtp", row
    assert answered(gw, row["voice_id"])["srtp_suite"] == SUITE_80
    assert "inline:" not in gw.log() and b"inline:" not in (gw.data_dir / "cdr.sqlite").read_bytes(), "keys kept out"
    recorded = [p for p in (tmp_path / "baresip" / "rec").glob("*.wav") if "dec" in p.name]
    freq, rms = dominant_frequency(recorded[0])
    assert abs(freq - 1000) < 20 and rms > 1000, (freq, rms)  # decrypted by baresip: its own tone
    remote_port = int(answered(gw, row["voice_id"])["remote_rtp"].rsplit(":", 1)[1])
    sent = [p for _, _, dst, p in cap.udp_payloads() if dst == remote_port and len(p) > 12 and p[1] & 0x7F == 0]
    assert len(sent) > 100, len(sent)
    assert {len(p) for p in sent} == {12 + 160 + 10}, "PCMU, 20 ms, and the 80-bit authentication tag"
    share = tone_share([p[12:172] for p in sent], 1000)
    assert share < 0.05, f"{share:.0%} of the wire's spectrum is the 1 kHz tone: not encrypted"
    assert tone_share([g711.encode("PCMU", (8000 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000))
                                   .astype(np.int16))], 1000) > 0.9, "the measure finds a clear tone"


def test_required_refuses_a_plain_offer_with_488_and_optional_takes_both(secure: Secure, tmp_path: Path) -> None:
    gw = secure.gw
    since = time.time()
    plain = run_sipp(gw.sip, "-sn", "uac", "-s", ECHO_DID, "-m", "1", "-d", "1000", timeout=30)  # from 127.0.0.1
    assert plain.returncode != 0, "a plain offer to the secure trunk is not answered"
    row = ended_since(gw, since)[0]
    assert (row["sip_code"], row["reason"], row["trunk"]) == (488, "incompatible_sdp", "secure"), row
    assert "requires SRTP" in gw.cdr(row["voice_id"])["events"][-1]["error"]

    since = time.time()
    plain = run_sipp(gw.sip, "-sn", "uac", "-s", ECHO_DID, "-m", "1", "-d", "1000", "-i", "127.0.0.3", timeout=30)
    assert plain.returncode == 0, plain.stdout[-2000:]
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)
    phone = Baresip(tmp_path / "baresip", src, record=False, mediaenc="srtp-mand", host="127.0.0.3")
    try:
        phone.command("dial", f"sip:{ECHO_DID}@{gw.sip}")
        phone.wait_event("CALL_ESTABLISHED", 20)
        phone.command("hangup")
        phone.wait_event("CALL_CLOSED")
    finally:
        phone.close()
    rows = ended_since(gw, since, 2)
    assert [(r["trunk"], r["transport"], r["media_encryption"]) for r in rows] == [
        ("mixed", "udp", "none"), ("mixed", "udp", "srtp")], rows


def test_an_ivr_call_over_tls_and_srtp_validates_into_a_room_and_hears_it(secure: Secure, tmp_path: Path) -> None:
    """baresip (TLS, SRTP) types the meeting ID and PIN (RFC 4733 inside SRTP) and joins the room, where a plain
    sipp caller on the mixed trunk plays 600 Hz: baresip hears it, and the room gets baresip's audio."""
    gw = secure.gw
    _, room = api(gw, "POST", "/video/v1/rooms", {"name": "secure", "settings": {"sip": {"enabled": True}}})
    other = ivr_scenario(tmp_path / "other", caller_steps(room, tone_file(tmp_path / "other.ul", 600),
                                                          '  <pause milliseconds="25000"/>'), caller="15551230002")
    since = time.time()
    thread, result = run_in_thread(lambda: run_sipp(gw.sip, "-sf", str(other), "-s", IVR_DID, "-m", "1",
                                                     "-i", "127.0.0.3", timeout=80))
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 60.0)
    phone = Baresip(tmp_path / "baresip", src, ca_file=secure.cert, mediaenc="srtp-mand")
    try:
        phone.command("dial", f"sip:{IVR_DID}@127.0.0.1:{secure.tls_port};transport=tls")
        phone.wait_event("CALL_ESTABLISHED", 20)
        ours = wait_until(lambda: next((r["voice_id"] for r in gw.calls() if r["started_at"] >= since
                                        and r["transport"] == "tls"), None), 10, "baresip's call in the CDR")

        def states() -> list[str]:
            return [e["state"] for e in gw.cdr(ours)["events"]]

        phone.command("sndcode", room["sip"]["meeting_id"] + "#")
        wait_until(lambda: any(s.startswith("meeting_id_") for s in states()), 20, "the meeting ID checked")
        phone.command("sndcode", room["sip"]["pin"] + "#")
        wait_until(lambda: "joined" in states(), 30, "baresip's call in the room")
        wait_until(lambda: sum(r["room_id"] == room["room_id"] for r in gw.calls()) == 2, 30, "both callers in the room")
        time.sleep(6)  # the scenario itself: six seconds in the room together
        phone.command("hangup")
        phone.wait_event("CALL_CLOSED")
    finally:
        phone.close()
    thread.join(90)
    assert result["value"].returncode == 0, result["value"].stdout[-2000:]
    row = next(r for r in ended_since(gw, since, 2) if r["voice_id"] == ours)
    assert row["media_encryption"] == "srtp" and row["room_id"] == room["room_id"], row
    left = next(e for e in gw.cdr(ours)["events"] if e["state"] == "left")
    assert left["rtp_to_room"] > 200 and left["rtp_from_room"] > 200, left
    recorded = [p for p in (tmp_path / "baresip" / "rec").glob("*.wav") if "dec" in p.name]
    with wave.open(str(recorded[0])) as w:
        heard = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)
    windows = [dominant(heard[i : i + 8000]) for i in range(0, len(heard) - 8000, 4000)]
    assert any(abs(f - 600) < 15 and rms > 300 for f, rms in windows), windows


def test_a_dial_out_to_a_tls_and_srtp_trunk_joins_a_room(secure: Secure) -> None:
    gw = secure.gw
    acme = cli(gw.data_dir, "projects", "create", "--name", "acme", "--number", ACME_NUMBER)
    room = cli(gw.data_dir, "rooms", "create", "--name", "Board", "--project", "acme")
    status, body, _ = VoiceClient(gw, acme["app_id"], acme["app_key"])(
        "POST", f"/voice/v1/room/{room['room_id']}/join", {"from": ACME_NUMBER, "to": "15551230001"})
    assert status == 200, body
    secure.far.wait_event("CALL_ESTABLISHED", 20)
    wait_until(lambda: [e for e in gw.cdr(body["voice_id"])["events"] if e["state"] == "joined"], 30,
               "the dial-out in the room")
    event = answered(gw, body["voice_id"])
    assert (event["transport"], event["media_encryption"], event["srtp_suite"]) == ("tls", "srtp", SUITE_80), event
    status, _, _ = VoiceClient(gw, acme["app_id"], acme["app_key"])(
        "DELETE", f"/voice/v1/room/{room['room_id']}/call/{body['voice_id']}")
    assert status == 200, status
    secure.far.wait_event("CALL_CLOSED", 20)
    row = wait_until(lambda: gw.cdr(body["voice_id"]) if gw.cdr(body["voice_id"])["state"] == "disconnected"
                     else None, 20, "the dial-out's CDR closed")
    assert (row["transport"], row["media_encryption"]) == ("tls", "srtp"), row
