"""HTTPS: a self-signed certificate for sites without a PKI, and the TLS frontend in front of waitress.

waitress speaks plain HTTP only, and we keep it: its ``waitress.client_disconnected`` is what stops
the generation of a client that left. So with TLS on, waitress listens on an ephemeral loopback
port, and the frontend listens on the public address, does each connection's handshake and relays
the decrypted bytes to waitress and back. A small WSGI middleware gives the app each request's real
client address, where waitress sees 127.0.0.1.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
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

HANDSHAKE_TIMEOUT = 10  # seconds a new connection has for its TLS handshake
SEND_TIMEOUT = 120  # seconds either side may refuse what is sent to it (waitress's own channel_timeout)
MAX_CONNECTIONS = 100  # waitress's own connection_limit
ACCEPT_POLL = 0.5  # seconds between looks at whether the frontend was closed
CHUNK = 64 * 1024
TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of every TLS client
PLAIN_HTTP_DRAIN = 1 << 20  # bytes of a plain HTTP request read before closing

_PLAIN_HTTP_BODY = b"This port speaks HTTPS: use https:// and the box's certificate.\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


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


# -- who the client is -------------------------------------------------------------------------
class Peers:
    """The real client of each relayed connection, by the local port of its connection to waitress.

    An entry outlives its connection by ``linger`` seconds: a request that waitress queued is given
    its environ when a worker takes it up, which may be after its client has already gone. Meanwhile a
    process on the box itself that connects to waitress's loopback port from that same port would be
    taken for that client; keys, where required, still name who it is.
    """

    def __init__(self, linger: float = 5.0):
        self.linger = linger
        self._lock = threading.Lock()
        self._by_port: dict[int, tuple[str, int]] = {}
        self._closed: dict[int, float] = {}  # port -> when its connection ended

    def add(self, port: int, peer: tuple[str, int]) -> None:
        with self._lock:
            self._by_port[port] = peer
            self._closed.pop(port, None)

    def remove(self, port: int, peer: tuple[str, int]) -> None:
        with self._lock:
            # Only our own entry: a new connection may already have the port that ours had.
            if self._by_port.get(port) is peer:
                self._closed[port] = time.monotonic()
            self._forget_old()

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self.linger
        for port in [p for p, when in self._closed.items() if when < cutoff]:
            del self._closed[port], self._by_port[port]

    def get(self, port: int) -> tuple[str, int] | None:
        with self._lock:
            return self._by_port.get(port)

    def __len__(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._by_port) - len(self._closed)


class RealPeer:
    """WSGI middleware: a request that came through the frontend gets its client's address and https."""

    def __init__(self, app, peers: Peers):
        self.app = app
        self.peers = peers

    def __call__(self, environ, start_response):
        peer = self._peer(environ)
        if peer is not None:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = peer[0], str(peer[1])
            environ["wsgi.url_scheme"] = "https"
        return self.app(environ, start_response)

    def _peer(self, environ) -> tuple[str, int] | None:
        # Anything else that reaches the loopback port keeps the address waitress saw.
        if environ.get("REMOTE_ADDR") != "127.0.0.1":
            return None
        try:
            return self.peers.get(int(environ.get("REMOTE_PORT", "")))
        except ValueError:
            return None


