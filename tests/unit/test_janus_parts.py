"""Janus parts without Janus: the rendered configuration, the secrets file, `[janus]` validation, and the
client's tolerance of malformed events (fed directly, and through a fake long-poll server)."""

from __future__ import annotations

import asyncio
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.adapters.janus import EventCallback, JanusClient, JanusHandle, JanusSession, parse_events
from gateway.cluster.janus import MODULES, JanusSecrets, render_config
from gateway.config import Config, ConfigError, load_config

pytestmark = pytest.mark.timeout(20)

UNWANTED = {"plugins": ["libjanus_streaming.so", "libjanus_echotest.so", "libjanus_sip.so"],
            "transports": ["libjanus_pfunix.so", "libjanus_mqtt.so"], "events": ["libjanus_sampleevh.so"],
            "loggers": ["libjanus_jsonlog.so"]}


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    """A fake Janus library folder holding the wanted modules and others that must not be loaded."""
    root = tmp_path / "lib"
    for folder, names in MODULES.items():
        (root / folder).mkdir(parents=True)
        for name in [*names, *UNWANTED[folder]]:
            (root / folder / name).write_bytes(b"")
    return root


def make_config(tmp: Path, **env: str) -> Config:
    return load_config(None, {"GATEWAY_DATA_DIR": str(tmp / "data"), **{f"GATEWAY_JANUS_{k.upper()}": v
                                                                       for k, v in env.items()}})


