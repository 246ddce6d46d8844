"""TLS for the HTTP listeners (the Voice API on each worker, the room service) and for the gateway's own clients
of them; a self-signed certificate for trying it out (`gateway certs self-signed`).

Listeners take TLS 1.2 and 1.3 only, with the certificate chain and key the operator configures
(`http.tls_cert`/`tls_key`, `room_service.tls_cert`/`tls_key`). The gateway's processes reach each other at
loopback addresses, not at the certificate's name: their clients trust exactly the listener's configured
certificate (a pin, `pinned_context`), so a self-signed one works and nothing else is accepted. Clients of the
world (webhooks, alarms) verify against the system's CAs plus an optional CA file (`client_context`).

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

HSTS = "max-age=31536000"  # a year: browsers keep to HTTPS for this host once they saw it over HTTPS


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A listener's context: TLS 1.2+, the operator's chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@functools.lru_cache(maxsize=8)
def pinned_context(cert: str) -> ssl.SSLContext:
    """A client that trusts exactly the certificate in `cert` (our own listener, at whatever address); made once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=cert)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
    ctx.check_hostname = False  # reached at 127.0.0.1 or a pod address; the pin is the check
    return ctx


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """A client of the world: the system's CAs, and `ca_file` too (a private CA)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
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
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