# -- the frontend ------------------------------------------------------------------------------
class TLSFrontend:
    """Listens with TLS on the public address and relays each connection, decrypted, to waitress.

    One thread a connection: it does the handshake, then moves bytes both ways until either side
    closes, and then closes both, so that waitress sees a client that left as its connection closing.
    """

    def __init__(self, context: ssl.SSLContext, host: str, port: int, max_connections: int = MAX_CONNECTIONS):
        self._context = context
        self._listener = _listen(host, port)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = threading.Event()
        self._upstream_port = 0
        self._acceptor: threading.Thread | None = None
        self.peers = Peers()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def wrap(self, app):
        """The app as waitress should call it: with each request's real client."""
        return RealPeer(app, self.peers)

    def start(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._acceptor = threading.Thread(target=self._accept_loop, name="tls-accept", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop accepting; connections already relayed go on until waitress ends them."""
        self._closed.set()
        if self._acceptor is not None:
            self._acceptor.join()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            # With every slot taken, new clients wait in the listen backlog, as with waitress's own limit.
            if not self._slots.acquire(timeout=ACCEPT_POLL):
                continue
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                self._slots.release()
                if not isinstance(exc, TimeoutError):  # out of file descriptors, say: do not spin
                    log.warning("TLS frontend cannot accept a connection: %s", exc)
                    self._closed.wait(ACCEPT_POLL)
                continue
            threading.Thread(target=self._serve, args=(conn, peer[:2]), name="tls-connection", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            tls = _handshake(self._context, conn, peer)
            if tls is not None:
                self._relay(tls, peer)
        finally:
            self._slots.release()

    def _relay(self, tls: ssl.SSLSocket, peer: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=SEND_TIMEOUT)
        except OSError as exc:
            log.error("TLS frontend cannot reach waitress on 127.0.0.1:%s: %s", self._upstream_port, exc)
            tls.close()
            return
        local_port = upstream.getsockname()[1]
        self.peers.add(local_port, peer)
        try:
            _pump(tls, upstream)
        finally:
            upstream.close()  # first: waitress sees the client leave, which stops its generation
            self.peers.remove(local_port, peer)
            _close_tls(tls)


def _listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.create_server(address, family=family, backlog=1024)
    listener.settimeout(ACCEPT_POLL)  # lets the accept loop notice close()
    return listener


def _handshake(context: ssl.SSLContext, conn: socket.socket, peer: tuple[str, int]) -> ssl.SSLSocket | None:
    """The TLS connection, or None (and ``conn`` closed) for a client that is silent, fails, or speaks plain HTTP."""
    conn.settimeout(HANDSHAKE_TIMEOUT)  # CPython keeps one deadline for the whole handshake, not one per read
    try:
        first = conn.recv(1, socket.MSG_PEEK)
        if first == TLS_HANDSHAKE_RECORD:
            return context.wrap_socket(conn, server_side=True)
        if first:
            log.info("plain HTTP from %s:%s to the HTTPS port refused", *peer)
            _refuse_plain_http(conn)
    except OSError as exc:  # ssl.SSLError is one, and so is the timeout
        log.info("TLS handshake with %s:%s failed: %s", *peer, exc)
    conn.close()
    return None


def _refuse_plain_http(conn: socket.socket) -> None:
    conn.sendall(PLAIN_HTTP_ANSWER)
    conn.shutdown(socket.SHUT_WR)
    # Read the request to its end: closing with unread bytes resets the connection, and the reset can
    # overtake the answer. Up to a bound, so that a client that goes on sending cannot hold the thread.
    received, deadline = 0, time.monotonic() + HANDSHAKE_TIMEOUT
    while received < PLAIN_HTTP_DRAIN and time.monotonic() < deadline and (data := conn.recv(CHUNK)):
        received += len(data)


def _pump(tls: ssl.SSLSocket, upstream: socket.socket) -> None:
    """Move bytes both ways until either side closes or fails."""
    tls.settimeout(SEND_TIMEOUT)
    with selectors.DefaultSelector() as selector:
        selector.register(tls, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, tls)
        while True:
            for key, _ in selector.select():
                if not _forward(key.fileobj, key.data):
                    return


def _forward(source: socket.socket, target: socket.socket) -> bool:
    """Send on what ``source`` has now; False once either side has closed, reset or timed out."""
    try:
        while True:
            data = _receive_now(source)
            if data is None:
                return True
            if not data:
                return False
            target.sendall(data)
            # Decrypted bytes that OpenSSL holds make no socket readable: take them now.
            if not (isinstance(source, ssl.SSLSocket) and source.pending()):
                return True
    except OSError:
        return False


def _receive_now(source: socket.socket) -> bytes | None:
    """What the source has (b"" once it closed), or None while a TLS record has only partly arrived."""
    if not isinstance(source, ssl.SSLSocket):
        return source.recv(CHUNK)  # readable, so this does not wait
    source.settimeout(0)  # waiting here for the rest of a record would hold up the other direction
    try:
        return source.recv(CHUNK)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    finally:
        source.settimeout(SEND_TIMEOUT)


def _close_tls(tls: ssl.SSLSocket) -> None:
    tls.settimeout(0)
    try:
        # close_notify: a response that ends with its connection (HTTP/1.0) then ends cleanly for the client.
        tls.unwrap()
    except OSError:
        pass  # not waiting for the client's own close_notify, or the client is gone already
    tls.close()
