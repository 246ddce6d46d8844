"""HTTPS on the gateway's listeners (issue 13, part 3): the Voice API and the room service over TLS 1.2+ with a
self-signed certificate made by `gateway certs self-signed`, HSTS, plain HTTP and old TLS refused, the processes'
own hops (room service -> Voice API) over HTTPS pinned to the certificate; configuration mistakes said at start.
The room page itself over HTTPS in Chromium: tests/integration/test_room_page.py."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.rooms.service.server import host_token
from tests.conftest import ROOT, Gateway, make_test_config, start_gateway, stop_gateway, tls_files, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("https"), make_test_config(), https=True)
    try:
        wait_until(lambda: '"rooms.started"' in g.log(), 30, "the room service")
        yield g
    finally:
        stop_gateway(g)


def request(gw: Gateway, url: str, method: str = "GET", auth: str | None = None,
            body: Any = None) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=gw.tls) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def test_the_voice_api_and_the_room_service_answer_over_https_with_hsts(gw: Gateway) -> None:
    for base in (gw.api_url, gw.rooms_url):
        assert base.startswith("https://")
        status, headers, body = request(gw, f"{base}/healthz")
        assert status == 200 and body["status"] == "ok", body
        assert headers["Strict-Transport-Security"] == "max-age=31536000"
    key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
    status, _, room = request(gw, f"{gw.rooms_url}/video/v1/rooms", "POST", f"demo:{key}", {"name": "tls"})
    assert status == 201 and room["links"]["join"].startswith(f"https://127.0.0.1:{gw.rooms_port}/rooms/"), room
    status, _, err = request(gw, f"{gw.api_url}/voice/v1/calls")
    assert status == 401 and err["error"]["code"], err  # credentials still required, now never in clear

    # the room service's own hop to the Voice API (a host's "call a phone" progress) goes over HTTPS too, pinned:
    # an unknown call is the Voice API's 404, not a 502 (unreachable, or the certificate refused)
    token = host_token(json.loads((gw.data_dir / "room-service.json").read_text())["secret"], room["room_id"],
                       2**31)
    status, _, err = request(gw, f"{gw.rooms_url}/rooms/{room['room_id']}/dial/"
                                 f"00000000-0000-4000-8000-000000000000?host={token}")
    assert status == 404 and err["error"]["code"] == "call_not_found", err


def test_plain_http_and_old_tls_are_refused_and_the_listener_goes_on(gw: Gateway) -> None:
    for port in (gw.http_port, gw.rooms_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # plain text on the TLS port
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = s.recv(1024)
        assert not answer.startswith(b"HTTP/1.1 200"), answer
        refused_old_tls(port)
        other = ssl.create_default_context()  # a client that does not trust the self-signed certificate
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                other.wrap_socket(raw, server_hostname="127.0.0.1")
    assert request(gw, f"{gw.api_url}/healthz")[0] == 200  # and the listeners go on


def refused_old_tls(port: int) -> None:
    """A client that offers TLS 1.1 only (allowed to, at OpenSSL's security level 0) is refused by the listener
    (its protocol_version alert, or the connection closed on it), not by the client's own library."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # deprecated, which is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLError) as refused:
        old.wrap_socket(raw)
    said = str(refused.value).upper()
    assert "PROTOCOL_VERSION" in said or isinstance(refused.value, ssl.SSLEOFError), refused.value


def test_tls_configuration_mistakes_are_said_at_start(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    other_cert, _ = tls_files(tmp_path / "other")
    cases = [({"GATEWAY_HTTP_TLS_CERT": str(cert)}, "http.tls_cert and http.tls_key: give both"),
             ({"GATEWAY_ROOM_SERVICE_TLS_CERT": str(other_cert), "GATEWAY_ROOM_SERVICE_TLS_KEY": str(key)},
              "room_service.tls_cert/room_service.tls_key"),
             ({"GATEWAY_HTTP_TLS_CERT": str(tmp_path / "missing.pem"), "GATEWAY_HTTP_TLS_KEY": str(key)},
              "http.tls_cert/http.tls_key")]
    for env, said in cases:
        out = subprocess.run([sys.executable, "-m", "gateway", "run", "--data-dir", str(tmp_path / "data")],
                             capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, **env})
        assert out.returncode == 2 and said in out.stderr, (env, out.stderr[-500:])


def test_the_self_signed_command_writes_a_usable_pair(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "certs", "self-signed", "--json",
                          "--name", "meet.example.com",
                          "--name", "192.0.2.10", "--out", str(tmp_path / "tls")],
                         capture_output=True, text=True, timeout=30, cwd=ROOT, check=True)
    made = json.loads(out.stdout)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(made["cert"]).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["meet.example.com"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert os.stat(made["key"]).st_mode & 0o777 == 0o600
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(made["cert"], made["key"])  # a pair
    again = subprocess.run([sys.executable, "-m", "gateway", "certs", "self-signed", "--name", "x", "--out",
                            str(tmp_path / "tls")], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrites a key by surprise
