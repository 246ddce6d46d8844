"""How the gateway's processes verify each other's HTTPS (a self-signed certificate pinned, a CA-issued one verified
for its own name), and TLS configuration mistakes said at start."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import tls
from gateway.config import ConfigError, load_config


def issued_chain(tmp: Path, name: str) -> tuple[Path, Path]:
    """A leaf for `name` issued by a private CA: fullchain.pem (leaf, then CA) and its key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False).sign(ca_key, hashes.SHA256()))
    chain, key_path = tmp / "fullchain.pem", tmp / "privkey.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_path


def test_a_self_signed_certificate_is_pinned_and_a_ca_issued_one_verified_for_its_name(tmp_path: Path) -> None:
    tls.self_signed(["127.0.0.1"], tmp_path / "self" / "cert.pem", tmp_path / "self" / "key.pem")
    pinned = tls.internal(str(tmp_path / "self" / "cert.pem"))
    assert pinned["server_hostname"] is None and not pinned["ssl"].check_hostname  # the pin is the check
    assert pinned["ssl"].cert_store_stats()["x509"] == 1  # that certificate, nothing else
    chain, _ = issued_chain(tmp_path, "meet.example.com")
    issued = tls.internal(str(chain))
    assert issued["server_hostname"] == "meet.example.com" and issued["ssl"].check_hostname
    assert tls.internal("") == {}  # plain HTTP


def test_sip_tls_needs_its_files_and_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sip.tls_cert and sip.tls_key are needed"):
        load_config(None, {"GATEWAY_SIP_TRANSPORTS": '["udp", "tls"]'})
    chain, key = issued_chain(tmp_path, "sip.example.com")
    assert load_config(None, {"GATEWAY_SIP_TRANSPORTS": '["tls"]', "GATEWAY_SIP_TLS_CERT": str(chain),
                              "GATEWAY_SIP_TLS_KEY": str(key)}).sip.transports == ["tls"]
    locked = tmp_path / "locked.pem"
    secret = serialization.load_pem_private_key(key.read_bytes(), None)
    locked.write_bytes(secret.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pass phrase")))
    with pytest.raises(ConfigError, match="pass phrase"):
        load_config(None, {"GATEWAY_HTTP_TLS_CERT": str(chain), "GATEWAY_HTTP_TLS_KEY": str(locked)})


def test_we_show_our_certificate_to_a_trunk_that_asks_and_read_a_clients(tmp_path: Path) -> None:
    """Mutual TLS both ways, in memory: our client context presents sip.tls_cert to a server that requires a
    client certificate (a trunk doing mutual TLS on dial-out), and our server context with a client CA reads the
    names of a client's certificate (a trunk calling in); a server without a client CA asks for none."""
    import ssl

    ours_cert, ours_key = tmp_path / "ours.pem", tmp_path / "ours.key"
    tls.self_signed(["gw.example"], ours_cert, ours_key)
    trunk_cert, trunk_key = tmp_path / "trunk.pem", tmp_path / "trunk.key"
    tls.self_signed(["sbc.example"], trunk_cert, trunk_key)

    def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> dict | None:  # type: ignore[type-arg]
        s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = server.wrap_bio(s_in, s_out, server_side=True)
        cli = client.wrap_bio(c_in, c_out, server_hostname="sbc.example")
        for _ in range(10):
            for side in (cli, srv):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        return srv.getpeercert()

    trunk_server = tls.server_context(str(trunk_cert), str(trunk_key), http=False, client_ca=str(ours_cert))
    trunk_server.verify_mode = ssl.CERT_REQUIRED  # the trunk insists
    client = tls.client_context(str(trunk_cert), str(ours_cert), str(ours_key))
    assert tls.peer_names(handshake(trunk_server, client)) == ["gw.example"]
    without = tls.server_context(str(trunk_cert), str(trunk_key), http=False)
    assert without.verify_mode == ssl.CERT_NONE and tls.peer_names(handshake(without, client)) == []


def test_a_sips_proxy_gets_a_sips_request_uri_and_a_sips_dialog_a_sips_contact() -> None:
    """RFC 3261 12.1.1 and RFC 5630: a sips: Request-URI means TLS all the way, and our Contact says sips: (no
    transport=tls); a sip: one over TLS keeps sip: with transport=tls."""
    from types import SimpleNamespace

    from gateway.calls.outbound import request_uri
    from gateway.calls.ua import UserAgent
    from gateway.config import Config
    from gateway.sip.message import SipUri

    assert request_uri("+15551230001", SipUri.parse("sips:sbc.example")) == "sips:+15551230001@sbc.example"
    assert request_uri("15551230001", SipUri.parse("sip:sbc.example:5070")) == "sip:15551230001@sbc.example:5070"
    ua = SimpleNamespace(stack=SimpleNamespace(local={"tls": ("127.0.0.1", 5061)}), config=Config())
    assert UserAgent.contact(ua, "tls", sips=True) == "<sips:gateway@127.0.0.1:5061>"  # type: ignore[arg-type]
    assert UserAgent.contact(ua, "tls") == "<sip:gateway@127.0.0.1:5061;transport=tls>"  # type: ignore[arg-type]
    assert UserAgent.contact(ua, "udp", sips=True) == "<sip:gateway@127.0.0.1:5060>"  # type: ignore[arg-type]


def test_the_balancer_headers_count_only_when_our_kamailio_sends_them(tmp_path: Path) -> None:
    """X-Gateway-Transport / X-Gateway-Client-Names are believed from cluster.lb_sources only with
    cluster.lb_tls_headers (set by the supervisor for the Kamailio it renders, which strips callers' copies);
    names compare as they mean (IPv6 in one form, case); a server-only certificate is not shown to trunks."""
    from types import SimpleNamespace

    from gateway.calls.ua import UserAgent
    from gateway.config import Config, TrunkConfig
    from gateway.sip.message import Headers
    from gateway.sip.transaction import Target

    headers = Headers()
    headers.add("X-Gateway-Transport", "tls")
    headers.add("X-Gateway-Client-Names", "SBC.example,2001:DB8:0:0:0:0:0:1,<null>")
    request = SimpleNamespace(headers=headers)
    via_lb = Target("udp", "127.0.0.1", 5060)
    for trusted, expected in ((False, ("udp", [])), (True, ("tls", ["sbc.example", "2001:db8::1"]))):
        config = Config()
        config.cluster.lb_tls_headers = trusted
        ua = SimpleNamespace(config=config, lb_sources={"127.0.0.1"}, transport=None)
        assert UserAgent.edge(ua, request, via_lb) == expected  # type: ignore[arg-type]
    trunk = TrunkConfig(tls_client_certificate=True, tls_client_names=["sbc.EXAMPLE", "2001:db8::1"])
    assert UserAgent._client_certified(trunk, "tls", ["2001:db8::1"])
    assert not UserAgent._client_certified(trunk, "udp", ["sbc.example"])
    assert not UserAgent._client_certified(trunk, "tls", [])
    server_only = issued_chain(tmp_path, "gw.example")[0]  # no extendedKeyUsage: fine for both
    tls.self_signed(["gw.example"], tmp_path / "both.pem", tmp_path / "both.key")
    assert tls.for_clients(str(server_only)) and tls.for_clients(str(tmp_path / "both.pem"))
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.example")])
    now = datetime.datetime.now(datetime.UTC)
    web_only = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(3).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(key, hashes.SHA256()))
    (tmp_path / "web.pem").write_bytes(web_only.public_bytes(serialization.Encoding.PEM))
    assert not tls.for_clients(str(tmp_path / "web.pem")), "a server-only certificate is not shown to trunks"
