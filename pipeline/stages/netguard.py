"""Refuse downloads from private, loopback and link-local addresses (SSRF guard for img2dataset).

A LAION url list is untrusted input: a row can point at a cloud metadata service (169.254.169.254),
a service on the worker's private network, or ``file:///etc/passwd``. img2dataset 1.47 downloads
with ``urllib.request.urlopen(request, timeout=...)``, which uses the process-global opener, so
``install_guarded_opener`` replaces that opener with one that:

- speaks only ``http`` and ``https`` (no ``file:``, ``ftp:`` or ``data:`` handlers: those schemes
  fail with "unknown url type");
- ignores proxy environment variables, since through a proxy the guard would only see the proxy;
- resolves each host once, refuses it when ANY resolved address is in a forbidden range, and then
  connects only to the addresses it checked. A DNS answer that changes between check and connect
  (DNS rebinding) therefore cannot redirect the connection: there is no second lookup;
- applies the same check to every redirect hop, because urllib's redirect handler re-opens the new
  url through this opener.

The opener is per process: every worker process that downloads (img2dataset's spawned processes,
each Beam worker's ``DoFn.setup``) must call ``install_guarded_opener`` itself.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import ConfigDict

from facemllm.pipeline.core.ratelimit import RateLimit
from facemllm.schemas import StrictModel

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}


class DestinationPolicy(StrictModel):
    """Which non-public address ranges a download may reach; everything is refused by default.

    Multicast, reserved and unspecified (0.0.0.0, ::) addresses are always refused: no legitimate
    image host lives there, and 0.0.0.0 reaches the local machine on Linux.
    """

    model_config = ConfigDict(frozen=True)

    allow_loopback: bool = False
    allow_private: bool = False
    allow_link_local: bool = False


class RefusedDestination(urllib.error.URLError):
    """A url whose host resolves to an address the policy forbids; raised before any connection."""

    def __init__(self, host: str, address: str, category: str) -> None:
        super().__init__(f"refused destination {address} ({category}) for host {host}")
        self.host = host
        self.address = address
        self.category = category


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address delivers to: mapped (``::ffff:a.b.c.d``), NAT64 or 6to4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_category(address: IPAddress) -> str | None:
    """Name the non-public range an address belongs to (None for a public address).

    IPv6 addresses that carry an IPv4 address (``::ffff:10.0.0.1``, NAT64, 6to4) are judged as
    that IPv4 address, because that is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        address = _embedded_ipv4(address) or address
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private or not address.is_global:
        return "private"
    return None


def _allowed(category: str, policy: DestinationPolicy) -> bool:
    return (
        (category == "loopback" and policy.allow_loopback)
        or (category == "private" and policy.allow_private)
        or (category == "link-local" and policy.allow_link_local)
    )


def resolve_checked(host: str, port: int, policy: DestinationPolicy) -> list[str]:
    """Resolve ``host`` once and return its addresses, refusing if any of them is forbidden.

    Refusing when ANY address is forbidden (not just the first) matters because a connection
    falls through to the next address when one fails.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise urllib.error.URLError(err) from err  # the same error urllib gives unguarded
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        category = address_category(ipaddress.ip_address(address))
        if category is not None and not _allowed(category, policy):
            raise RefusedDestination(host, address, category)
    return addresses


def check_destination(url: str, policy: DestinationPolicy) -> list[str]:
    """Refuse ``url`` unless it is http(s) and every address of its host is allowed.

    Returns the checked addresses, so a caller can connect to exactly those.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise urllib.error.URLError(f"refused scheme {parts.scheme!r} in {url!r}: only http and https")
    if not parts.hostname:
        raise urllib.error.URLError(f"no host in {url!r}")
    return resolve_checked(parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme], policy)


class _PinnedConnectionMixin:
    """Checks the host when the connection is built and later connects only to checked addresses.

    The check runs in ``__init__`` because urllib's ``do_open`` builds the connection outside its
    ``try``: the refusal reaches the caller as a ``RefusedDestination``, not wrapped twice.
    """

    host: str
    port: int

    def __init__(self, host: str, *, policy: DestinationPolicy, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)  # type: ignore[call-arg]  # parses host and port
        self._checked_addresses = resolve_checked(self.host, self.port, policy)
        # http.client connects through this attribute (HTTPS wraps the socket afterwards, with
        # the original host name for SNI and certificate checks).
        self._create_connection = self._connect_to_checked_address

    def _connect_to_checked_address(
        self, address: tuple[str, int], timeout: Any, source_address: Any = None
    ) -> socket.socket:
        last_error: OSError | None = None
        for checked in self._checked_addresses:
            try:
                return socket.create_connection((checked, address[1]), timeout, source_address)
            except OSError as err:
                last_error = err
        assert last_error is not None  # resolve_checked never returns an empty list
        raise last_error


class _PinnedHTTPConnection(_PinnedConnectionMixin, http.client.HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, http.client.HTTPSConnection):
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: DestinationPolicy, rate: RateLimit | None = None) -> None:
        super().__init__()
        self._policy = policy
        self._rate = rate

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        if self._rate is not None:
            self._rate.wait()
        return self.do_open(_PinnedHTTPConnection, req, policy=self._policy)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: DestinationPolicy, rate: RateLimit | None = None) -> None:
        super().__init__()
        self._policy = policy
        self._rate = rate

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        if self._rate is not None:
            self._rate.wait()
        return self.do_open(_PinnedHTTPSConnection, req, policy=self._policy, context=self._context)


def guarded_opener(
    policy: DestinationPolicy, max_requests_per_second: float | None = None
) -> urllib.request.OpenerDirector:
    """An opener with only the guarded http(s) handlers and urllib's error and redirect handling;
    every request (redirect hops included) waits for its slot under ``max_requests_per_second``.

    Built by hand rather than with ``build_opener``, which would add the proxy, ftp, file and data
    handlers back.
    """
    rate = RateLimit(max_requests_per_second) if max_requests_per_second else None
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHTTPHandler(policy, rate),
        _GuardedHTTPSHandler(policy, rate),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


def install_guarded_opener(
    policy: DestinationPolicy, max_requests_per_second: float | None = None
) -> urllib.request.OpenerDirector:
    """Make every ``urllib.request.urlopen`` in this process go through the guard (and the rate
    bound, shared by all of the process's download threads).

    Calling it again replaces the guard with one for the new policy (it never stacks).
    """
    opener = guarded_opener(policy, max_requests_per_second)
    urllib.request.install_opener(opener)
    return opener
