"""The CPaaS project API (issue 15, part A) over real HTTP against `gateway run`: the operator's and a project's
credentials, the document's result/error shape and codes, a key reset that the room service (another process)
honours at once, the voice and video settings, a PATCHed welcome text heard by the next caller (sipp, the audio
captured on the wire and compared with the new rendering), and schemathesis against the OpenAPI document."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.apps.prompts import PromptLibrary, read_wav
from tests.conftest import ROOT, Gateway, make_test_config, run_sipp, scenario, start_gateway, stop_gateway, wait_until
from tests.integration.ivr_tools import heard_by_caller
from tests.integration.voice_tools import VoiceClient

IVR_NUMBER = "15550107777"  # given route "ivr" through the API
API_NUMBER = "+15550108888"
NEW_WELCOME = "Hello from the project interface. This greeting was changed over HTTP."


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("cpaas"), make_test_config())
    wait_until(lambda: '"prompts.ready"' in gateway.log(), 60, "prompts rendered")
    wait_until(lambda: rooms_up(gateway), 30, "the room service")
    yield gateway
    stop_gateway(gateway)


def rooms_up(gw: Gateway) -> bool:
    try:
        with urllib.request.urlopen(f"{gw.rooms_url}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def operator(gw: Gateway) -> VoiceClient:
    key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
    return VoiceClient(gw, "demo", key)


def project_client(gw: Gateway, created: dict[str, Any]) -> VoiceClient:
    return VoiceClient(gw, created["app_id"], created["app_key"])


def create(gw: Gateway, name: str, **extra: Any) -> dict[str, Any]:
    status, body, _ = operator(gw)("POST", "/cpaas/projects", {"app_name": name, "category_id": 3,
                                                                "services_incl": ["voice", "video"], **extra})
    assert status == 201 and body["result"] == 1, body
    return body  # type: ignore[no-any-return]


def refused(response: tuple[int, Any, dict[str, str]], status: int, code: int, field: str | None = None) -> None:
    got, body, _ = response
    assert (got, body.get("result"), body.get("error")) == (status, 0, code), (got, body)
    assert isinstance(body.get("desc"), str) and body["desc"]
    if field is not None:
        assert body.get("field") == field, body


def test_create_list_page_search_and_edit(gw: Gateway) -> None:
    op = operator(gw)
    refused(op("POST", "/cpaas/projects", {"app_name": "x", "category_id": 3}), 400, 1009, "services_incl")
    refused(op("POST", "/cpaas/projects", {"app_name": "x", "category_id": 99, "services_incl": ["voice"]}), 400, 1008,
            "category_id")
    refused(op("POST", "/cpaas/projects", {"app_name": "x", "category_id": 3, "services_incl": ["sms"]}), 400, 1009,
            "services_incl")
    refused(op("POST", "/cpaas/projects", {"app_name": "x", "category_id": 3, "services_incl": ["voice"],
                                           "ftp": {"host": "x"}}), 400, 1012, "ftp")
    refused(op("POST", "/cpaas/projects", {"category_id": 3, "services_incl": ["voice"]}), 400, 1005, "app_name")
    refused(op("POST", "/cpaas/projects", [1, 2]), 400, 1004)
    made = [create(gw, f"Paging {i}", short_desc=f"number {i}") for i in range(3)]
    refused(op("POST", "/cpaas/projects", {"app_name": "Paging 0", "category_id": 3, "services_incl": ["voice"]}),
            409, 1013, "app_name")
    assert len(made[0]["app_key"]) >= 32 and made[0]["project"]["app_key_fingerprint"]

    status, body, _ = op("GET", "/cpaas/projects?app_name=paging&per_page=2&page=2")
    assert status == 200 and body["result"] == 1, body
    assert body["search"] == {"app_name": "paging", "page": 2, "per_page": 2, "order": "asc", "total": 3,
                              "total_pages": 2}
    assert [p["app_name"] for p in body["projects"]] == ["Paging 2"]
    _, body, _ = op("GET", "/cpaas/projects?app_name=paging&order=desc")
    assert [p["app_name"] for p in body["projects"]] == ["Paging 2", "Paging 1", "Paging 0"]
    refused(op("GET", "/cpaas/projects?page=0"), 400, 1101, "page")
    refused(op("GET", "/cpaas/projects?page=%C2%B2"), 400, 1101, "page")  # "²": not an ASCII digit
    refused(op("GET", "/cpaas/projects?app_name=paging&per_page=2&page=3"), 400, 1102, "page")
    refused(op("GET", "/cpaas/projects?order=sideways"), 400, 1105, "order")

    first = made[0]
    status, body, _ = op("POST", f"/cpaas/projects/{first['app_id']}", {"app_name": "Renamed", "description": "d",
                                                                       "category_id": "5"})
    assert status == 200 and body["project"]["app_name"] == "Renamed" and body["project"]["category_id"] == 5
    assert body["project"]["name"] == "Paging 0", "the internal name (rooms, DIDs, the CLI) stays"
    status, body, _ = op("GET", f"/cpaas/projects/{first['app_id']}")
    assert status == 200 and body["project"]["description"] == "d"
    refused(op("GET", "/cpaas/projects/0123456789abcdef0123456789abcdef"), 404, 1007, "app_id")


def test_a_project_sees_and_changes_only_itself(gw: Gateway) -> None:
    mine, other = create(gw, "Mine"), create(gw, "Other")
    me = project_client(gw, mine)
    status, body, _ = me("GET", "/cpaas/projects")
    assert status == 200 and [p["app_id"] for p in body["projects"]] == [mine["app_id"]]
    refused(me("GET", f"/cpaas/projects/{other['app_id']}"), 403, 1002, "app_id")
    refused(me("PATCH", f"/cpaas/projects/{other['app_id']}/voice", {"out": False}), 403, 1002)
    refused(me("POST", "/cpaas/projects", {"app_name": "Mine too", "category_id": 3, "services_incl": ["voice"]}),
            403, 1002)
    status, body, _ = me("POST", f"/cpaas/projects/{mine['app_id']}", {"short_desc": "edited by itself"})
    assert status == 200 and body["project"]["short_desc"] == "edited by itself"
    status, body, headers = VoiceClient(gw, mine["app_id"], "wrong-key")("GET", "/cpaas/projects")
    assert (status, body["result"], body["error"]) == (401, 0, 1001) and "Basic" in headers["WWW-Authenticate"]
    assert "wrong-key" not in gw.log()


def test_reset_key_ends_the_old_key_at_once_in_every_process(gw: Gateway) -> None:
    made = create(gw, "Rotating")
    old = project_client(gw, made)
    rooms_old = VoiceClient(gw, made["app_id"], made["app_key"])
    rooms_old.base = gw.rooms_url
    assert rooms_old("GET", "/video/v1/rooms/nonexistent")[0] == 404, "the room service knows the key"
    status, body, _ = old("POST", f"/cpaas/projects/{made['app_id']}/reset_key")
    assert status == 200 and body["result"] == 1 and body["app_key"] != made["app_key"]
    # no wait: the room service (its own process and project cache) refuses the old key on the next request
    assert rooms_old("GET", "/video/v1/rooms/nonexistent")[0] == 401
    assert old("GET", "/voice/v1/calls")[0] == 401
    new = VoiceClient(gw, made["app_id"], body["app_key"])
    assert new("GET", "/voice/v1/calls")[0] == 200
    new.base = gw.rooms_url
    assert new("GET", "/video/v1/rooms/nonexistent")[0] == 404
    assert body["app_key"] not in gw.log()


def test_voice_settings_validation_and_what_they_change(gw: Gateway, tmp_path: Path) -> None:
    made, rival = create(gw, "Voice settings"), create(gw, "Rival")
    me = project_client(gw, made)
    path = f"/cpaas/projects/{made['app_id']}/voice"
    refused(me("PATCH", path, {"phone": [{"phone": "555-CALL"}]}), 400, 1005, "phone[0].phone")
    refused(me("PATCH", path, {"phone": [{"phone": API_NUMBER}, {"phone": API_NUMBER}]}), 400, 1005, "phone[1].phone")
    refused(me("PATCH", path, {"inbound": {"language": "../../etc"}}), 400, 1005, "inbound.language")
    refused(me("PATCH", path, {"inbound": {"voice_type": "robot"}}), 400, 1005, "inbound.voice_type")
    refused(me("PATCH", path, {"inbound": {"recording": {"s3": "bucket"}}}), 400, 1012, "inbound.recording")
    refused(me("PATCH", path, {"inbound": {"event_url": "http://user:pw@127.0.0.1/x"}}), 400, 1005, "inbound.event_url")
    refused(me("PATCH", path, {"in": "yes"}), 400, 1005, "in")
    refused(me("PATCH", path, {"forward_pool": "nowhere"}), 400, 1005, "forward_pool")
    refused(me("PATCH", path, {"phone": [{"phone": "15550100000"}]}), 409, 1010, "phone[0].phone")  # the demo DID
    status, body, _ = me("PATCH", path, {"phone": [{"phone": API_NUMBER, "country": "US", "country_code": "1"}],
                                         "out": False, "inbound": {"auto_record": True}})
    assert status == 200, body
    voice = body["project"]["voice"]
    assert voice["out"] is False and voice["inbound"]["auto_record"] is True
    assert voice["phone"] == [{"phone": API_NUMBER, "in": True, "out": True, "country": "US", "country_code": "1",
                               "route": "api"}]
    refused(project_client(gw, rival)("PATCH", f"/cpaas/projects/{rival['app_id']}/voice",
                                      {"phone": [{"phone": API_NUMBER.lstrip("+")}]}), 409, 1010, "phone[0].phone")
    # out = false: the Voice API dials nothing for the project
    status, body, _ = me("POST", "/voice/v1/room/any/join", {"from": API_NUMBER, "to": "15551230000"})
    assert status == 403 and body["error"]["code"] == "outbound_disabled", body
    # in = false: a call to the project's number is refused with 403 (sipp sees it), counted
    assert me("PATCH", path, {"in": False})[0] == 200
    sf = scenario(tmp_path, "rejected.xml", status="403")
    r = run_sipp(gw.sip, "-sf", str(sf), "-s", API_NUMBER.lstrip("+"), "-m", "1", timeout=30)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    wait_until(lambda: '"reason": "inbound_disabled"' in gw.log(), 10, "the refusal logged")
    # a project declared in the configuration file keeps what the file says
    _, listing, _ = operator(gw)("GET", "/cpaas/projects?app_name=demo")
    demo = next(p for p in listing["projects"] if p["name"] == "demo")
    assert demo["managed_by"] == "config"
    refused(operator(gw)("PATCH", f"/cpaas/projects/{demo['app_id']}/voice", {"inbound": {"welcome_text": "hi"}}),
            409, 1011, "inbound.welcome_text")


def test_video_phone_numbers_are_what_room_pages_show(gw: Gateway) -> None:
    made = create(gw, "Video numbers")
    me = project_client(gw, made)
    refused(me("PATCH", f"/cpaas/projects/{made['app_id']}/video", {"embed": True}), 400, 1012, "embed")
    status, body, _ = me("PATCH", f"/cpaas/projects/{made['app_id']}/video",
                         {"phone": [{"phone": "+442071838750", "country": "GB", "country_code": "44"}],
                          "notification_url": "http://127.0.0.1:9/video-events"})
    assert status == 200 and body["project"]["video"]["notification_url"] == "http://127.0.0.1:9/video-events"
    rooms = VoiceClient(gw, made["app_id"], made["app_key"])
    rooms.base = gw.rooms_url
    status, room, _ = rooms("POST", "/video/v1/rooms", {"name": "Shown numbers", "settings": {"sip": {"enabled": True}}})
    assert status in (200, 201), room
    room_id = room.get("room", room)["room_id"]
    status, info, _ = rooms("GET", f"/rooms/{room_id}/info", auth=None)
    assert status == 200 and info["dial_in"]["numbers"] == ["+442071838750"], info


def _matches(heard: np.ndarray, prompt: np.ndarray) -> bool:
    n = min(len(heard), len(prompt), 8000)
    if n < 4000:
        return False
    a, b = heard[:n], prompt[:n]
    return max(abs(np.corrcoef(a[k:], b[: n - k])[0, 1]) for k in range(0, 400) if np.std(a[k:]) > 0) > 0.9


def test_a_patched_welcome_text_is_what_the_next_caller_hears(gw: Gateway, tmp_path: Path) -> None:
    made = create(gw, "Greeting")
    me = project_client(gw, made)
    status, body, _ = me("PATCH", f"/cpaas/projects/{made['app_id']}/voice",
                         {"phone": [{"phone": IVR_NUMBER, "route": "ivr"}], "inbound": {"welcome_text": NEW_WELCOME}})
    assert status == 200, body

    def ready() -> bool:
        return me("GET", f"/cpaas/projects/{made['app_id']}")[1]["project"]["voice"]["inbound"]["prompts"] == "ready"

    wait_until(ready, 90, "the new welcome text rendered")
    rendering = PromptLibrary(ROOT / "prompts", gw.data_dir / "prompts-cache").cache_path(NEW_WELCOME, "en-US", "female")
    expected = read_wav(rendering).astype(float)
    heard = heard_by_caller(gw, tmp_path, IVR_NUMBER, 3000, port_offset=10)[: 8000 * 2]
    assert np.sqrt(np.mean(heard**2)) > 500, "the caller hears speech"
    assert _matches(heard, expected), "what the caller hears is the new welcome text's rendering"


@pytest.mark.timeout(300)
def test_schemathesis_on_the_project_api_finds_no_server_errors(gw: Gateway, tmp_path: Path) -> None:
    key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
    auth = base64.b64encode(f"demo:{key}".encode()).decode()
    url = f"http://127.0.0.1:{gw.http_port}/cpaas/openapi.json"
    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    out = subprocess.run([schemathesis, "run", url, "-H", f"Authorization: Basic {auth}", "-c", "not_a_server_error",
                          "--include-path-regex", "^/cpaas/", "-n", "30", "--no-color", "--seed", "15",
                          "--request-timeout", "30"], capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert not [line for line in gw.log().splitlines() if '"api.failed"' in line]
