"""Which addresses a webhook may reach (issue 11, finding 6), and the signature with its timestamp."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.api.webhooks import check_url, refusal, sign, verify
from gateway.config import ConfigError, load_config
from gateway.store.cdr import strip_credentials


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.31.255.255", "private"), ("192.168.0.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("169.254.10.1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
    ("64:ff9b::a9fe:a9fe", "cloud metadata"), ("2002:a00:1::1", "private"),  # NAT64, 6to4
    ("192.0.0.192", "reserved"), ("198.18.0.1", "reserved"), ("240.0.0.1", "reserved"), ("2001:db8::1", "reserved"),
])
def test_internal_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal(address) == reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(address) is None


def test_the_allow_list_opens_exactly_its_networks() -> None:
    allow = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.20.0.0/16")]
    assert refusal("127.0.0.2", allow) is None and refusal("::ffff:127.0.0.2", allow) is None
    assert refusal("10.20.3.4", allow) is None and refusal("10.21.0.1", allow) == "private"
    assert refusal("::1", allow) == "loopback" and refusal("169.254.169.254", allow) == "cloud metadata"


def test_only_http_urls_with_a_host() -> None:
    assert check_url("https://app.example/hooks") is None and check_url("http://[::1]:8/") is None
    for url in ("ftp://app.example/", "file:///etc/passwd", "gopher://x/", "http://", "javascript:alert(1)", "x"):
        assert check_url(url) is not None, url


def test_allow_networks_config_is_validated() -> None:
    assert load_config(None, {"GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["10.0.0.0/8", "fd00::/8"]'}).webhooks.allow_networks
    with pytest.raises(ConfigError, match="webhooks.allow_networks"):
        load_config(None, {"GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["not-a-net"]'})


def test_signature_covers_timestamp_and_body() -> None:
    body = b'{"state":"initiated"}'
    sig = sign("s3", 1_700_000_000, body)
    assert sig.startswith("v1=") and verify("s3", body, "1700000000", sig, now=1_700_000_100)
    assert not verify("s3", body, "1700000000", sig, now=1_700_000_301)  # a replay after 5 minutes
    assert not verify("s3", body, "1700000001", sig, now=1_700_000_000)  # another timestamp
    assert not verify("s3", body + b" ", "1700000000", sig, now=1_700_000_000)
    assert not verify("other", body, "1700000000", sig, now=1_700_000_000)
    assert not verify("s3", body, "17e8", sig, now=1_700_000_000) and not verify("s3", body, "", sig)


def test_credentials_are_stripped_from_stored_urls() -> None:
    assert strip_credentials("https://u:p@app.example:8443/h?x=1") == "https://app.example:8443/h?x=1"
    assert strip_credentials("https://app.example/h") == "https://app.example/h"
    assert strip_credentials("http://u:p@[::1]:8/") == "http://[::1]:8/"
