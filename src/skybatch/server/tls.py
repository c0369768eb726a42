"""The server's TLS identity: a self-signed certificate made once per home.

A server bound to a non-loopback address serves HTTPS only. Its certificate is made at
the first such start and kept (``SKYBATCH_HOME/server.crt``, key ``server.key`` 0600), so
agents that outlived a restart still trust the server they come back to. Nobody checks
it against a CA or a host name: clients read it from the home and agents get its PEM
with their token, and each trusts that one certificate (``config.pinned_context``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

from skybatch.config import Home, open_private

__all__ = ["ensure_certificate", "is_loopback"]

#: Long-lived on purpose: it is pinned, not validated against a clock-bound chain, and a
#: renewal would cut off every agent that holds the old one.
_VALID_DAYS = 3650


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ensure_certificate(home: Home, host: str) -> str:
    """The PEM of the home's certificate, made now (with its key) if there is none."""
    if home.cert_file.exists() and home.key_file.exists():
        return home.cert_file.read_text()
    cert_pem, key_pem = _self_signed(host)
    # The key first, private from its first byte; the certificate last, so a crash in
    # between leaves no certificate without its key.
    for path in (home.key_file, home.cert_file):
        path.unlink(missing_ok=True)
    with os.fdopen(open_private(home.key_file, os.O_EXCL), "wb") as f:
        f.write(key_pem)
    with os.fdopen(open_private(home.cert_file, os.O_EXCL), "wb") as f:
        f.write(cert_pem)
    return cert_pem.decode()


def _self_signed(host: str) -> tuple[bytes, bytes]:
    # Imported here: a loopback server (the common case) never needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"skybatch server {host}")])
    alt: list[x509.GeneralName] = [x509.DNSName(socket.gethostname())]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
