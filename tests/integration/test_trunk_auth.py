"""Inbound trunk authentication: a source outside the allow-list must pass digest (sipp's own digest client)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_test_config, run_sipp, scenario, start_gateway, stop_gateway

# sipp reads only the first challenge and knows only MD5 (hence the order); SHA-256 is covered by unit tests.
AUTH_TRUNK = make_test_config().replace(
    'sources = ["127.0.0.0/8"]', 'sources = ["127.0.0.2/32"]\nusername = "trunkuser"\npassword = "s3cret-pass"'
).replace('digest_algorithms = ["SHA-256", "MD5"]', 'digest_algorithms = ["MD5", "SHA-256"]')


def test_digest_authenticated_trunk_call(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, AUTH_TRUNK)
    try:
        sf = scenario(tmp_path, "auth.xml", final="200", ackbranch="[branch]", hold="500")
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", "-au", "trunkuser", "-ap", "s3cret-pass",
                     "-timeout", "15s")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        rows = gw.calls()
        assert len(rows) == 1 and rows[0]["trunk"] == "local"
        assert "s3cret-pass" not in gw.log(), "a password must never reach the logs"
    finally:
        stop_gateway(gw)


def test_wrong_password_gets_challenged_again(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, AUTH_TRUNK)
    try:
        sf = scenario(tmp_path, "auth.xml", final="401", ackbranch="[branch-3]", hold="0")
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", "15550100001", "-m", "1", "-au", "trunkuser", "-ap", "wrong")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert gw.calls() == []
    finally:
        stop_gateway(gw)
