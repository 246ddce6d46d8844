"""TLS for the HTTP listeners (the Voice API on each worker, the room service) and for the gateway's own clients
of them; a self-signed certificate for trying it out (`gateway certs self-signed`).

Listeners take TLS 1.2 and 1.3 only, with the certificate chain and key the operator configures
(`http.tls_cert`/`tls_key`, `room_service.tls_cert`/`tls_key`). The gateway's processes reach each other at
loopback addresses, not at the certificate's name (`internal`): a self-signed certificate is pinned (it alone
is trusted, at any address); a CA-issued one is verified as any client would, for its own name (so a renewal,
same name, is accepted by processes started before it). Webhooks verify against the system's CAs plus an
optional CA file (`client_context`).

The self-signed certificate is generated with `cryptography` (already a dependency for the secrets at rest),
rather than by calling openssl: an ECDSA P-256 key, the names and addresses given as subjectAltNames.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

HSTS = "max-age=31536000"  # a year: browsers keep to HTTPS for this host once they saw it over HTTPS


def server_context(cert: str, key: str, http: bool = True, client_ca: str = "") -> ssl.SSLContext:
    """A listener's context: TLS 1.2+, the operator's chain and key, no renegotiation; ALPN http/1.1 for HTTP.
    `client_ca`: ask every client for a certificate, verified against these CAs when one is given (a client
    without one still connects: what it may do without is decided per trunk, `peer_names`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    if http:
        ctx.set_alpn_protocols(["http/1.1"])
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def for_clients(cert: str) -> bool:
    """Whether a certificate may authenticate a client (its extendedKeyUsage has clientAuth, or it has none): only
    then do we show it to a trunk that asks (one that merely asks would refuse a server-only certificate)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    leaf = x509.load_pem_x509_certificate(_blocks(Path(cert).read_text())[0].encode())
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


def name_key(name: str) -> str:
    """A certificate or configured name compared as it means: IP addresses in one form (2001:db8::1), names lower."""
    try:
        return ipaddress.ip_address(name.strip()).compressed
    except ValueError:
        return name.strip().lower()


def peer_names(cert: dict[str, Any] | None) -> list[str]:
    """The names a verified peer certificate (`SSLObject.getpeercert()`) vouches for: its DNS and IP
    subjectAltNames, else its subject's common name (lower-cased). [] without a certificate."""
    if not cert:
        return []
    names = [name_key(str(v)) for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    if names:
        return names
    return [name_key(str(v)) for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]


def _blocks(pem: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [b[b.index("-----BEGIN CERTIFICATE-----"):] + end for b in pem.split(end) if "-----BEGIN CERTIFICATE-----" in b]


@functools.lru_cache(maxsize=8)
def _internal(cert: str) -> tuple[ssl.SSLContext, str | None]:
    from cryptography import x509

    blocks = _blocks(Path(cert).read_text())
    leaf = x509.load_pem_x509_certificate(blocks[0].encode())
    if leaf.issuer == leaf.subject:  # self-signed: that very certificate (its first block) and nothing else
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=blocks[0])
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
        ctx.check_hostname = False  # reached at 127.0.0.1 or a pod address: the pin is the check
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx, None
    # CA-issued: verified as any client would (the system's CAs, and the chain's own CAs for a private one), for the
    # certificate's own name, whatever address we dial: a renewed certificate (same name) is accepted too
    ctx = client_context()
    if len(blocks) > 1:
        ctx.load_verify_locations(cadata="\n".join(blocks[1:]))
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        name = str(next(iter(names.get_values_for_type(x509.DNSName) or names.get_values_for_type(x509.IPAddress))))
    except (x509.ExtensionNotFound, StopIteration):
        name = leaf.subject.rfc4514_string().partition("CN=")[2].partition(",")[0]
    return ctx, name


def internal(cert: str) -> dict[str, Any]:
    """aiohttp's `ssl` and `server_hostname` for a hop between the gateway's own processes to a listener serving
    `cert` ({} without one: plain HTTP). A self-signed certificate is pinned (it alone is trusted); a CA-issued
    one is verified for its own name."""
    if not cert:
        return {}
    context, name = _internal(cert)
    return {"ssl": context, "server_hostname": name}


def client_context(ca_file: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client of the world: the system's CAs, and `ca_file` too (a private CA); `cert`/`key`: the certificate we
    show a server that asks for one (a trunk doing mutual TLS)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


def scheme(cert: str) -> str:
    return "https" if cert else "http"


def self_signed(names: list[str], cert_path: Path, key_path: Path, days: int = 397) -> None:
    """Write a self-signed certificate for `names` (DNS names or IP addresses) and its key (mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # also when it replaces a file that was readable
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
