"""The SSRF guard against real loopback sockets.

"No connection attempted" is checked with Python's audit events (``socket.connect``,
``socket.getaddrinfo``), which report every socket the process opens without patching anything.
Only loopback is ever connected to: refused destinations are refused before any socket exists.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from facemllm.pipeline.demo.sample import package_photos
from facemllm.pipeline.demo.server import SampleServer
from facemllm.pipeline.stages.netguard import (
    DestinationPolicy,
    RefusedDestination,
    address_category,
    check_destination,
    install_guarded_opener,
)

DEFAULT = DestinationPolicy()
LOOPBACK_OK = DestinationPolicy(allow_loopback=True)
# Refusals happen before any socket exists, so they take microseconds; a connect attempt to an
# unroutable address would take seconds.
FAST_S = 0.5

_socket_events: list[tuple[str, tuple[Any, ...]]] | None = None


def _record_socket_events(event: str, args: tuple[Any, ...]) -> None:
    if _socket_events is not None and event in ("socket.connect", "socket.getaddrinfo"):
        _socket_events.append((event, args))


sys.addaudithook(_record_socket_events)  # audit hooks cannot be removed: it records only when asked


@pytest.fixture
def socket_events() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    global _socket_events
    _socket_events = []
    try:
        yield _socket_events
    finally:
        _socket_events = None


def connected_hosts(events: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    return [args[1][0] for event, args in events if event == "socket.connect"]


@pytest.fixture(autouse=True)
def default_opener() -> Iterator[None]:
    """Each test installs its own guard; put urllib's default back for the tests that follow."""
    yield
    urllib.request.install_opener(None)


@pytest.fixture(scope="module")
def server() -> Iterator[SampleServer]:
    with SampleServer(package_photos(), stall_s=3) as running:
        yield running


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # carrier-grade NAT: not private by RFC 1918, not global either
        ("fc00::1", "private"),
        ("::ffff:10.255.255.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:0a00:0001::1", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_category(address: str, category: str | None) -> None:
    assert address_category(ipaddress.ip_address(address)) == category


def test_policy_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        DestinationPolicy(allow_loopbak=True)  # type: ignore[call-arg]


def test_check_destination_applies_the_policy() -> None:
    with pytest.raises(
        RefusedDestination, match=r"refused destination 127\.0\.0\.1 \(loopback\) for host 127"
    ):
        check_destination("http://127.0.0.1:9/x.jpg", DEFAULT)
    assert check_destination("http://127.0.0.1:9/x.jpg", LOOPBACK_OK) == ["127.0.0.1"]
    metadata = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(RefusedDestination, match=r"169\.254\.169\.254 \(link-local\)"):
        check_destination(metadata, DestinationPolicy(allow_loopback=True, allow_private=True))
    assert check_destination(metadata, DestinationPolicy(allow_link_local=True)) == ["169.254.169.254"]
    with pytest.raises(RefusedDestination, match=r"0\.0\.0\.0 \(unspecified\)"):
        check_destination(
            "http://0.0.0.0/",
            DestinationPolicy(allow_loopback=True, allow_private=True, allow_link_local=True),
        )
    with pytest.raises(urllib.error.URLError, match="refused scheme 'file'"):
        check_destination("file:///etc/passwd", LOOPBACK_OK)


def test_loopback_refused_by_default_and_allowed_by_policy(server: SampleServer) -> None:
    url = server.photo_url("t1.jpg")
    before = server.request_count("/img/t1.jpg")
    install_guarded_opener(DEFAULT)
    with pytest.raises(RefusedDestination, match=r"refused destination 127\.0\.0\.1 \(loopback\)"):
        urllib.request.urlopen(url, timeout=5)
    assert server.request_count("/img/t1.jpg") == before

    install_guarded_opener(LOOPBACK_OK)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == server.photos["t1.jpg"].read_bytes()
    assert server.request_count("/img/t1.jpg") == before + 1


def test_localhost_name_refused_by_default_and_resolved_once(
    server: SampleServer, socket_events: list[tuple[str, tuple[Any, ...]]]
) -> None:
    url = server.photo_url("t1.jpg").replace("127.0.0.1", "localhost")
    install_guarded_opener(DEFAULT)
    with pytest.raises(RefusedDestination, match=r"\(loopback\) for host localhost"):
        urllib.request.urlopen(url, timeout=5)
    assert connected_hosts(socket_events) == []

    socket_events.clear()
    install_guarded_opener(LOOPBACK_OK)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
    # One lookup of the name, then a connect to the checked address: no second lookup that a
    # rebinding DNS server could answer differently.
    lookups = [args[0] for event, args in socket_events if event == "socket.getaddrinfo"]
    assert lookups.count("localhost") == 1
    assert connected_hosts(socket_events) == ["127.0.0.1"]


def test_redirect_hop_to_private_address_refused_without_connecting(
    server: SampleServer, socket_events: list[tuple[str, tuple[Any, ...]]]
) -> None:
    install_guarded_opener(LOOPBACK_OK)
    started = time.monotonic()
    with pytest.raises(RefusedDestination) as refused:
        urllib.request.urlopen(f"{server.base_url}/fault/redirect-private", timeout=5)
    assert time.monotonic() - started < FAST_S
    assert (
        str(refused.value)
        == "<urlopen error refused destination 10.255.255.1 (private) for host 10.255.255.1>"
    )
    assert connected_hosts(socket_events) == ["127.0.0.1"]  # the first hop only


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://169.254.169.254/latest/meta-data/", r"169\.254\.169\.254 \(link-local\)"),
        ("http://[::ffff:10.255.255.1]/x.jpg", r"::ffff:10\.255\.255\.1 \(private\)"),
        ("https://10.255.255.1/x.jpg", r"10\.255\.255\.1 \(private\)"),
        ("https://[fe80::1]/x.jpg", r"fe80::1 \(link-local\)"),
    ],
)
def test_non_loopback_destinations_refused_before_connecting(
    url: str, message: str, socket_events: list[tuple[str, tuple[Any, ...]]]
) -> None:
    install_guarded_opener(LOOPBACK_OK)
    started = time.monotonic()
    with pytest.raises(RefusedDestination, match=message):
        urllib.request.urlopen(url, timeout=5)
    assert time.monotonic() - started < FAST_S
    assert connected_hosts(socket_events) == []


