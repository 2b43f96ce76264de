"""Issue 14, TLS: a self-signed certificate from the CLI, and the service over HTTPS behind its TLS frontend.

The fast tests put the real frontend in front of a real waitress and a small WSGI app in this
process; the slow ones talk to a real ``appliance serve`` with the bundled model, through the
official ``openai`` client.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
import waitress
from cryptography import x509

from appliance import certificates, tls_frontend
from appliance.config import ConfigError, load_settings
from tests.helpers import (COUNTING, ENDED_AT_ONCE, MODEL, assert_left_499, last_id, start_service, wait_finished,
                           wait_for_row)


def self_signed(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "tls", "self-signed", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=60)


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def certificate_errors(exc: BaseException) -> list[BaseException]:
    """The certificate failures in an exception's chain of causes."""
    found = []
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("tls")
    made = self_signed(out, "--host", "localhost", "--host", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    return out / "cert.pem", out / "key.pem"


# -- the settings and the files ---------------------------------------------------------------
@pytest.mark.parametrize("given", ["TLS_CERT", "TLS_KEY"])
def test_tls_cert_and_tls_key_come_together(tmp_path, given):
    with pytest.raises(ConfigError, match="appliance tls self-signed"):
        load_settings(environ={"APPLIANCE_HOME": str(tmp_path), f"APPLIANCE_{given}": "/etc/box/tls.pem"})
    both = load_settings(environ={"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_TLS_CERT": "~/c.pem",
                                  "APPLIANCE_TLS_KEY": "~/k.pem"})
    assert both.tls_cert == str(Path.home() / "c.pem") and both.tls_key == str(Path.home() / "k.pem")
    assert load_settings(environ={"APPLIANCE_HOME": str(tmp_path)}).tls_cert == ""


def test_self_signed_writes_a_private_key_and_a_certificate_for_every_host(tmp_path):
    made = self_signed(tmp_path, "--host", "box.lan", "--host", "192.168.1.20", "--days", "30")
    assert made.returncode == 0, made.stderr
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.stat().st_mode & 0o777 == 0o644
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["box.lan", "localhost"]  # loopback always: for local tools
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.168.1.20", "127.0.0.1"]
    assert 29 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    # What it prints: the fingerprint, the two config lines, and how clients pin the certificate.
    assert certificates.fingerprint(cert) in made.stdout
    assert f"tls_cert = {json.dumps(str(cert_path))}" in made.stdout
    assert f"tls_key = {json.dumps(str(key_path))}" in made.stdout
    assert "--cacert" in made.stdout and "SSL_CERT_FILE" in made.stdout

    again = self_signed(tmp_path, "--host", "box.lan")
    assert again.returncode != 0 and "--force" in again.stderr
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == cert
    assert self_signed(tmp_path, "--host", "box.lan", "--force").returncode == 0
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) != cert


def test_by_default_the_certificate_names_this_machine_and_loopback(tmp_path):
    cert_path, _, _ = certificates.write_self_signed(tmp_path, [])
    names = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == list(dict.fromkeys([socket.gethostname(), "localhost"]))
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_files_the_service_cannot_use_are_errors_that_name_them(tmp_path, pair):
    cert, key = pair
    other_cert, other_key, _ = certificates.write_self_signed(tmp_path / "other", ["localhost"])
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    cases = [(tmp_path / "missing.pem", key, "does not exist"), (cert, other_key, "does not belong"),
             (not_pem, key, "not a PEM certificate"), (cert, not_pem, "not a PEM private key")]
    for cert_file, key_file, problem in cases:
        with pytest.raises(certificates.TLSSetupError, match=problem) as failed:
            certificates.server_context(str(cert_file), str(key_file))
        assert "appliance tls self-signed" in str(failed.value)
        assert str(cert_file) in str(failed.value) or str(key_file) in str(failed.value)
    assert certificates.server_context(str(other_cert), str(other_key)).minimum_version == ssl.TLSVersion.TLSv1_2


