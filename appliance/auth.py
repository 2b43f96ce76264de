"""API keys, roles and the browser-safety checks, run before every request.

A key is ``sk-<id>-<secret>``: the id is public (it is what the log records,
``keys list`` shows and ``keys revoke`` takes), the secret is stored only as a
salted scrypt hash, so lookup is by id and verification by hash. A key has a
role: ``user`` may call ``/v1/*``, ``admin`` also the admin API (``/api/*``),
``auditor`` may only read the log (``/api/logs``) and the metrics, ``metrics``
(a scrape token for Prometheus) only the metrics. A key may carry its own token
buckets (requests and generated tokens per minute) and a priority class.

When keys are required (setting ``auth``):
- ``required``: always;
- ``auto`` (the default): when the service listens beyond loopback, or once any
  key exists (a box whose operator made keys expects them to be enforced);
- ``off``: never (for a box behind a reverse proxy that authenticates).

While keys are not required every request is served as before; a valid key that
comes along still names the client (its priority class, its token bucket, the
key id in the log). Health probes, the UI page and its static files are always open:
they hold nothing of the log; the UI asks for a key when the API answers 401.

Browser safety, whatever the auth mode: the Host header must name this box (a loopback name,
an IP address, or a name in ``allowed_hosts``) against DNS rebinding; a POST must carry
``Content-Type: application/json`` (a cross-site form or ``text/plain`` POST cannot) and, when it
has an Origin, one that matches its Host (against CSRF).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

from flask import Flask, current_app, g, request

from appliance.errors import APIError
from appliance.state import state

log = logging.getLogger(__name__)

ROLES = ("user", "admin", "auditor", "metrics")  # metrics: a scrape token, /metrics only
PREFIX = "sk-"
# scrypt at the cost the Python docs and OWASP suggest for interactive logins (16 MiB, ~50 ms).
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
OPEN_PATHS = ("/healthz", "/readyz", "/", "/favicon.ico", "/openapi.json")
# Who may call what: the first prefix that matches decides; anything else needs a key of any role.
RULES = (
    ("/v1/", {"user", "admin"}),
    ("/api/logs", {"admin", "auditor"}),
    ("/metrics", {"admin", "auditor", "metrics"}),
    ("/api/", {"admin"}),
)
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
# The UI page: its own script and stylesheet only, never inside another site's frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
CREATE_ADMIN = "appliance keys create --role admin"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"


class UnsupportedMediaType(APIError):
    status = 415


class AuthSetupError(Exception):
    """The service would listen without the keys it needs; the message says how to make one."""


@dataclass(frozen=True)
class Key:
    """A verified key: what a request may do and who it is, never the secret."""

    id: str
    role: str
    name: str | None = None
    priority: str | None = None
    rpm: int | None = None  # the key's own token buckets; None: the service's rate_limit_rpm / _tpm
    tpm: int | None = None


# -- keys --------------------------------------------------------------------------------------
def new_key() -> tuple[str, str]:
    """A fresh (key id, full key); the full key is shown once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def hash_secret(key: str, salt: bytes | None = None, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
                p: int = SCRYPT["p"]) -> dict:
    """The columns that store a key: its salt, scrypt's parameters and the hash."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20, dklen=32)
    return {"salt": salt.hex(), "scrypt_n": n, "scrypt_r": r, "scrypt_p": p, "hash": digest.hex()}


def parse_key(presented: str) -> str | None:
    """The key id inside ``sk-<id>-<secret>``, or None when it has not that shape."""
    if not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX):].partition("-")
    return key_id if sep and secret and key_id.isalnum() and len(key_id) <= 32 else None


def parse_expiry(text: str) -> str:
    """A date or date-time from the command line as ISO 8601 UTC; a bare date means the end of that day."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--expires must be a date (2027-01-31) or an ISO date-time, got {text!r}") from None
    if len(text) <= 10:
        when = when.replace(hour=23, minute=59, second=59)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def key_state(row: dict, now: str | None = None) -> str:
    """active, expired or revoked."""
    if row["revoked"]:
        return "revoked"
    now = now or datetime.now(timezone.utc).isoformat(timespec="seconds")
    if row["expires"] and row["expires"] <= now:
        return "expired"
    return "active"


