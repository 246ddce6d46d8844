"""Fixtures of the WebRTC tests (rooms on Janus with Chromium): a gateway in a network namespace, browsers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cluster.janus import JanusProcess
from tests.conftest import Gateway, free_port, make_test_config, start_gateway, stop_gateway, wait_until
from tests.integration.browser import Browser, tone_wav
from tests.integration.netns import network_namespace

JANUS_RTP = (61000, 61999)  # outside free_port()'s range, the gateway's RTP ports and the ephemeral ports


@pytest.fixture
async def janus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[JanusProcess]:
    """A Janus of our own (the managed config, ports of this test's): every log record kept for the checks."""
    from tests.integration.test_janus import janus_config

    caplog.set_level(logging.DEBUG)
    proc = JanusProcess(janus_config(tmp_path), ready_timeout=15)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
async def service(janus: JanusProcess) -> AsyncIterator[Any]:
    """The room service in this process, on `janus`; one more allowed page origin (the Origin tests use it)."""
    from tests.integration.test_room_phones import Service

    janus.config.room_service.allowed_origins = ["https://meet.example.com"]
    s = Service(janus.config)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def bridge_https() -> bool:
    """Whether the gateway's HTTP listeners (the Voice API, the room service and its page) use HTTPS: a module
    overrides this fixture to say yes."""
    return False


@pytest.fixture
def bridge_gateway(tmp_path: Path, bridge_https: bool) -> Iterator[Gateway]:
    with network_namespace():
        env = {"GATEWAY_JANUS_HTTP_PORT": str(free_port()), "GATEWAY_JANUS_WS_PORT": str(free_port()),
               "GATEWAY_JANUS_RTP_PORT_MIN": str(JANUS_RTP[0]), "GATEWAY_JANUS_RTP_PORT_MAX": str(JANUS_RTP[1])}
        gw = start_gateway(tmp_path, make_test_config(), env, https=bridge_https)
        try:
            wait_until(lambda: all(f'"{e}"' in gw.log() for e in ("prompts.ready", "rooms.started", "janus.started")),
                       60, "prompts, the room service and Janus")
            yield gw
        finally:
            stop_gateway(gw)


@pytest.fixture
def browsers(tmp_path: Path, bridge_gateway: Gateway) -> Iterator[Any]:
    """browsers(name, freq): a Chromium whose microphone plays a tone (and which trusts the gateway's certificate
    when it has one); all of them closed at the end."""
    opened: list[Browser] = []

    def make(name: str, freq: float) -> Browser:
        b = Browser(tmp_path / name, tone_wav(tmp_path / f"{name}.wav", freq), trust_spki=bridge_gateway.spki)
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()