def test_serve_refuses_a_key_of_another_certificate(tmp_path, pair):
    cert, _ = pair
    _, other_key, _ = certificates.write_self_signed(tmp_path / "other", ["localhost"])
    served = subprocess.run([sys.executable, "-m", "appliance", "serve", "--home", str(tmp_path / "home")],
                            env={**os.environ, "APPLIANCE_TLS_CERT": str(cert), "APPLIANCE_TLS_KEY": str(other_key)},
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 1
    assert f"the key {other_key} (tls_key) does not belong to the certificate {cert}" in served.stderr


# -- the frontend, in front of a real waitress in this process ----------------------------------
def echo_client(environ, start_response):
    """A WSGI app that answers with the client waitress (and the middleware) gave it."""
    seen = {name: environ[name] for name in ("REMOTE_ADDR", "REMOTE_PORT", "wsgi.url_scheme")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Box:
    """waitress on loopback behind a TLSFrontend, as appliance.server wires them."""

    def __init__(self, app, context: ssl.SSLContext):
        self.frontend = tls_frontend.TLSFrontend(context, "127.0.0.1", 0)
        self.server = waitress.create_server(self.frontend.wrap(app), host="127.0.0.1", port=0,
                                             channel_request_lookahead=1, threads=4)
        self.frontend.start(upstream_port=self.server.effective_port)
        threading.Thread(target=self.server.run, daemon=True).start()

    def connect(self, cert: Path, hostname: str = "localhost", **versions) -> ssl.SSLSocket:
        context = trusting(cert)
        for name, version in versions.items():
            setattr(context, name, version)
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.frontend.port), timeout=10),
                                   server_hostname=hostname)

    def close(self):
        self.frontend.close()
        self.server.close()


@pytest.fixture
def box(pair):
    boxes = []

    def start(app=echo_client):
        boxes.append(Box(app, certificates.server_context(*map(str, pair))))
        return boxes[-1]

    yield start
    for b in boxes:
        b.close()


def get(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_the_app_sees_the_real_client_and_https(box, pair):
    b = box()
    for _ in range(2):  # each connection its own client port
        with b.connect(pair[0]) as sock:
            seen = json.loads(get(sock).split(b"\r\n\r\n", 1)[1])
            here = sock.getsockname()
        assert seen == {"REMOTE_ADDR": here[0], "REMOTE_PORT": str(here[1]), "wsgi.url_scheme": "https"}
    deadline = time.monotonic() + 5
    while len(b.frontend.peers) and time.monotonic() < deadline:  # entries go when their connections end
        time.sleep(0.02)
    assert len(b.frontend.peers) == 0


def test_a_request_taken_up_after_its_client_left_still_has_its_peer():
    peers, port, peer = tls_frontend.Peers(linger=30), 50123, ("10.0.0.7", 41000)
    peers.add(port, peer)
    peers.remove(port, peer)
    assert len(peers) == 0 and peers.get(port) == peer  # lingers for a queued request's environ
    peers.linger = 0
    other = ("10.0.0.8", 41001)
    peers.add(50124, other)
    peers.remove(50124, other)  # each removal forgets the connections whose linger is over
    assert peers.get(port) is None and peers.get(50124) is None


def test_the_certificate_verifies_strictly_for_its_names_and_with_tls_1_2(box, pair):
    b = box()
    cert = pair[0]
    strict = trusting(cert)
    strict.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
    with strict.wrap_socket(socket.create_connection(("127.0.0.1", b.frontend.port), timeout=10),
                            server_hostname="127.0.0.1") as sock:
        assert b" 200 " in get(sock)
    with b.connect(cert, maximum_version=ssl.TLSVersion.TLSv1_2) as sock:
        assert sock.version() == "TLSv1.2"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        b.connect(cert, hostname="elsewhere.lan")
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(socket.create_connection(("127.0.0.1", b.frontend.port)),
                                                 server_hostname="localhost")


def test_plain_http_is_told_to_use_https_and_a_silent_client_is_let_go(box, monkeypatch):
    monkeypatch.setattr(tls_frontend, "HANDSHAKE_TIMEOUT", 0.5)
    b = box()
    answer = requests.get(f"http://127.0.0.1:{b.frontend.port}/", timeout=10)
    assert answer.status_code == 400 and "HTTPS" in answer.text and "REMOTE_ADDR" not in answer.text
    silent = socket.create_connection(("127.0.0.1", b.frontend.port), timeout=10)
    started = time.monotonic()
    assert silent.recv(1) == b""  # closed by the frontend, not by our timeout
    assert time.monotonic() - started < 5


def test_a_client_that_leaves_is_seen_by_waitress(box, pair):
    noticed = threading.Event()

    def endless(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        gone = environ["waitress.client_disconnected"]
        while not gone():
            yield b"tick\n"
            time.sleep(0.01)
        noticed.set()

    b = box(endless)
    sock = b.connect(pair[0])
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    received = b""
    while b"tick" not in received:  # the head may come alone
        received += sock.recv(65536)
    sock.close()
    assert noticed.wait(5), "waitress did not notice that the client left"


# -- the real service over HTTPS --------------------------------------------------------------
@pytest.fixture(scope="module")
def https_service(tmp_path_factory, pair):
    cert, key = pair
    svc = start_service(tmp_path_factory.mktemp("https-home"), ca_file=cert,
                        extra_env={"APPLIANCE_TLS_CERT": str(cert), "APPLIANCE_TLS_KEY": str(key)})
    yield svc
    svc.stop()


def pinned_client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.url + "/v1", api_key="not-needed", max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=trusting(svc.ca_file)))