class KeyVerifier:
    """Checks presented keys against the database; scrypt runs once per key and process, not per request.

    The row is read on every request, so a revocation or an expiry takes effect at once.
    """

    def __init__(self, db):
        self.db = db
        self._verified: dict[str, bytes] = {}  # key id -> sha256 of the key that passed scrypt

    def verify(self, presented: str) -> Key:
        key_id = parse_key(presented)
        row = self.db.get_api_key(key_id) if key_id else None
        if row is None or not self._matches(row, presented):
            raise AuthenticationError("invalid API key: send 'Authorization: Bearer sk-...' with a key from "
                                      "'appliance keys create'", code="invalid_api_key")
        state = key_state(row)
        if state != "active":
            raise AuthenticationError(f"API key {key_id} is {state}: ask an admin for a new one "
                                      "('appliance keys create')", code=f"{state}_api_key")
        return Key(id=row["id"], role=row["role"], name=row["name"], priority=row["priority"], rpm=row["rpm"],
                   tpm=row["tpm"])

    def _matches(self, row: dict, presented: str) -> bool:
        quick = hashlib.sha256(presented.encode()).digest()
        known = self._verified.get(row["id"])
        if known is not None and hmac.compare_digest(known, quick):
            return True
        stored = hash_secret(presented, bytes.fromhex(row["salt"]), row["scrypt_n"], row["scrypt_r"], row["scrypt_p"])
        if not hmac.compare_digest(stored["hash"], row["hash"]):
            return False
        self._verified[row["id"]] = quick
        return True


# -- where the service listens ----------------------------------------------------------------
def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_required(settings, db) -> bool:
    if settings.auth == "off":
        return False
    return settings.auth == "required" or not is_loopback(settings.host) or db.has_api_keys()


def check_startup(settings, db) -> None:
    """Refuse to serve when keys are required and no admin key could ever manage the box."""
    if settings.auth == "off":
        if not is_loopback(settings.host):
            log.warning("auth = \"off\" while listening on %s: anything that reaches the port may use the box, "
                        "read its log and unload the model", settings.host)
        return
    if keys_required(settings, db) and not db.has_api_keys(role="admin"):
        where = ("beyond loopback" if not is_loopback(settings.host) else "with auth = \"required\""
                 if settings.auth == "required" else "with API keys in force: a key exists")
        raise AuthSetupError(
            f"refusing to listen on {settings.host} ({where}) without an admin API key: create one with "
            f"'{CREATE_ADMIN}' (it is shown once), then start the service again"
        )


# -- the checks before every request ----------------------------------------------------------
def _host_allowed(host_header: str, allowed: list[str]) -> bool:
    host = urlsplit(f"//{host_header}").hostname or ""
    if is_loopback(host) or "*" in allowed:
        return True
    try:
        ipaddress.ip_address(host)
        return True  # an address, not a name: DNS rebinding needs a name that the attacker controls
    except ValueError:
        pass
    names = [name.lower() for name in allowed]
    return any(host == name or (name.startswith(".") and (host.endswith(name) or host == name[1:])) for name in names)


def _same_origin(origin: str, host_header: str) -> bool:
    try:
        parts = urlsplit(origin)
        there = urlsplit(f"//{host_header}")
        default = {"http": 80, "https": 443}.get(parts.scheme)
        return (parts.scheme in ("http", "https") and parts.hostname is not None
                and parts.hostname == there.hostname and (parts.port or default) == (there.port or default))
    except ValueError:  # a malformed port
        return False


