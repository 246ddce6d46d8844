"""The sip_forward connector's parts without sockets: its configuration (pools, headers, per-DID and per-project
choice), the header templates, the Request-URI, failover codes, member order, RFC 4733 re-stamping, following a
codec change, the keypad of a forwarded call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.apps.services import IvrServices, MissingPool
from gateway.config import Config, ConfigError, DidConfig, ForwardPoolConfig, ProjectConfig, load_config
from gateway.media import g711
from gateway.media.rtp import RtpPacket
from gateway.rooms.sip_forward import SipForwardConnector, convert, failover, relay_event, render_headers, request_uri

POOL = """
[[forward_pools]]
name = "jitsi"
targets = ["sip:127.0.0.1:5091", "sip:jigasi@127.0.0.1:5092;transport=tcp"]
domain = "meet.example.org"
ring_timeout_s = 5
[forward_pools.headers]
X-Room-Id = "{room_id}"
X-Room-Role = "{role}"
Jitsi-Conference-Room = "{room_name}@{domain}"
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path, environ={})


def test_a_pool_and_its_use_by_a_did_and_a_project(tmp_path: Path) -> None:
    c = load(tmp_path, POOL + """
[[projects]]
name = "demo"
forward_pool = "jitsi"

[[dids]]
number = "15550100000"
route = "ivr"
project = "demo"
connector = "janus"

[[dids]]
number = "15550100009"
route = "ivr"
project = "demo"
connector = "sip_forward"
forward_pool = "jitsi"
""")
    pool = c.forward_pools[0]
    assert pool.name == "jitsi" and pool.ring_timeout_s == 5 and pool.domain == "meet.example.org"
    assert pool.headers == {"X-Room-Id": "{room_id}", "X-Room-Role": "{role}",
                            "Jitsi-Conference-Room": "{room_name}@{domain}"}
    assert c.projects[0].forward_pool == "jitsi"
    janus, forwarder = object(), object()
    services = IvrServices(c, None, None, None, connector=janus, forwarders={"jitsi": forwarder})  # type: ignore[arg-type]
    project = c.projects[0]
    assert services.connector_for(c.did("15550100000"), project) is janus  # the DID says janus: the project's pool waits
    assert services.connector_for(c.did("15550100009"), project) is forwarder
    assert services.connector_for(None, project) is forwarder  # a dial-out of the project
    assert services.connector_for(DidConfig(number="1"), ProjectConfig(name="other")) is janus  # the default
    missing = services.connector_for(None, ProjectConfig(name="stored", forward_pool="gone"))
    assert isinstance(missing, MissingPool)  # a stored project naming a pool the config lacks: joins fail cleanly


@pytest.mark.parametrize(("extra", "key"), [
    ('[[forward_pools]]\nname = "p"\ntargets = []\n', "forward_pools[0].targets"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["http://x"]\n', "forward_pools[0].targets[0]"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h?X-Evil=1"]\n', "forward_pools[0].targets[0]"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\n[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\n',
     "forward_pools[1].name"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X Room" = "a"}\n', "forward_pools[0].headers.X Room"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"Via" = "a"}\n', "forward_pools[0].headers.Via"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = "a\\r\\nX-B: b"}\n',
     "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = "{pin}"}\n', "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = "{room_id.__class__}"}\n',
     "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = "{room_id!r}"}\n',
     "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = "{room_id"}\n', "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nheaders = {"X-A" = 3}\n', "forward_pools[0].headers.X-A"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nring_timeout_s = 0\n', "forward_pools[0].ring_timeout_s"),
    ('[[forward_pools]]\nname = "p"\ntargets = ["sip:h"]\nusername = "u"\n', "forward_pools[0]"),
    ('[[projects]]\nname = "demo"\nforward_pool = "nope"\n', "projects[0].forward_pool"),
    ('[[projects]]\nname = "demo"\n[[dids]]\nnumber = "1555"\nproject = "demo"\nconnector = "sip_forward"\n',
     "dids[0].forward_pool"),
    ('[[projects]]\nname = "demo"\n[[dids]]\nnumber = "1555"\nproject = "demo"\nconnector = "jitsi"\n',
     "dids[0].connector"),
    ('[[projects]]\nname = "demo"\n[[dids]]\nnumber = "1555"\nproject = "demo"\nforward_pool = "nope"\n',
     "dids[0].forward_pool"),
])
def test_config_errors_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, extra)
    assert f"gateway.toml: {key}:" in str(err.value)


