"""HTTPS: the TLS frontend in front of waitress.

waitress speaks plain HTTP only, and we keep it: its ``waitress.client_disconnected`` is what stops
the generation of a client that left. So with TLS on, waitress listens on an ephemeral loopback
port, and the frontend listens on the public address, does each connection's handshake and relays
the decrypted bytes to waitress and back. A small WSGI middleware gives the app each request's real
client address, where waitress sees 127.0.0.1. The certificate and its context come from
``appliance.certificates``.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time

log = logging.getLogger("appliance")

HANDSHAKE_TIMEOUT = 10  # seconds a new connection has for its TLS handshake
SEND_TIMEOUT = 120  # seconds either side may refuse what is sent to it (waitress's own channel_timeout)
MAX_CONNECTIONS = 1000  # the service's max_connections
ACCEPT_POLL = 0.5  # seconds between looks at whether the frontend was closed
CHUNK = 64 * 1024
TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of every TLS client
PLAIN_HTTP_DRAIN = 1 << 20  # bytes of a plain HTTP request read before closing

_PLAIN_HTTP_BODY = b"This port speaks HTTPS: use https:// and the box's certificate.\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


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
    With every place taken, the connection longest in its handshake (silent, or slow on purpose) is
    closed to make room; a relayed connection that goes idle is waitress's to close.
    """

    def __init__(self, context: ssl.SSLContext, host: str, port: int, max_connections: int = MAX_CONNECTIONS):
        self._context = context
        self._listener = _listen(host, port)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._handshaking: dict[socket.socket, None] = {}  # connections in their handshake, oldest first
        self._handshaking_lock = threading.Lock()
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
            if not self._slots.acquire(blocking=False):
                self._drop_oldest_handshake()
                # Every place is relaying: new clients wait in the listen backlog until one ends.
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
            with self._handshaking_lock:
                self._handshaking[conn] = None
            try:
                tls = _handshake(self._context, conn, peer)
            finally:
                with self._handshaking_lock:
                    self._handshaking.pop(conn, None)
            if tls is not None:
                self._relay(tls, peer)
        finally:
            self._slots.release()

    def _drop_oldest_handshake(self) -> None:
        """End the handshake that began first: its thread sees the connection close and frees its place."""
        with self._handshaking_lock:
            oldest = next(iter(self._handshaking), None)
            self._handshaking.pop(oldest, None)
        if oldest is not None:
            try:
                oldest.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
