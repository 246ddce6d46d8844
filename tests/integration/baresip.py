"""Drive baresip (a real softphone) headless through its ctrl_tcp netstring JSON interface."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port, wait_until

MODULES = ["g711.so", "aufile.so", "aubridge.so", "sndfile.so", "account.so", "menu.so", "ctrl_tcp.so"]


class Baresip:
    def __init__(self, workdir: Path, source_wav: Path, record: bool = True, ca_file: Path | None = None,
                 certificate: Path | None = None, answer: bool = False, user: str = "caller", mediaenc: str = "",
                 host: str = "127.0.0.1") -> None:
        """`ca_file`: the CA (or self-signed certificate) baresip trusts for SIP over TLS; `certificate`: its own
        (certificate and key in one PEM) for the TLS listener, on `tls_port`; `answer`: answer calls by itself;
        `mediaenc`: its srtp module's mode ("srtp-mand": RTP/SAVP with SDES keys, "srtp": best-effort RTP/AVP with
        keys); `host`: the loopback address it uses for SIP and RTP."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sip_port = free_port(count=2)  # baresip's TLS transport listens on the next port
        self.ctrl_port = free_port()
        self.rec_dir = workdir / "rec"
        self.rec_dir.mkdir(exist_ok=True)
        modules = [m for m in MODULES if record or m != "sndfile.so"] + (["srtp.so"] if mediaenc else [])
        (workdir / "config").write_text("\n".join([
            "poll_method epoll",
            f"sip_listen {host}:{self.sip_port}",
            f"net_interface {host}",
            "net_prefer_ipv6 no",
            f"audio_source aufile,{source_wav}",
            "audio_player aubridge,nowhere",
            "audio_alert aubridge,nowhere",
            "audio_srate 8000",
            "audio_channels 1",
            "module_path /usr/lib/baresip/modules",
            *[f"module {m}" for m in modules if m not in ("account.so", "menu.so", "ctrl_tcp.so")],
            *[f"module_app {m}" for m in ("account.so", "menu.so", "ctrl_tcp.so")],
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            f"snd_path {self.rec_dir}",
            "rtp_timeout 0",
            *([f"sip_cafile {ca_file}"] if ca_file else []),
            *([f"sip_certificate {certificate}"] if certificate else []),
            "",
        ]))
        self.tls_port = self.sip_port + 1
        options = (";answermode=auto" if answer else "") + (f";mediaenc={mediaenc}" if mediaenc else "")
        (workdir / "accounts").write_text(f"<sip:{user}@{host}>;regint=0;audio_codecs=PCMU/8000/1{options}\n")
        (workdir / "contacts").write_text("")
        self.log = (workdir / "baresip.log").open("wb")
        self.proc = subprocess.Popen(["baresip", "-f", str(workdir)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.sock = wait_until(self._connect, 15, "baresip ctrl_tcp")
        self.sock.settimeout(1.0)
        self._buf = b""
        self.events: list[dict] = []  # type: ignore[type-arg]

    def _connect(self) -> socket.socket | None:
        if self.proc.poll() is not None:
            raise AssertionError("baresip exited: " + (self.dir / "baresip.log").read_text())
        try:
            return socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1)
        except OSError:
            return None

    def command(self, command: str, params: str = "") -> None:
        body = json.dumps({"command": command, "params": params, "token": str(time.monotonic_ns())}).encode()
        self.sock.sendall(str(len(body)).encode() + b":" + body + b",")

    def _read(self) -> None:
        try:
            self._buf += self.sock.recv(65536)
        except TimeoutError:
            return
        while b":" in self._buf:
            length, _, rest = self._buf.partition(b":")
            if not length.isdigit() or len(rest) < int(length) + 1:
                return
            self.events.append(json.loads(rest[: int(length)]))
            self._buf = rest[int(length) + 1 :]

    def wait_event(self, kind: str, timeout: float = 15) -> dict:  # type: ignore[type-arg]
        def found() -> dict | None:  # type: ignore[type-arg]
            self._read()
            for ev in self.events:
                if ev.get("type") == kind:
                    self.events.remove(ev)
                    return ev
            return None

        return wait_until(found, timeout, f"baresip event {kind}", interval=0.0)

    def talk(self, uri: str, seconds: float) -> dict:  # type: ignore[type-arg]
        """Dial `uri`, stay `seconds` once established (the scenario's length, not a wait for anything), hang up;
        the CALL_CLOSED event."""
        self.command("dial", uri)
        self.wait_event("CALL_ESTABLISHED", 20)
        time.sleep(seconds)
        self.command("hangup")
        return self.wait_event("CALL_CLOSED")

    def close(self) -> None:
        try:
            self.command("quit")
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.sock.close()
        self.log.close()