def test_headers_are_templated_and_user_text_cannot_inject_a_header() -> None:
    templates = {"X-Room-Id": "{room_id}", "X-Room-Role": "{role}", "Jitsi-Conference-Room": "{room_name}@{domain}",
                 "X-Meeting": "id {meeting_id} {{literal}}"}
    values = {"room_id": "r1", "role": "moderator", "room_name": "Standup\r\nX-Evil: 1", "meeting_id": "123456789",
              "domain": "meet.example.org"}
    assert render_headers(templates, values) == [
        ("X-Room-Id", "r1"), ("X-Room-Role", "moderator"), ("Jitsi-Conference-Room", "StandupX-Evil: 1@meet.example.org"),
        ("X-Meeting", "id 123456789 {literal}")]


def test_request_uri_failover_codes_and_member_order() -> None:
    assert request_uri("sip:127.0.0.1:5091", "3f2a-b") == "sip:3f2a-b@127.0.0.1:5091"
    assert request_uri("sip:jigasi@10.0.0.5;transport=tcp", "r") == "sip:jigasi@10.0.0.5"
    assert all(failover(code) for code in (None, 408, 480, 486, 500, 503, 504))
    assert not any(failover(code) for code in (403, 404, 488, 603))
    pool = ForwardPoolConfig(name="p", targets=["sip:a", "sip:b", "sip:c"])
    connector = SipForwardConnector(pool)
    assert connector.order() == ["sip:a", "sip:b", "sip:c"]
    connector.live["sip:a"] += 2
    connector.live["sip:b"] += 1
    assert connector.order() == ["sip:c", "sip:b", "sip:a"]
    assert connector.trunks["sip:b"].outbound is not None and connector.trunks["sip:b"].outbound.proxy == "sip:b"
    assert connector.values("r9", "participant", "42")["room_name"] == "r9"  # no room store: the id names it


class FakeMedia:
    def __init__(self, dtmf_pt: int | None) -> None:
        self.params = type("P", (), {"dtmf_pt": dtmf_pt})()
        self.ts = 1000
        self.sent: list[tuple[bytes, int, int, bool]] = []

    def send_payload(self, payload: bytes, pt: int, ts: int, marker: bool = False) -> None:
        self.sent.append((payload, pt, ts, marker))


def test_rfc4733_packets_are_restamped_one_timestamp_per_event() -> None:
    out: Any = FakeMedia(101)
    events: dict[tuple[int, int], int] = {}
    start, end = bytes([5, 10, 0, 160]), bytes([5, 0x8A, 3, 32])
    assert relay_event(RtpPacket(96, 1, 5000, 77, start, True), out, events)
    out.ts = 1160
    relay_event(RtpPacket(96, 2, 5000, 77, end), out, events)
    out.ts = 1320
    relay_event(RtpPacket(96, 3, 9000, 77, start), out, events)  # the next digit: a new event
    assert out.sent == [(start, 101, 1000, True), (end, 101, 1000, False), (start, 101, 1320, True)]
    assert not relay_event(RtpPacket(96, 4, 9000, 77, start), FakeMedia(None), {})  # no telephone-event there


def test_a_leg_moved_to_the_other_g711_law_gets_converted_frames() -> None:
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(160) / 8000)).astype(np.int16)
    ulaw = g711.encode("PCMU", tone)
    assert convert(ulaw, "PCMU", "PCMU") is ulaw  # the same codec: relayed untouched
    alaw = convert(ulaw, "PCMU", "PCMA")
    assert len(alaw) == 160 and alaw != ulaw
    assert np.max(np.abs(g711.decode("PCMA", alaw).astype(int) - tone)) < 300


