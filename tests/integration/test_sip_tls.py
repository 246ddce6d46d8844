"""SIP over TLS (issue 13, part 1): baresip, a real softphone, calls the echo DID over TLS (the gateway's
self-signed certificate as its CA) and hears itself; the CDR says tls. Plain text, an old TLS version or a
stalled handshake on the TLS port are refused, logged once per source, and the worker goes on."""

from __future__ import annotations

import re
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import tls
from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    sip_tls_env,
    start_gateway,
    stop_gateway,
    tls_files,
    wait_until,
)
from tests.integration.baresip import Baresip
from tests.integration.chaos_tools import ACME_NUMBER, trunk_config
from tests.integration.test_baresip import dominant_frequency, tone_wav
from tests.integration.test_https import refused_old_tls
from tests.integration.voice_tools import VoiceClient, cli

pytestmark = pytest.mark.timeout(90)
OPTIONS = (b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bK-tls-%d\r\n"
           b"From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:gw@127.0.0.1>\r\nCall-ID: tls-%d\r\nCSeq: 1 OPTIONS\r\n"
           b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


class Tls:
    def __init__(self, gw: Gateway, port: int, cert: Path) -> None:
        self.gw, self.port, self.cert = gw, port, cert

    def options(self, n: int, close_notify: bool = False) -> bytes:
        """An OPTIONS over a fresh TLS connection that verifies the gateway's certificate; the answer.
        `close_notify`: end the session properly (a TLS close_notify alert) before closing."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(OPTIONS % (n, n))
                answer = s.recv(4096)
                if close_notify:
                    s.unwrap()
                return answer


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    tmp = tmp_path_factory.mktemp("siptls")
    cert, key = tls_files(tmp)
    port = free_port()
    gw = start_gateway(tmp, make_test_config(), sip_tls_env(port, cert, key))
    try:
        yield Tls(gw, port, cert)
    finally:
        stop_gateway(gw)


def test_baresip_calls_the_echo_did_over_tls_and_hears_itself(tls_gateway: Tls, tmp_path: Path) -> None:
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)
    phone = Baresip(tmp_path / "baresip", src, ca_file=tls_gateway.cert)
    try:
        phone.talk(f"sip:15550100001@127.0.0.1:{tls_gateway.port};transport=tls", 3)
    finally:
        phone.close()
    row = tls_gateway.gw.wait_calls_ended(1)[0]
    assert row["reason"] == "remote_bye" and row["answered_at"], row
    initiated = tls_gateway.gw.cdr(row["voice_id"])["events"][0]
    assert initiated["state"] == "initiated" and initiated["transport"] == "tls", initiated
    recorded = [p for p in (tmp_path / "baresip" / "rec").glob("*.wav") if "dec" in p.name]
    freq, rms = dominant_frequency(recorded[0])
    assert abs(freq - 1000) < 20 and rms > 1000, (freq, rms)


def test_plain_text_old_tls_and_stalled_handshakes_are_refused_once_per_source(tls_gateway: Tls) -> None:
    gw = tls_gateway.gw
    assert tls_gateway.options(1, close_notify=True).startswith(b"SIP/2.0 200"), "an OPTIONS over TLS"
    assert tls_gateway.options(5).startswith(b"SIP/2.0 200"), "a session ended by close_notify hangs nothing"
    for _ in range(3):  # plain SIP on the TLS port: closed, no answer
        with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=5) as s:
            s.sendall(OPTIONS % (2, 2))
            answer = s.recv(4096)
        assert not answer.startswith(b"SIP/2.0"), answer
    refused_old_tls(tls_gateway.port)
    lines = wait_until(lambda: [ln for ln in gw.log().splitlines() if '"sip.tls_refused"' in ln], 10,
                       "the refusal in the log")
    assert len(lines) == 1 and '"source": "127.0.0.1"' in lines[0], lines  # once per source per window
    with urllib.request.urlopen(f"{gw.api_url}/metrics", timeout=5) as r:  # but every one is counted
        counted = re.search(r'gateway_sip_connections_refused_total\{reason="tls_handshake"\} (\d+)', r.read().decode())
    assert counted and int(counted.group(1)) >= 4, counted
    stalled = socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10)  # says nothing at all
    try:
        assert stalled.recv(1) == b""  # closed by the first-message deadline, not kept open
    finally:
        stalled.close()
    assert tls_gateway.options(3).startswith(b"SIP/2.0 200"), "the TLS listener goes on"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # and so does the rest of the worker
        udp.settimeout(5)
        udp.sendto((OPTIONS % (4, 4)).replace(b"SIP/2.0/TLS", b"SIP/2.0/UDP").replace(b";branch", b";rport;branch"),
                   ("127.0.0.1", gw.sip_port))  # rport: the answer comes back to this socket
        assert udp.recv(4096).startswith(b"SIP/2.0 200")


def test_a_dial_out_over_tls_reaches_baresip_verified_and_joins_a_room(tmp_path: Path) -> None:
    """The far phone (baresip, answering by itself) listens for TLS with its own certificate; the trunk's proxy
    says transport=tls and sip.tls_ca trusts that certificate: the call is answered and joins the room. With a
    CA that does not, the connection is refused on the certificate and said in the log."""
    far_cert, far_key = tls_files(tmp_path / "far")
    both = tmp_path / "far" / "baresip.pem"
    both.write_bytes(far_cert.read_bytes() + far_key.read_bytes())
    src = tmp_path / "tone.wav"
    tone_wav(src, 700.0, 60.0)
    phone = Baresip(tmp_path / "baresip", src, record=False, certificate=both, answer=True, user="15551230001")
    trunk = trunk_config(phone.tls_port, ";transport=tls")
    cert, key = tls_files(tmp_path)
    env = sip_tls_env(free_port(), cert, key, '["udp", "tls"]')
    try:
        for trusted, home in ((far_cert, "trusting"), (cert, "untrusting")):  # the far phone's, then another one
            (tmp_path / home).mkdir()
            gw = start_gateway(tmp_path / home, make_test_config(trunk),
                               {**env, "GATEWAY_SIP_TLS_CA": str(trusted)})
            try:  # the call joins a room: the room service must be up (the worker answers /healthz before it)
                wait_until(lambda gw=gw: '"rooms.started"' in gw.log(), 30, "the room service")  # type: ignore[misc]
                acme = cli(gw.data_dir, "projects", "create", "--name", "acme", "--number", ACME_NUMBER)
                room = cli(gw.data_dir, "rooms", "create", "--name", "Board", "--project", "acme")
                status, body, _ = VoiceClient(gw, acme["app_id"], acme["app_key"])(
                    "POST", f"/voice/v1/room/{room['room_id']}/join", {"from": ACME_NUMBER, "to": "15551230001"})
                assert status == 200, body
                if trusted is far_cert:
                    phone.wait_event("CALL_ESTABLISHED", 20)
                    joined = wait_until(lambda gw=gw, vid=body["voice_id"]: [  # type: ignore[misc]
                        e for e in gw.cdr(vid)["events"] if e["state"] == "joined"], 30, "the dial-out in the room")
                    assert joined
                    phone.command("hangup")
                    phone.wait_event("CALL_CLOSED")
                else:
                    line = wait_until(lambda gw=gw: [ln for ln in gw.log().splitlines()  # type: ignore[misc]
                                                     if '"sip.tcp_connect_failed"' in ln], 10, "the refusal")[0]
                    assert '"transport": "tls"' in line and "certificate verify failed" in line, line
            finally:
                stop_gateway(gw)
    finally:
        phone.close()


def test_a_trunk_with_mutual_tls_takes_only_the_certificate_it_names(tmp_path: Path) -> None:
    """The trunk "sbc" (127.0.0.1, baresip's address for TLS) needs a client certificate from sip.tls_client_ca
    naming sbc.example: baresip with that one is answered; with another trusted certificate, or none, it gets
    403 (logged with the reason and the names); an untrusted one is refused at the handshake."""
    cert, key = tls_files(tmp_path)
    clients = {}
    for name in ("sbc.example", "other.example", "stranger.example"):  # self-signed, each its own trust anchor
        tls.self_signed([name], tmp_path / name / "cert.pem", tmp_path / name / "key.pem")
        clients[name] = tmp_path / name / "both.pem"
        clients[name].write_bytes((tmp_path / name / "cert.pem").read_bytes() + (tmp_path / name / "key.pem").read_bytes())
    trusted = b"".join((tmp_path / n / "cert.pem").read_bytes() for n in ("sbc.example", "other.example"))
    (tmp_path / "client-ca.pem").write_bytes(trusted)
    port = free_port()
    sbc = ('\n[[trunks]]\nname = "sbc"\nsources = ["127.0.0.1/32"]\ntls_client_certificate = true\n'
           'tls_client_names = ["sbc.example"]\n')
    (tmp_path / "gw").mkdir()
    gw = start_gateway(tmp_path / "gw", make_test_config(sbc),
                       sip_tls_env(port, cert, key, '["udp", "tls"]', tls_client_ca=str(tmp_path / "client-ca.pem")))
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)
    try:
        for i, client in enumerate(("sbc.example", "other.example", None, "stranger.example")):
            phone = Baresip(tmp_path / f"baresip{i}", src, record=False, ca_file=cert,
                            certificate=clients[client] if client else None)
            try:
                phone.command("dial", f"sip:15550100001@127.0.0.1:{port};transport=tls")
                if client == "stranger.example":  # no SIP answer at all: the handshake is refused
                    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in gw.log(), 20, "the handshake refused")
                    continue
                if client == "sbc.example":
                    phone.wait_event("CALL_ESTABLISHED", 20)
                    phone.command("hangup")
                closed = phone.wait_event("CALL_CLOSED", 20)
            finally:
                phone.close()
            if client != "sbc.example":
                assert "403" in closed.get("param", ""), closed
        refusals = [line for line in gw.log().splitlines() if '"reason": "client_certificate"' in line]
        assert len(refusals) == 2 and "other.example" in refusals[0] and '"names": ""' in refusals[1], refusals
        calls = gw.calls()
        assert [(r["trunk"], r["transport"], r["answered_at"] is not None) for r in calls if r["answered_at"]] == [
            ("sbc", "tls", True)], calls
    finally:
        stop_gateway(gw)
