"""The REGISTER client against sipp playing a provider's registrar (digest with qop=auth, refresh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gateway.calls.registration import refresh_delay, retry_delay
from tests.conftest import SCENARIOS, free_port, make_test_config, start_gateway, stop_gateway, wait_until


def registrar(port: int, password_ok: bool = True) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / "registrar.xml"), "-i", "127.0.0.1", "-p", str(port), "-m", "1",
         "-nostdin", "-timeout", "30s", "-timeout_error", "-bind_local"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def config(port: int, password: str) -> str:
    return make_test_config().replace(
        '# [trunks.register]', f'[trunks.register]\nregistrar = "sip:127.0.0.1:{port}"\nusername = "gwuser"\n'
        f'password = "{password}"\nexpires = 3600\n# ')


def test_register_with_digest_and_refresh(tmp_path: Path) -> None:
    port = free_port()
    sipp = registrar(port)
    gw = start_gateway(tmp_path, config(port, "gw-secret"))
    try:
        out, _ = sipp.communicate(timeout=40)
        assert sipp.returncode == 0, out[-3000:]
        log = wait_until(lambda: gw.log() if gw.log().count('"register.ok"') >= 2 else None, 10, "two register.ok")
        assert '"expires": 4' in log, "the granted expiry (Contact expires=4) must be used"
        assert gw.http_get("/healthz")[1]["registrations"] == {"local": "registered"}
        assert "gw-secret" not in log
    finally:
        stop_gateway(gw)
        if sipp.poll() is None:
            sipp.kill()
            sipp.wait(5)


def test_register_rejected_backs_off(tmp_path: Path) -> None:
    port = free_port()
    sipp = registrar(port)
    gw = start_gateway(tmp_path, config(port, "wrong"))
    try:
        sipp.communicate(timeout=40)
        log = wait_until(lambda: gw.log() if '"register.retry"' in gw.log() else None, 10, "register.retry")
        assert '"status": 403' in log and '"retry_in": 5.0' in log
    finally:
        stop_gateway(gw)
        if sipp.poll() is None:
            sipp.kill()
            sipp.wait(5)


def test_backoff_and_refresh_schedule() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 10)] == [5, 10, 20, 300]
    assert refresh_delay(4) == 2 and refresh_delay(3600) == 3540
