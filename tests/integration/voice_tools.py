"""Helpers for the Voice API tests: a webhook receiver, the API client, sipp as the far phone."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.api.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import ROOT, Gateway, wait_until


class HookServer:
    """Records every webhook POST (headers + raw body); start() may come later than the URL is handed out."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with hooks.lock:
                    hooks.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def events(self, voice_id: str, key: str | None = None) -> list[dict[str, Any]]:
        """This call's events in arrival order (duplicates from at-least-once delivery removed); with `key`,
        every signature is checked too."""
        out, seen = [], set()
        with self.lock:
            received = list(self.received)
        for headers, body in received:
            event = json.loads(body)
            if event["voice_id"] != voice_id or event["event_id"] in seen:
                continue
            if key is not None:
                assert verify(key, body, headers[SIGNATURE_HEADER.lower()]), "bad webhook signature"
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


def cli(data: Path, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(data)], capture_output=True,
                         timeout=30, cwd=ROOT, check=True)
    return json.loads(out.stdout)


class VoiceClient:
    def __init__(self, gw: Gateway, app_id: str, app_key: str) -> None:
        self.gw, self.app_id, self.app_key = gw, app_id, app_key

    def __call__(self, method: str, path: str, body: Any = None, auth: str | None = "") -> tuple[int, Any, dict[str, str]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.gw.http_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        creds = f"{self.app_id}:{self.app_key}" if auth == "" else auth
        if creds is not None:
            req.add_header("Authorization", "Basic " + base64.b64encode(creds.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def far_phone(port: int, *args: str, timeout: int = 90) -> subprocess.Popen[str]:
    """sipp as the trunk + far phone (UAS) on `port`: one call, then it exits (0 = the call went as scripted)."""
    media = random.randrange(40000, 60000, 2)
    cmd = ["sipp", "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(media), "-rtp_echo",
           "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