@pytest.mark.slow
def test_the_openai_client_chats_over_https_with_the_pinned_certificate(https_service):
    svc = https_service
    client = pinned_client(svc)
    messages = [{"role": "user", "content": "Count from 1 to 5."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content
    row = svc.last_row()
    assert (row["status"], row["client"]) == (200, "127.0.0.1")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    text = "".join(event.choices[0].delta.content or "" for event in stream if event.choices)
    assert text == reply.choices[0].message.content
    assert "https://127.0.0.1:" in svc.output()


@pytest.mark.slow
def test_ssl_cert_file_pins_the_certificate_for_the_openai_client(https_service, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(https_service.ca_file))
    client = openai.OpenAI(base_url=https_service.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert client.models.list().data[0].id == MODEL  # the default first


@pytest.mark.slow
def test_a_client_that_does_not_trust_the_certificate_is_refused(https_service, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    client = openai.OpenAI(base_url=https_service.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    with pytest.raises(openai.APIConnectionError) as failed:
        client.models.list()
    assert certificate_errors(failed.value), repr(failed.value)
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(https_service.url + "/v1/models", timeout=10)


@pytest.mark.slow
def test_plain_http_to_the_https_port_is_not_served(https_service):
    before = last_id(https_service)
    answer = requests.post(f"http://127.0.0.1:{https_service.port}/v1/completions", timeout=10,
                           json={"prompt": "Hi", "max_tokens": 4})
    assert answer.status_code == 400 and "HTTPS" in answer.text
    assert last_id(https_service) == before


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_ends_its_row_499(https_service):
    svc = https_service
    before = last_id(svc)
    body = json.dumps(COUNTING | {"stream": True}).encode()
    sock = trusting(svc.ca_file).wrap_socket(socket.create_connection(("127.0.0.1", svc.port), timeout=60),
                                             server_hostname="127.0.0.1")
    sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 2:  # it is generating
        received += sock.recv(65536)
    row = wait_for_row(svc, before)
    sock.close()
    left = time.monotonic()
    row = wait_finished(svc, row["id"], timeout=60)
    assert time.monotonic() - left < ENDED_AT_ONCE, row
    assert_left_499(row, generated=True)
    assert row["client"] == "127.0.0.1"


@pytest.mark.slow
def test_the_status_command_reaches_the_https_service_with_its_certificate(https_service):
    env = {**os.environ, "APPLIANCE_HOME": str(https_service.home), "APPLIANCE_PORT": str(https_service.port),
           "APPLIANCE_TLS_CERT": str(https_service.ca_file), "APPLIANCE_TLS_KEY": str(https_service.ca_file)}
    status = subprocess.run([sys.executable, "-m", "appliance", "status", "--json"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["model"]["loaded"]