def jcfg(path: Path) -> dict[str, dict[str, str]]:
    """The `section: { key = value }` settings of one of our rendered files (comments dropped, quotes kept)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line.endswith(": {"):
            current = sections.setdefault(line[:-3], {})
        elif " = " in line:
            key, value = line.split(" = ", 1)
            current[key] = value
    return sections


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_render_links_only_the_wanted_modules(tmp_path: Path, lib: Path) -> None:
    config = make_config(tmp_path)
    conf = config.data_dir / "janus" / "conf"
    (conf / "plugins").mkdir(parents=True)
    (conf / "plugins" / "libjanus_streaming.so").symlink_to(lib / "plugins" / "libjanus_streaming.so")  # stale
    assert render_config(config, JanusSecrets.load(config), lib) == conf
    for folder, wanted in MODULES.items():
        links = sorted((conf / folder).iterdir())
        assert [p.name for p in links] == sorted(wanted)
        assert all(p.is_symlink() and p.resolve() == (lib / folder / p.name).resolve() for p in links)
    general = jcfg(conf / "janus.jcfg")["general"]
    for key, folder in (("plugins_folder", "plugins"), ("transports_folder", "transports"),
                        ("events_folder", "events"), ("loggers_folder", "loggers")):
        assert general[key] == f'"{(conf / folder).resolve()}"'


def test_render_settings_secrets_and_permissions(tmp_path: Path, lib: Path) -> None:
    config = make_config(tmp_path, http_port="18088", ws_port="18188", rtp_port_min="41000", rtp_port_max="41999",
                         public_ip="203.0.113.7", stun_server="stun.example.org:19302", ice_enforce_list='["eth0"]')
    secrets = JanusSecrets.load(config)
    conf = render_config(config, secrets, lib)
    assert mode(config.data_dir / "janus") == 0o700 and mode(conf) == 0o700
    assert mode(config.data_dir / "janus" / "secrets.json") == 0o600
    files = sorted(conf.glob("*.jcfg"))
    assert len(files) == 5 and all(mode(f) == 0o600 for f in files)
    assert not any("$" in f.read_text() for f in files)  # every placeholder filled

    core = jcfg(conf / "janus.jcfg")
    assert core["general"]["api_secret"] == f'"{secrets.api_secret}"'
    assert "admin_secret" not in core["general"] and core["general"]["token_auth"] == "false"
    assert core["general"]["session_timeout"] == "60" and core["general"]["debug_level"] == "4"
    assert core["media"]["rtp_port_range"] == '"41000-41999"'
    assert core["nat"]["nat_1_1_mapping"] == '"203.0.113.7"'
    assert core["nat"]["stun_server"] == '"stun.example.org"' and core["nat"]["stun_port"] == "19302"
    assert core["nat"]["ice_enforce_list"] == '"eth0"'

    http = jcfg(conf / "janus.transport.http.jcfg")
    assert http["general"]["port"] == "18088" and http["general"]["ip"] == '"127.0.0.1"'
    assert http["general"]["acl"] == '"127."' and http["general"]["https"] == "false"
    assert http["admin"] == {"admin_http": "false", "admin_https": "false"}
    ws = jcfg(conf / "janus.transport.websockets.jcfg")
    assert ws["general"]["ws_port"] == "18188" and ws["general"]["ws_ip"] == '"127.0.0.1"'
    assert ws["general"]["ws_acl"] == '"127."' and ws["general"]["wss"] == "false"
    assert ws["admin"] == {"admin_ws": "false", "admin_wss": "false"}

    for name, key in (("audiobridge", secrets.audiobridge_admin_key), ("videoroom", secrets.videoroom_admin_key)):
        plugin = jcfg(conf / f"janus.plugin.{name}.jcfg")
        assert list(plugin) == ["general"]  # no demo rooms
        assert plugin["general"]["admin_key"] == f'"{key}"'
        assert plugin["general"]["string_ids"] == "true" and plugin["general"]["lock_rtp_forward"] == "true"
    audiobridge = jcfg(conf / "janus.plugin.audiobridge.jcfg")["general"]
    assert audiobridge["local_ip"] == '"127.0.0.1"' and audiobridge["rtp_port_range"] == '"41000-41999"'
    assert secrets.audiobridge_admin_key != secrets.videoroom_admin_key


def test_render_other_hosts(tmp_path: Path, lib: Path) -> None:
    config = make_config(tmp_path, host="10.1.2.3")
    conf = render_config(config, JanusSecrets.load(config), lib)
    assert "acl" not in jcfg(conf / "janus.transport.http.jcfg")["general"]  # not loopback: the api_secret guards
    assert "ws_acl" not in jcfg(conf / "janus.transport.websockets.jcfg")["general"]
    assert jcfg(conf / "janus.plugin.audiobridge.jcfg")["general"]["local_ip"] == '"10.1.2.3"'
    config = make_config(tmp_path, host="0.0.0.0")
    conf = render_config(config, JanusSecrets.load(config), lib)
    assert "local_ip" not in jcfg(conf / "janus.plugin.audiobridge.jcfg")["general"]  # Janus picks one
    nat = jcfg(conf / "janus.jcfg")["nat"]
    assert not {"nat_1_1_mapping", "stun_server", "ice_enforce_list"} & set(nat)


def test_secrets_generated_once_and_config_wins(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    first = JanusSecrets.load(config)
    assert JanusSecrets.load(config) == first and len(set(first.values())) == 3
    assert all(len(s) >= 32 for s in first.values()) and not any(s in repr(first) for s in first.values())
    configured = JanusSecrets.load(make_config(tmp_path, api_secret="api-from-config", admin_key="key-from-config"))
    assert configured == JanusSecrets("api-from-config", "key-from-config", "key-from-config")
    assert JanusSecrets.load(config) == first  # the file keeps the generated ones
    assert "api-from-config" not in (config.data_dir / "janus" / "secrets.json").read_text()
    assert "key-from-config" not in repr(make_config(tmp_path, admin_key="key-from-config"))  # nor in logged configs


@pytest.mark.parametrize(("key", "value", "named"), [
    ("http_port", "0", "janus.http_port"), ("ws_port", "70000", "janus.ws_port"),
    ("ws_port", "8088", "janus.http_port/janus.ws_port"),
    ("rtp_port_min", "45000", "janus.rtp_port_min/janus.rtp_port_max"),
    ("host", '"janus.local"', "janus.host"), ("public_ip", '"1.2.3"', "janus.public_ip"),
    ("stun_server", '"stun.example.org:x"', "janus.stun_server"), ("urls", '["ws://x"]', "janus.urls[0]"),
    ("turn_servers", '["stun:x"]', "janus.turn_servers[0]"), ("api_secret", '"a\\"b"', "janus.api_secret"),
    ("prebuffer", "-1", "janus.prebuffer"), ("ice_enforce_list", '["eth0,eth1"]', "janus.ice_enforce_list[0]"),
])
def test_config_errors_name_the_key(tmp_path: Path, key: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        make_config(tmp_path, **{key: value})


def test_config_defaults_and_external_servers(tmp_path: Path) -> None:
    shipped = load_config(Path(__file__).resolve().parents[2] / "config" / "gateway.toml", {})
    assert shipped.janus == Config().janus and shipped.janus.is_managed
    with pytest.raises(ConfigError, match="janus.admin_key: required"):
        make_config(tmp_path, urls='["http://10.0.0.9:8088/janus"]')
    external = make_config(tmp_path, urls='["http://10.0.0.9:8088/janus"]', admin_key="k")
    assert external.janus.managed and not external.janus.is_managed


# -- the client never raises on what Janus sends ----------------------------------------------------------------

def test_parse_events() -> None:
    assert parse_events("not json") == []
    assert parse_events('{"janus": "keepalive"}') == [{"janus": "keepalive"}]
    assert parse_events('[1, {"janus": "event"}]') == [1, {"janus": "event"}]


async def test_malformed_events_do_not_raise() -> None:
    client = JanusClient("http://127.0.0.1:9/janus", "s")
    lost: list[str] = []
    session = JanusSession(client, 1, lost.append)  # no poll loop: events are fed by hand
    got: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    good = _handle(session, 7, lambda data, jsep: got.append((data, jsep)))

    def buggy(data: dict[str, Any], jsep: dict[str, Any] | None) -> None:
        raise ZeroDivisionError  # a consumer bug stays in its callback

    _handle(session, 8, buggy)
    events: list[object] = [None, 3, "x", [], {}, {"janus": 5}, {"janus": "event"}, {"janus": "event", "sender": 7},
                            {"janus": "event", "sender": 7, "plugindata": "x"},
                            {"janus": "event", "sender": 7, "plugindata": {"data": ["x"]}},
                            {"janus": "event", "sender": 999, "plugindata": {"data": {}}},  # unknown sender
                            {"janus": "event", "sender": {"unhashable": 1}, "plugindata": {"data": {}}},
                            {"janus": "event", "sender": 8, "plugindata": {"data": {}}},
                            {"janus": "media", "sender": 999}, {"janus": "hangup", "sender": 7},
                            {"janus": "something-new", "sender": 7}]
    for event in events:
        session.dispatch(event)
    session.dispatch({"janus": "event", "sender": 7, "plugindata": {"data": {"audiobridge": "event"}},
                      "jsep": {"type": "offer", "sdp": "v=0"}})
    assert got == [({"audiobridge": "event"}, {"type": "offer", "sdp": "v=0"})] and not lost
    session.dispatch({"janus": "detached", "sender": 7})
    assert good.detached and 7 not in session.handles
    session.dispatch({"janus": "timeout", "session_id": 1})
    assert lost == ["session timed out"] and session.lost.is_set()
    await client.close()


async def test_poll_loop_survives_garbage_and_detects_loss() -> None:
    """A fake Janus: create/attach, then long polls answering garbage, a mixed batch, then 404."""
    polls = ["garbage", '[null, {"janus": "event", "sender": 22}, {"janus": "event", "sender": 22, '
             '"plugindata": {"plugin": "p", "data": {"ok": 1}}}]', '{"janus": "keepalive"}']

    async def post(request: web.Request) -> web.Response:
        body = await request.json()
        assert body["apisecret"] == "s"
        return web.json_response({"janus": "success", "transaction": body["transaction"],
                                  "data": {"id": 11 if body["janus"] == "create" else 22}})

    async def poll(request: web.Request) -> web.Response:
        assert request.query["apisecret"] == "s" and request.query["maxev"] == "10"
        return web.Response(text=polls.pop(0)) if polls else web.Response(status=404)

    app = web.Application()
    app.router.add_post("/janus", post)
    app.router.add_post("/janus/11", post)
    app.router.add_get("/janus/11", poll)
    async with _serve(app) as url, JanusClient(url, "s", timeout=5) as client:
        reasons: list[str] = []
        session = await client.create_session(reasons.append)
        events: list[dict[str, Any]] = []
        await session.attach("p", lambda data, jsep: events.append(data))
        await asyncio.wait_for(session.lost.wait(), 5)
        assert events == [{"ok": 1}] and reasons == ["no such session"] and not polls
        await session.destroy()


def _handle(session: JanusSession, handle_id: int, on_event: EventCallback) -> JanusHandle:
    handle = JanusHandle(session, handle_id, "janus.plugin.audiobridge", on_event)
    session.handles[handle_id] = handle
    return handle


class _serve:
    """Run an aiohttp app on 127.0.0.1 (a free port chosen by the kernel) for the duration of the block."""

    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app)

    async def __aenter__(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/janus"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

