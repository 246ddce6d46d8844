"""The Voice API's guards without sockets: dial-out rules and caps (failures per source: test_sources.py)."""

from __future__ import annotations

import pytest

from gateway.api.guards import DialLimits
from gateway.calls.outbound import DestinationDenied, DialError, DialRules, check_destination, request_uri
from gateway.config import ApiConfig, ApiProjectConfig, ConfigError, load_config
from gateway.sip.message import SipUri


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_destinations() -> None:
    rules = DialRules(deny_prefixes=("+1900", "+449"))
    for ok in ("+15551230001", "15551230001", "+447700900123"):
        check_destination(ok, rules)
    for malformed in ("+١٥٥٥٠١٠٠٠٠٠", "+¹⁵⁵⁵⁰¹⁰⁰⁰⁰⁰", "+1555０１００００", "12345", "+1234567890123456", "call me",
                      "sip:19005550100@10.0.0.1;maddr=127.0.0.1?X-Evil=1", "sip:a@b;transport=tcp", "sip:a@b?X=1",
                      "sip:a:pw@b", "sip:%61@b", "sip:b", "sips:a@b", "sip:a@b:0", "sip:a@b:70000", "sip:a@[zz::1]",
                      "sip:a@b\r\nX: 1", "tel:+15551230001"):
        with pytest.raises(DialError) as info:
            check_destination(malformed, DialRules(allow_sip_uri=True))
        assert not isinstance(info.value, DestinationDenied), malformed
    for denied in ("+19005550100", "19005550100", "+449012345678"):
        with pytest.raises(DestinationDenied):
            check_destination(denied, rules)
    with pytest.raises(DestinationDenied):  # sip: is off by default
        check_destination("sip:alice@example.com", rules)
    sip = DialRules(allow_sip_uri=True, deny_prefixes=("+1900",))
    check_destination("sip:alice@example.com:5070", sip)
    check_destination("sip:alice@[2001:db8::1]", sip)
    for denied in ("sip:19005550100@10.0.0.1", "sip:+1-900-555-0100@10.0.0.1"):  # numbers in sip: users too
        with pytest.raises(DestinationDenied):
            check_destination(denied, sip)


def test_longest_prefix_decides() -> None:
    rules = DialRules(allow_prefixes=("+1", "+44", "+449099"), deny_prefixes=("+1900", "+449", "+44"))
    check_destination("+15551230001", rules)
    check_destination("+449099123456", rules)  # a longer allow beats the deny
    for denied in ("+19005550100", "+449012345678", "+447700900123", "+33123456789"):  # +44: deny as long as allow
        with pytest.raises(DestinationDenied):
            check_destination(denied, rules)


def test_request_uri_never_carries_parameters_or_headers() -> None:
    proxy = SipUri.parse("sip:10.0.0.1:5070")
    assert request_uri("+15551230000", proxy) == "sip:+15551230000@10.0.0.1:5070"
    for bad in ("sip:19005550100@10.0.0.1;maddr=127.0.0.1?X-Evil=1", "+١٥٥٥٠١٠٠٠٠٠", "1555@evil"):
        with pytest.raises(DialError):
            request_uri(bad, proxy)


def test_dial_limits_per_project_with_overrides() -> None:
    clock = Clock()
    api = ApiConfig(max_outbound_calls_per_project=2, outbound_calls_per_minute=3,
                    projects=[ApiProjectConfig(name="big", max_outbound_calls=0, outbound_calls_per_minute=10,
                                               allow_sip_uri=True, deny_prefixes=[])])
    limits = DialLimits(api, clock)
    assert limits.refused("p", 2) is not None and limits.refused("p", 2)[0] == "too_many_concurrent_calls"  # type: ignore[index]
    for _ in range(3):
        assert limits.refused("p", 0) is None
        limits.placed("p")
        clock.now += 10
    code, _, retry = limits.refused("p", 0)  # type: ignore[misc]
    assert code == "too_many_calls" and retry == 30
    assert limits.refused("other", 0) is None
    assert limits.refused("big", 500) is None  # 0 = no limit on concurrent calls
    clock.now += 31
    assert limits.refused("p", 0) is None
    assert limits.rules("big") == DialRules(True, (), ())
    assert limits.rules("p").deny_prefixes[:2] == ("+1900", "+1976") and not limits.rules("p").allow_sip_uri


def test_config_keys_are_validated(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "g.toml"
    for text, key in (('[api]\ndeny_prefixes = ["+19oo"]', "api.deny_prefixes[0]"),
                      ('[api]\ntrusted_proxies = ["proxy"]', "api.trusted_proxies[0]"),
                      ("[api]\nauth_failure_window_s = 0", "api.auth_failure_window_s"),
                      ('[[api.projects]]\nname = "a"\nmax_outbound_calls = -1', "api.projects[0].max_outbound_calls"),
                      ('[[api.projects]]\nname = ""', "api.projects[0].name")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(path, environ={})
    path.write_text('[[api.projects]]\nname = "acme"\nallow_sip_uri = true\nallow_prefixes = ["+1"]')
    o = load_config(path, environ={}).api.projects[0]
    assert (o.allow_sip_uri, o.allow_prefixes, o.deny_prefixes, o.max_outbound_calls) == (True, ["+1"], None, None)


def test_client_source_trusts_x_forwarded_for_only_from_configured_proxies() -> None:
    from unittest import mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from gateway.api.guards import client_source, networks

    def req(peer: str, *xff: str) -> web.Request:
        transport = mock.Mock()
        transport.get_extra_info.return_value = (peer, 40000)
        headers = CIMultiDict([("X-Forwarded-For", v) for v in xff])
        return make_mocked_request("GET", "/voice/v1/calls", headers=headers, transport=transport)

    proxies = networks(["10.0.0.0/24"])
    assert client_source(req("192.0.2.9", "203.0.113.1"), proxies) == "192.0.2.9"  # not a proxy: header ignored
    assert client_source(req("10.0.0.5", "203.0.113.1"), []) == "10.0.0.5"  # no proxies configured: ignored
    # the right-most hop that is not a trusted proxy; what the client wrote further left does not count
    assert client_source(req("10.0.0.5", "6.6.6.6, 203.0.113.1", "10.0.0.9"), proxies) == "203.0.113.1"
    assert client_source(req("10.0.0.5", "203.0.113.1, junk"), proxies) == "10.0.0.5"
    assert client_source(req("10.0.0.5"), proxies) == "10.0.0.5"