def test_ipv4_mapped_loopback_is_loopback(server: SampleServer) -> None:
    url = server.photo_url("t1.jpg").replace("127.0.0.1", "[::ffff:127.0.0.1]")
    install_guarded_opener(DEFAULT)
    with pytest.raises(RefusedDestination, match=r"::ffff:127\.0\.0\.1 \(loopback\)"):
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.parametrize(
    "url", ["file:///etc/hostname", "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AA=="]
)
def test_only_http_and_https_are_spoken(url: str) -> None:
    install_guarded_opener(LOOPBACK_OK)
    with pytest.raises(urllib.error.URLError, match="unknown url type"):
        urllib.request.urlopen(url, timeout=5)


def test_installing_twice_replaces_the_guard(server: SampleServer) -> None:
    url = server.photo_url("t1.jpg")
    install_guarded_opener(LOOPBACK_OK)
    install_guarded_opener(LOOPBACK_OK)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
    install_guarded_opener(DEFAULT)
    with pytest.raises(RefusedDestination):
        urllib.request.urlopen(url, timeout=5)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, so HTTPS is tested with real verification."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class _OkHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_https_connects_to_the_checked_address_with_the_original_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, socket_events: list[tuple[str, tuple[Any, ...]]]
) -> None:
    cert_path, key_path = _self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OkHandler)
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    # The default HTTPS context reads SSL_CERT_FILE when each connection creates it.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    try:
        install_guarded_opener(LOOPBACK_OK)
        with urllib.request.urlopen(f"https://localhost:{httpd.server_address[1]}/", timeout=5) as response:
            assert response.read() == b"ok"
        assert connected_hosts(socket_events) == ["127.0.0.1"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_the_rate_bound_spaces_every_request_of_the_process(server: SampleServer) -> None:
    """download.max_requests_per_second: the opener img2dataset's threads share waits for a slot."""
    url = server.photo_url(sorted(server.photos)[0])

    def fetch_all(threads: int, each: int) -> float:
        started = time.monotonic()
        workers = [
            threading.Thread(
                target=lambda: [urllib.request.urlopen(url, timeout=5).read() for _ in range(each)]
            )
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.monotonic() - started

    install_guarded_opener(LOOPBACK_OK, max_requests_per_second=10)
    assert fetch_all(threads=4, each=3) >= 1.05  # 12 requests, the last no sooner than 1.1 s in
    install_guarded_opener(LOOPBACK_OK)
    assert fetch_all(threads=4, each=3) < 1.0
