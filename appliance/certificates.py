"""HTTPS certificates: a self-signed one for sites without a PKI, and the server context the service listens with.

``appliance tls self-signed`` writes a key and a certificate; ``appliance serve`` loads the pair named by
the settings ``tls_cert`` and ``tls_key``, checks that they belong together, and its TLS frontend
(``appliance.tls_frontend``) listens with the context made from them.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.files import write_new_file

log = logging.getLogger("appliance")

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# The longest validity Apple's TLS clients accept for a server certificate.
DEFAULT_DAYS = 825
FIX = "'appliance tls self-signed' writes a certificate and key, and prints the tls_cert and tls_key lines for config.toml"


class TLSSetupError(Exception):
    """A certificate or key the service cannot use; the message names the file and the fix."""


# -- a self-signed certificate ----------------------------------------------------------------
def default_hosts() -> list[str]:
    return [socket.gethostname(), "localhost", "127.0.0.1"]


def write_self_signed(folder: Path | str, hosts: list[str], days: int = DEFAULT_DAYS,
                      force: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key and a certificate for ``hosts``; return both paths and the sha256 fingerprint.

    Raises FileExistsError (unless ``force``) and ValueError for a host that is no name or address.
    """
    # Loopback always: the box's own tools (appliance status, the installer) reach it there.
    names = _subject_alt_names([*(hosts or default_hosts()), "localhost", "127.0.0.1"])
    folder = Path(folder).expanduser()
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    for path in (cert_path, key_path):
        if path.exists() and not force:
            raise FileExistsError(errno.EEXIST, "exists", str(path))
    # P-256, not Ed25519: not every TLS client accepts an Ed25519 certificate.
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key, names, days)
    folder.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_new_file(key_path, key_pem, mode=0o600, replace=force)
    write_new_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, replace=force)
    return cert_path, key_path, fingerprint(cert)


def fingerprint(cert: x509.Certificate) -> str:
    """As ``openssl x509 -noout -fingerprint -sha256`` prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names = []
    for host in dict.fromkeys(h.strip().strip("[]") for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(_ascii_name(host)))
    if not names:
        raise ValueError("no host name given")
    return names


def _ascii_name(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")  # certificates hold the ASCII form of internationalized names
    except UnicodeError:
        raise ValueError(f"{host!r} is neither a host name nor an IP address") from None


def _certificate(key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName], days: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value)[:64])])
    public = key.public_key()
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)  # its own issuer: a client pins it as the one certificate it trusts
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))  # a client whose clock is a little behind accepts it at once
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Both key identifiers: strict verifiers (Python 3.13's default) refuse a certificate without them.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


# -- the service's side: certificate and key from the config ------------------------------------
def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The TLS settings the service listens with, after checking that the two files belong together."""
    cert_path, key_path = Path(cert_file).expanduser(), Path(key_file).expanduser()
    cert = _load_certificate(cert_path)
    _check_key_matches(cert_path, cert, key_path, _load_key(key_path))
    _warn_if_out_of_date(cert_path, cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"OpenSSL cannot use the certificate {cert_path} with the key {key_path} "
                            f"({exc.reason or exc}): {FIX}") from None
    return context


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSSetupError(f"the TLS {what} {path} does not exist: {FIX}") from None
    except OSError as exc:
        raise TLSSetupError(f"cannot read the TLS {what} {path} ({exc.strerror}): the service's user must "
                            "be able to read it") from None


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(_read(path, "certificate"))[0]  # the server's own comes first
    except ValueError:
        raise TLSSetupError(f"{path} (tls_cert) is not a PEM certificate (-----BEGIN CERTIFICATE-----): {FIX}") from None


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(_read(path, "key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: the key has a passphrase
        raise TLSSetupError(f"{path} (tls_key) is not a PEM private key without a passphrase: {FIX}") from None


def _check_key_matches(cert_path: Path, cert: x509.Certificate, key_path: Path, key) -> None:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TLSSetupError(f"the key {key_path} (tls_key) does not belong to the certificate {cert_path} "
                            f"(tls_cert): set tls_key to the key made with that certificate, or {FIX}")


def _warn_if_out_of_date(path: Path, cert: x509.Certificate) -> None:
    now = datetime.now(timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.warning("the certificate %s is valid from %s to %s, not now (%s): clients will refuse it; make a new "
                    "one with 'appliance tls self-signed --force'", path, cert.not_valid_before_utc,
                    cert.not_valid_after_utc, now)