def check_host() -> None:
    host = request.environ.get("HTTP_HOST")  # HTTP/1.0 clients may send none; browsers always do
    if host is not None and not _host_allowed(host, state().settings.allowed_hosts):
        raise APIError(f"Host {host!r} is not one of this box's names: add it to the allowed_hosts setting "
                       "(loopback names and IP addresses are always accepted)", code="host_not_allowed", status=400)


def check_origin() -> None:
    origin = request.headers.get("Origin")
    host = request.environ.get("HTTP_HOST", "")
    if origin is not None and not _same_origin(origin, host):
        raise PermissionDenied(f"cross-origin request refused: Origin {origin!r} is not this box ({host!r})",
                               code="cross_origin")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise PermissionDenied("cross-site request refused", code="cross_origin")


def check_content_type() -> None:
    if request.mimetype != "application/json":
        got = request.content_type or "none"
        raise UnsupportedMediaType(f"request bodies must be JSON: send 'Content-Type: application/json' (got {got})",
                                   code="unsupported_media_type")


def authenticate() -> Key | None:
    """The request's verified key (None without one while keys are not required); raises 401 or 403."""
    st = state()
    required = keys_required(st.settings, st.db)
    presented = _bearer()
    key = None
    if presented is not None:
        try:
            key = current_app.extensions["appliance.auth"].verify(presented)
        except AuthenticationError:
            if required:
                raise
            # Keys are not in force: a client that sends any token (the openai client must) is served as before.
    if not required:
        return key
    if key is None:
        raise AuthenticationError("this box needs an API key: send 'Authorization: Bearer sk-...'; an admin "
                                  "creates one with 'appliance keys create --role user'", code="missing_api_key")
    roles = _roles_for(request.path)
    if key.role not in roles:
        raise PermissionDenied(f"a {key.role} key may not call {request.method} {request.path}: it needs a key "
                               f"with the role {' or '.join(sorted(roles))}", code="wrong_role")
    return key


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _roles_for(path: str) -> set[str]:
    for prefix, roles in RULES:
        if path.startswith(prefix):
            return roles
    return set(ROLES) - {"metrics"}  # a scrape token reads the metrics and nothing else


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _before_request():
    g.api_key = None
    if request.path in ("/healthz", "/readyz"):
        return  # probes answer whoever asks: systemd, a watchdog, a load balancer
    check_host()
    if request.method not in ("GET", "HEAD", "OPTIONS"):  # the ones that change state
        check_origin()
        check_content_type()
    if not _is_open(request.path):
        g.api_key = authenticate()


def _security_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.status_code == 401:
        response.headers.setdefault("WWW-Authenticate", 'Bearer realm="appliance"')
    return response


def init_app(app: Flask) -> None:
    st = app.extensions["appliance"]
    check_startup(st.settings, st.db)
    app.extensions["appliance.auth"] = KeyVerifier(st.db)
    app.before_request(_before_request)
    app.after_request(_security_headers)


# -- what the queue needs of a key --------------------------------------------------------------
def client_id() -> str:
    """The token-bucket client: the key id when a key came with the request, else the peer address."""
    key = g.get("api_key")
    return f"key:{key.id}" if key else (request.remote_addr or "")


def client_limits() -> tuple[int | None, int | None]:
    """The key's own requests and tokens per minute; (None, None) leaves the service's."""
    key = g.get("api_key")
    return (key.rpm, key.tpm) if key else (None, None)


def request_priority(requested: str | None, classes: dict) -> str | None:
    """The key's priority class is the default; a request may ask for a lower class, never a higher one."""
    key = g.get("api_key")
    if key is None or key.priority is None:
        return requested
    if requested is None or requested == key.priority:
        return key.priority
    mine, asked = classes.get(key.priority), classes.get(requested)
    if mine is not None and asked is not None and asked.priority > mine.priority:
        raise PermissionDenied(f"key {key.id} may use priority class {key.priority!r} or a lower one, "
                               f"not {requested!r}", param="priority", code="priority_not_allowed")
    return requested
