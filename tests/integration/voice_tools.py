"""Helpers for the Voice API tests: a webhook receiver, the API client, sipp as the far phone."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.api.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.conftest import ROOT, Gateway, media_block, wait_until

# The tests' webhook receivers listen on loopback, which webhooks may reach only when allow-listed.
ALLOW_LOOPBACK = {"GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["127.0.0.0/8"]'}


class HookServer:
    """Records every webhook POST (headers + raw body + arrival time); start() may come later than the URL is
    handed out."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived: list[float] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks"

    def start(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with hooks.lock:
                    hooks.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    hooks.arrived.append(time.time())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def events(self, voice_id: str, key: str | None = None) -> list[dict[str, Any]]:
        """This call's events in arrival order (duplicates from at-least-once delivery removed); with `key`
        (the project's webhook secret), every signature and timestamp is checked too, as a receiver does on
        arrival (README, "Webhooks")."""
        out, seen = [], set()
        with self.lock:
            received = list(zip(self.received, self.arrived, strict=True))
        for (headers, body), arrived in received:
            event = json.loads(body)
            if event["voice_id"] != voice_id or event["event_id"] in seen:
                continue
            if key is not None:
                assert verify(key, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()],
                              now=arrived), "bad webhook signature or timestamp"
            seen.add(event["event_id"])
            out.append(event)
        return out

    def states(self, voice_id: str, key: str | None = None) -> list[str]:
        return [e["state"] for e in self.events(voice_id, key)]

    def wait_state(self, voice_id: str, state: str, timeout: float = 20) -> list[str]:
        return wait_until(lambda: (s := self.states(voice_id)) and state in s and s, timeout, f"webhook {state}")

    def first(self, state: str, timeout: float = 20) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self.lock:
                bodies = [json.loads(b) for _, b in self.received]
            return next((e for e in bodies if e["state"] == state), None)
        return wait_until(find, timeout, f"a {state} webhook")  # type: ignore[no-any-return]


def cli(data: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """The gateway CLI; its webhook checks allow the tests' loopback receivers unless `env` says otherwise."""
    out = subprocess.run([sys.executable, "-m", "gateway", *args, "--json", "--data-dir", str(data)],
                         capture_output=True, timeout=30, cwd=ROOT, check=True,
                         env={**os.environ, **ALLOW_LOOPBACK, **(env or {})})
    return json.loads(out.stdout)


class VoiceClient:
    def __init__(self, gw: Gateway, app_id: str, app_key: str) -> None:
        """`gw`: a test Gateway, or anything with the worker's `http_port` (a worker of a cluster: plain HTTP)."""
        self.gw, self.app_id, self.app_key = gw, app_id, app_key
        self.base = getattr(gw, "api_url", f"http://127.0.0.1:{gw.http_port}")
        self.tls = getattr(gw, "tls", None)

    def __call__(self, method: str, path: str, body: Any = None, auth: str | None = "") -> tuple[int, Any, dict[str, str]]:
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        creds = f"{self.app_id}:{self.app_key}" if auth == "" else auth
        if creds is not None:
            req.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.tls) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def far_phone(port: int, *args: str, timeout: int = 90) -> subprocess.Popen[str]:
    """sipp as the trunk + far phone (UAS) on `port`: one call, then it exits (0 = the call went as scripted)."""
    media = media_block()
    cmd = ["sipp", "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(media), "-rtp_echo",
           "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error", *args]
    phone = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # ready once its SIP port is taken; if sipp gave up at start (a port it wanted was in use), say why
    wait_until(lambda: phone.poll() is not None or udp_taken(port), 10, f"the far phone's sipp on port {port}")
    if phone.poll() is not None:
        raise AssertionError(f"the far phone's sipp exited at start ({phone.returncode}): {phone.communicate()[0][-2000:]}")
    return phone


def udp_taken(port: int) -> bool:
    """Whether a UDP socket is bound to `port` (read from /proc/net/udp: trying to bind it would race sipp)."""
    suffix = f":{port:04X}"
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1].endswith(suffix) for line in lines if len(line.split()) > 1)
