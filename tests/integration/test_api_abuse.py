"""Attacks on the Voice API (issue 11, findings 2, 7 and 9), each performed over real sockets against a running
worker; loopback addresses other than 127.0.0.1 stand in for strangers.

    finding 2  bad-auth floods: 429 per source after api.auth_failures_per_source, one warning per source and
               window, and 20,000 requests with random 5.8 KB app_ids from 2,000 addresses leave RSS flat
    finding 7  dial-out abuse: non-ASCII digits, sip: URIs with parameters/headers, premium-rate prefixes, sip:
               only where the project allows it, per-project caps on concurrent calls and calls per minute
    finding 9  unauthenticated garbage (non-ASCII Basic credentials, ?limit=¹, deep JSON, unparseable HTTP):
               always 4xx, one log line, no traceback
A legitimate dial-out through sipp (the far phone) still joins its room.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, free_port, make_test_config, start_gateway, stop_gateway, stop_process, wait_until
from tests.integration.voice_tools import cli, far_phone

ACME, CAPPED, SIPPY = "15550108801", "15550108802", "15550108803"  # each project's caller ID


class Blackhole:
    """A trunk that never answers: it records every datagram (the INVITEs that reached "the carrier")."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, _ = self.sock.recvfrom(65535)
            except OSError:
                return
            with self.lock:
                self.received.append(data)

    def invites(self, from_user: str) -> dict[str, str]:
        """Call-ID -> Request-Line of the INVITEs sent with this caller ID."""
        with self.lock:
            packets = list(self.received)
        out = {}
        for p in packets:
            text = p.decode("utf-8", "replace")
            if text.startswith("INVITE ") and f"sip:{from_user}@" in text:
                call_id = re.search(r"^Call-ID:\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
                out[call_id[1] if call_id else ""] = text.split("\r\n", 1)[0]
        return out

    def close(self) -> None:
        self.sock.close()


@dataclass
class Api:
    gw: Gateway
    uas_port: int
    blackhole: Blackhole
    rooms: dict[str, dict[str, Any]]  # a room of each project
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def creds(self, name: str) -> str:
        p = self.projects[name]
        return f"{p['app_id']}:{p['app_key']}"


def request(port: int, method: str, path: str, *, source: str = "127.0.0.1", auth: str | bytes | None = None,
            body: bytes | None = None, raw: bytes | None = None, extra: tuple[bytes, ...] = ()) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request from `source` over a fresh connection; `auth` is app_id:key (Basic is encoded here)
    or the raw bytes of an Authorization value; `raw` replaces the whole request."""
    if raw is None:
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway", b"Connection: close"]
        if auth is not None:
            value = auth if isinstance(auth, bytes) else b"Basic " + base64.b64encode(auth.encode())
            head.append(b"Authorization: " + value)
        head += extra
        if body is not None:
            head += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
        raw = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        parsed: Any = json.loads(payload)
    except ValueError:
        parsed = payload
    return int(lines[0].split()[1]), headers, parsed


def dial(api: Api, project: str, to: str, number: str) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"from": number, "to": to, "name": "Test"}).encode()
    return request(api.gw.http_port, "POST", f"/voice/v1/room/{api.rooms[project]['room_id']}/join",
                   auth=api.creds(project), body=body)


def log_events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    out = []
    for line in gw.log().splitlines():
        if f'"{name}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return [e for e in out if e.get("event") == name]


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("abuse")
    data = tmp / "data"
    blackhole = Blackhole()
    uas_port = free_port()
    extra = f"""
[[api.projects]]
name = "capped"
max_outbound_calls = 2
outbound_calls_per_minute = 3

[[api.projects]]
name = "sippy"
allow_sip_uri = true

[[trunks]]
name = "carrier"
sources = []
[trunks.outbound]
proxy = "sip:127.0.0.1:{uas_port}"

[[trunks]]
name = "blackhole"
sources = []
[trunks.outbound]
proxy = "sip:127.0.0.1:{blackhole.port}"
"""
    config = tmp / "abuse.toml"
    config.write_text(make_test_config(extra))
    projects = {name: cli(data, "projects", "create", "--name", name, "--number", number, "--outbound-only",
                          "--trunk", trunk, "--config", str(config))
                for name, number, trunk in (("acme", ACME, "carrier"), ("capped", CAPPED, "blackhole"),
                                            ("sippy", SIPPY, "blackhole"))}
    rooms = {name: cli(data, "rooms", "create", "--name", f"{name} room", "--project", name) for name in projects}
    gw = start_gateway(tmp, config.read_text(), env={"GATEWAY_API_RING_TIMEOUT_S": "5"})
    try:
        wait_until(lambda: '"rooms.started"' in gw.log(), 90, "the room service")
        yield Api(gw, uas_port, blackhole, rooms, projects)
    finally:
        stop_gateway(gw)
        blackhole.close()


# -- finding 2: authentication failures per source ------------------------------------------------------------

def test_auth_failures_from_one_source_get_429_and_one_warning(api: Api) -> None:
    port, stranger = api.gw.http_port, "127.0.0.2"
    acme = api.projects["acme"]
    guesses = [f"{acme['app_id']}:guess{i}" for i in range(10)] + [f"{secrets.token_hex(16)}:x" for i in range(10)]
    for i, creds in enumerate(guesses):  # api.auth_failures_per_source = 20 (the default)
        spoof = (f"X-Forwarded-For: 198.51.100.{i}".encode(),)  # no trusted proxies: the header must not count
        status, headers, body = request(port, "GET", "/voice/v1/calls", source=stranger, auth=creds, extra=spoof)
        assert status == 401 and body["error"]["code"] == "unauthorized", body
    for creds in [f"{acme['app_id']}:guess", api.creds("acme")] * 20:  # blocked: even the right key waits
        status, headers, body = request(port, "GET", "/voice/v1/calls", source=stranger, auth=creds)
        assert status == 429 and body["error"]["code"] == "too_many_auth_failures", body
        assert 1 <= int(headers["retry-after"]) <= 60 and headers["content-type"].startswith("application/json")
    # the application itself, from its own address, is not affected
    status, _, body = request(port, "GET", "/voice/v1/calls", auth=api.creds("acme"))
    assert status == 200 and "calls" in body
    # one warning for the source in this window, not one per request
    blocked = [e for e in log_events(api.gw, "api.auth_blocked") if e.get("source") == stranger]
    assert len(blocked) == 1 and blocked[0]["level"] == "warning", blocked
    assert acme["app_key"] not in api.gw.log()


async def _flood(port: int, sources: list[str], per_source: int, app_id_chars: int) -> Counter[int]:
    """Bad-auth requests with random app_ids of `app_id_chars` characters, keep-alive, one connection per source."""
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(64)

    async def one(source: str) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            try:
                for _ in range(per_source):
                    creds = base64.b64encode(f"{secrets.token_hex(app_id_chars // 2)}:x".encode()).decode()
                    writer.write(f"GET /voice/v1/calls HTTP/1.1\r\nHost: gateway\r\nAuthorization: Basic {creds}\r\n\r\n"
                                 .encode())
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
                    await reader.readexactly(int(length[1]) if length else 0)
                    statuses[int(head.split()[1])] += 1
            finally:
                writer.close()

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in sources)), 240)
    return statuses


@pytest.mark.serial  # measures memory
@pytest.mark.timeout(300)
def test_bad_auth_flood_from_many_addresses_leaves_memory_flat(api: Api) -> None:
    """20,000 requests with random 5.8 KB app_ids (the issue's attack: 185 -> 310 MB), spread over 2,000 source
    addresses so that no single one is blocked: the worker's RSS must not grow with them."""
    port, pid = api.gw.http_port, api.gw.proc.pid
    asyncio.run(_flood(port, [f"127.3.0.{i}" for i in range(1, 41)], 10, 5800))  # warm up the request paths
    before = rss_kb(pid)
    sources = [f"127.4.{i // 250}.{i % 250 + 1}" for i in range(2000)]
    statuses = asyncio.run(_flood(port, sources, 10, 5800))
    after = rss_kb(pid)
    assert statuses == Counter({401: 20000}), statuses
    print(f"worker RSS before {before / 1024:.1f} MB, after 20,000 bad-auth requests {after / 1024:.1f} MB")
    assert after - before < 25 * 1024, f"RSS grew from {before} kB to {after} kB"
    assert request(port, "GET", "/voice/v1/calls", auth=api.creds("acme"))[0] == 200


# -- finding 9: errors on unauthenticated input ---------------------------------------------------------------

def test_garbage_input_gets_4xx_and_one_line_without_traceback(api: Api) -> None:
    port, stranger = api.gw.http_port, "127.0.0.5"
    acme = api.projects["acme"]
    lines_before = len(api.gw.log().splitlines())
    for value in (b"Basic \xc3\xa9\xff==",  # non-ASCII bytes in the header itself
                  b"Basic " + base64.b64encode(b"\xff\xfe:\xc3"),  # not UTF-8 once decoded
                  b"Basic " + base64.b64encode("nobody:kéy".encode()),  # non-ASCII key, unknown app_id
                  b"Basic " + base64.b64encode(f"{acme['app_id']}:kéy".encode()),  # ... and a known one
                  b"Basic " + base64.b64encode("ünïcode:x".encode()),
                  b"Basic !!!", b"Bearer x", b"Basic " + b"A" * 6000):
        status, _, body = request(port, "GET", "/voice/v1/calls", source=stranger, auth=value)
        assert status == 401 and body["error"]["code"] == "unauthorized", (value, body)
    creds = api.creds("acme")
    for query in ("%C2%B9", "%C2%B2%C2%B3", "%EF%BC%95", "1e3", "-1", "%FF", "9" * 30):  # ¹, ²³, full-width 5
        status, _, body = request(port, "GET", f"/voice/v1/calls?limit={query}", auth=creds)
        assert status == 400 and body["error"]["field"] == "limit", (query, body)
    room = api.rooms["acme"]["room_id"]
    for payload in (b"[" * 16000, b'{"from": "' + ACME.encode() + b'", "to": "15551230001", "name": "\\ud800"}',
                    b'{"from": "' + ACME.encode() + b'", "to": "15551230001", "name": "a\\u0000b"}', b"\xff\xfe"):
        status, _, body = request(port, "POST", f"/voice/v1/room/{room}/join", auth=creds, body=payload)
        assert status == 400, (payload[:40], body)
    for path in ("/voice/v1/calls/%00", "/voice/v1/calls/%ED%A0%80", "/voice/v1/room/%00/call/%FF/join"):
        status, _, body = request(port, "GET" if "join" not in path else "PUT", path, auth=creds)
        assert 400 <= status < 500, (path, body)
    # HTTP that aiohttp cannot parse: 400 from the server, and one line (http.malformed) instead of a traceback
    for raw in (b"GET /voice/v1/calls HTTP/1.1\r\nHo\xffst: x\r\n\r\n", b"GET /voice/v1/calls?x=\xff HTTP/1.1\r\n\r\n"):
        assert request(port, "GET", "", source=stranger, raw=raw)[0] == 400
    new = api.gw.log().splitlines()[lines_before:]
    wait_until(lambda: len(log_events(api.gw, "http.malformed")) >= 2, 5, "the malformed-request lines")
    assert not [line for line in new if "Traceback" in line or '"exc"' in line or '"api.failed"' in line], new
    refused = [e for e in log_events(api.gw, "api.rejected") if e.get("source") == stranger]
    assert [e["status"] for e in refused] == [401] * 8  # one line per refused request
    assert acme["app_key"] not in api.gw.log()


# -- finding 7: dial-out abuse --------------------------------------------------------------------------------

def test_dial_out_destinations_are_checked(api: Api) -> None:
    denied = ["+19005550100", "19765550100", "+447000123456", "+4990012345678", "+881612345678", "+979123456789"]
    for to in denied:
        status, _, body = dial(api, "acme", to, ACME)
        assert status == 403 and body["error"] == {**body["error"], "code": "destination_not_allowed", "field": "to"}, \
            (to, body)
    malformed = ["+١٥٥٥٠١٠٠٠٠٠", "+1555０１００００", "+¹⁵⁵⁵⁰¹⁰⁰⁰⁰⁰", "sip:19005550100@10.0.0.1;maddr=127.0.0.1?X-Evil=1",
                 "sip:bob@example.com;transport=tcp", "sip:bob@example.com?Subject=x", "sip:bob:pw@example.com",
                 "sip:b%3Bob@example.com", "sips:bob@example.com", "tel:+15551230001", "sip:bob@exa mple.com",
                 "<sip:bob@example.com>", "15551230001\r\nX-Evil: 1"]
    for project, number in (("acme", ACME), ("sippy", SIPPY)):  # malformed even where sip: URIs are allowed
        for to in malformed:
            status, _, body = dial(api, project, to, number)
            assert status == 400 and body["error"]["field"] == "to", (project, to, body)
    status, _, body = dial(api, "acme", "15551230001", "+١٥٥٥٠١٠٨٨٠١")
    assert status == 400 and body["error"]["field"] == "from", body
    # sip: targets only where the project allows them, and numbers inside them still meet the prefix rules
    status, _, body = dial(api, "acme", "sip:bob@example.com", ACME)
    assert status == 403 and body["error"]["field"] == "to", body
    status, _, body = dial(api, "sippy", "sip:19005550100@10.0.0.1", SIPPY)
    assert status == 403 and body["error"]["code"] == "destination_not_allowed", body
    status, _, body = dial(api, "sippy", "sip:bob@127.0.0.1:5099", SIPPY)
    assert status == 200, body
    wait_until(lambda: api.blackhole.invites(SIPPY), 10, "sippy's INVITE at the trunk")
    assert list(api.blackhole.invites(SIPPY).values()) == ["INVITE sip:bob@127.0.0.1:5099 SIP/2.0"]
    assert api.blackhole.invites(ACME) == {}  # acme's trunk is the carrier; nothing refused reached any trunk
    with api.blackhole.lock:
        reached = b"".join(api.blackhole.received)
    assert b"maddr" not in reached and b"X-Evil" not in reached and b"1900" not in reached


def _ended(api: Api, project: str, voice_id: str) -> bool:
    status, _, body = request(api.gw.http_port, "GET", f"/voice/v1/calls/{voice_id}", auth=api.creds(project))
    return status == 200 and body["state"] == "disconnected"


def test_project_caps_on_concurrent_calls_and_calls_per_minute(api: Api) -> None:
    """Project "capped": at most 2 calls at a time and 3 a minute; its trunk never answers (ring timeout 5 s)."""
    first = [dial(api, "capped", f"+1555123000{i}", CAPPED) for i in range(2)]
    assert [s for s, _, _ in first] == [200, 200], first
    status, headers, body = dial(api, "capped", "+15551230009", CAPPED)
    assert status == 429 and body["error"]["code"] == "too_many_concurrent_calls", body
    assert int(headers["retry-after"]) >= 1
    # another project is not affected by capped's calls
    status, _, body = dial(api, "sippy", "+15551230010", SIPPY)
    assert status == 200, body
    for _, _, b in first:
        wait_until(lambda b=b: _ended(api, "capped", b["voice_id"]), 30, "the unanswered call to time out")
    status, _, body = dial(api, "capped", "+15551230003", CAPPED)
    assert status == 200, body  # the third call of the minute
    status, headers, body = dial(api, "capped", "+15551230004", CAPPED)
    assert status == 429 and body["error"]["code"] == "too_many_calls", body
    assert 1 <= int(headers["retry-after"]) <= 60
    wait_until(lambda: len(api.blackhole.invites(CAPPED)) == 3, 10, "three INVITEs")
    assert len(api.blackhole.invites(CAPPED)) == 3  # refused calls never reached the trunk


# -- what must keep working -----------------------------------------------------------------------------------

def test_legitimate_dial_out_still_joins_the_room(api: Api) -> None:
    phone = far_phone(api.uas_port, "-sn", "uas")
    try:
        status, _, body = dial(api, "acme", "+15551230001", ACME)
        assert status == 200 and body["state"] == "initiated", body
        vid = body["voice_id"]
        creds = api.creds("acme")

        def phase() -> str | None:
            return request(api.gw.http_port, "GET", f"/voice/v1/calls/{vid}", auth=creds)[2].get("phase")

        wait_until(lambda: phase() == "in_room", 30, "the dialled phone in the room")
        room = api.rooms["acme"]["room_id"]
        assert request(api.gw.http_port, "DELETE", f"/voice/v1/room/{room}/call/{vid}", auth=creds)[0] == 200
        out, _ = phone.communicate(timeout=30)
        assert phone.returncode == 0, out
    finally:
        stop_process(phone)


@pytest.mark.timeout(400)
def test_schemathesis_negative_and_positive_finds_no_server_errors(api: Api, tmp_path: Path) -> None:
    """Last in the module: schemathesis's negative cases may include malformed credentials from 127.0.0.1."""
    auth = base64.b64encode(api.creds("acme").encode()).decode()
    url = f"http://127.0.0.1:{api.gw.http_port}/voice/v1/openapi.json"
    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    out = subprocess.run([schemathesis, "run", url, "-H", f"Authorization: Basic {auth}", "-c", "not_a_server_error",
                          "-n", "40", "--no-color", "--seed", "11", "--request-timeout", "30"],
                         capture_output=True, text=True, timeout=380, cwd=tmp_path)  # its cache stays out of the tree
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert not [line for line in api.gw.log().splitlines() if '"api.failed"' in line]