async def test_the_keypad_of_a_forwarded_call_mutes_and_says_what_is_not_available() -> None:
    from types import SimpleNamespace

    from gateway.apps.inroom import InRoom
    from gateway.rooms.sip_forward import ACTIONS

    said: list[str] = []
    recorded: list[str] = []

    async def say(key: str, interruptible: bool = True, **values: Any) -> bool:
        said.append(key)
        return False

    commands: list[dict[str, Any]] = []

    class Leg:
        participant_id = "leg-1"
        actions = ACTIONS
        state: dict[str, Any] = {"participants": [{"id": "leg-1", "muted": False}]}

        async def command(self, message: dict[str, Any]) -> None:
            commands.append(message)
            self.state = {"participants": [{"id": "leg-1", "muted": message["muted"]}]}

    call = SimpleNamespace(record=lambda state, *a, **k: recorded.append(state))
    voice = SimpleNamespace(call=call, audio=None, say=say)
    room = InRoom(voice, "r1", "moderator", None)  # type: ignore[arg-type]
    room.leg = Leg()  # type: ignore[assignment]
    for action in ("count", "mute_all", "lock", "unmute_all", "help", "mute_self", "mute_self"):
        await room.act(action)
    assert said == ["not_available"] * 4 + ["menu_help_self_only", "muted", "unmuted"]
    assert [c["muted"] for c in commands] == [True, False] and recorded == ["muted", "unmuted"]


def test_a_codec_change_on_either_leg_is_reoffered_to_the_other_once() -> None:
    from types import SimpleNamespace

    from gateway.rooms.sip_forward import SipForwardLeg

    def media(codec: str) -> Any:
        return SimpleNamespace(params=SimpleNamespace(codec=codec), silence=b"\xff" * 160, on_telephone_event=None,
                               handler=None)

    offers: list[tuple[str, tuple[str, ...]]] = []
    answers: dict[str, bool] = {"caller": True, "far": False}

    def leg_call(name: str, codec: str) -> Any:
        call = SimpleNamespace(media=media(codec), call_id="c1", target="sip:m", ended=SimpleNamespace(is_set=lambda: False))

        def reoffer(codecs: tuple[str, ...], done: Any) -> bool:
            offers.append((name, codecs))
            if answers[name]:
                call.media.params.codec = codecs[0]
            done(answers[name])
            return True

        call.reoffer = reoffer
        return call

    events: list[tuple[str, dict[str, Any]]] = []
    connector: Any = SimpleNamespace(event=lambda caller, state, level, **data: events.append((state, data)))
    caller, far = leg_call("caller", "PCMU"), leg_call("far", "PCMU")
    leg = SipForwardLeg(connector, "r1", caller, far, lambda e: None)
    tone = g711.encode("PCMU", np.zeros(160, dtype=np.int16) + 1000)
    leg.push(tone)
    assert leg._far_tick(tone) == tone and offers == []  # the same codec: untouched
    far.media.params.codec = "PCMA"  # the member re-INVITEd to PCMA: the caller is offered PCMA, and accepts
    leg.push(tone)
    leg._far_tick(g711.encode("PCMA", np.zeros(160, dtype=np.int16)))
    assert offers == [("caller", ("PCMA",))] and leg.codec == "PCMA" and leg.converted == 1
    assert events[-1] == ("forward_codec_followed", {"codec": "PCMA", "leg": "caller"})
    caller.media.params.codec = "PCMU"  # now the caller moves back; the member refuses the re-offer: converted
    for _ in range(3):
        leg.push(tone)
        out = leg._far_tick(None)
        assert out is not None and out != tone  # PCMU from the caller, PCMA to the member
    assert offers[1:] == [("far", ("PCMU",))], "refused: not asked again every tick"
    assert events[-1] == ("forward_codec_converted", {"codec": "PCMU", "leg": "far"}) and leg.converted == 4
