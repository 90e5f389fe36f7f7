"""Outbound HTTP that cannot be turned against the service's own network (SSRF).

Following OWASP's SSRF guidance, every URL the service fetches (``image_url``) or calls
(``webhook_url``) must be http(s), and every address its host resolves to must be public:
loopback, private, link-local (cloud metadata at 169.254.169.254), CGNAT, multicast,
unspecified, reserved and documentation ranges are refused, in their IPv6 forms too (``::1``,
``fc00::/7``, ``fe80::/10``, IPv4-mapped and NAT64 addresses are unwrapped and checked).

The check runs in the transport, so it applies to every redirect hop, and the connection goes
to the very address that was checked (the transport's network backend connects to it; URL, Host,
TLS SNI and certificate check keep the name), so a DNS answer that changes between check and
connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import httpcore
import httpx

from pipelines.errors import InvalidInputError

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0

_BLOCKED_V4 = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
)]
_BLOCKED_V6 = [ipaddress.ip_network(n) for n in (
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
)]


class BlockedURLError(InvalidInputError):
    """The URL's scheme, host or resolved address is not allowed."""

    code = "url_not_allowed"


def _unwrap(address: ipaddress._BaseAddress) -> ipaddress._BaseAddress:
    """IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible, 6to4 and NAT64 addresses hide an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if int(address) >> 32 == 0 and int(address) > 1:  # deprecated IPv4-compatible ::a.b.c.d
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public_address(address: str | ipaddress._BaseAddress) -> bool:
    ip = _unwrap(ipaddress.ip_address(address) if isinstance(address, str) else address)
    blocked = _BLOCKED_V4 if ip.version == 4 else _BLOCKED_V6
    return not any(ip in network for network in blocked) and ip.is_global


class URLPolicy:
    """Allowed schemes and addresses, with an allowlist for trusted internal hosts."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list = []
        for entry in allow:
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower().rstrip("."))

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of an acceptable URL; raises BlockedURLError."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise BlockedURLError(f"only http and https URLs are allowed, not {parts.scheme or 'no scheme'!r}")
        if parts.username or parts.password:
            raise BlockedURLError("URLs with credentials (user:password@) are not allowed")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise BlockedURLError("the URL has no host")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise BlockedURLError("the URL's port is not a number between 0 and 65535") from None
        return host, port

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to: every address the host resolves to must be allowed."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
            addresses = [literal]
        except ValueError:
            literal = None
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise BlockedURLError(f"cannot resolve host {host!r}") from None
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise BlockedURLError(f"cannot resolve host {host!r}")
        if host in self.allowed_hosts:
            return str(addresses[0])
        for address in addresses:
            if any(_unwrap(address) in net or address in net for net in self.allowed_networks):
                continue
            if not is_public_address(address):
                shown = host if literal is None else str(literal)
                raise BlockedURLError(f"{shown} resolves to a private, loopback or reserved address, which is not allowed")
        return str(addresses[0])


class _PinnedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, except that it connects only to the address that
    :class:`GuardedTransport` checked for the request being sent from this thread."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
        self._local = threading.local()

    @contextmanager
    def pinned(self, host: str, address: str) -> Iterator[None]:
        previous = getattr(self._local, "pin", None)
        self._local.pin = (host, address)
        try:
            yield
        finally:
            self._local.pin = previous

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None) -> httpcore.NetworkStream:
        pin = getattr(self._local, "pin", None)
        if pin is None or pin[0] != _normal_host(host):
            raise httpcore.ConnectError(f"refusing to connect to {host!r}: it was not checked by the URL guard")
        return self._backend.connect_tcp(pin[1], port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("the URL guard does not connect to unix sockets")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class GuardedTransport(httpx.HTTPTransport):
    """Checks each request (each redirect hop) and connects to the checked address.

    The request itself is sent unchanged: URL, ``Host`` header, TLS SNI and certificate check all
    keep the name, and pooled connections are keyed by it (so a TLS connection verified for one
    name is never reused for another name on the same address). Only the TCP connect is pinned,
    by the network backend, to the address :meth:`URLPolicy.resolve` returned for this hop.
    """

    def __init__(self, policy: URLPolicy, **kwargs) -> None:
        super().__init__(**kwargs)
        self.policy = policy
        self._backend = _PinnedBackend()
        # httpx does not expose httpcore's ``network_backend``; without it there is no pinning,
        # so refuse to build a transport rather than connect unchecked.
        if not isinstance(getattr(self._pool, "_network_backend", None), httpcore.SyncBackend):
            raise RuntimeError("GuardedTransport cannot pin connections with this httpx/httpcore version")
        self._pool._network_backend = self._backend

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host, port = self.policy.check_url(str(request.url))
        address = self.policy.resolve(host, port)
        with self._backend.pinned(_normal_host(host), address):
            return super().handle_request(request)


def guarded_client(*, allow: Iterable[str] = (), timeout_s: float = READ_TIMEOUT_S) -> httpx.Client:
    """An httpx client for untrusted URLs: checked on every hop, at most 3 redirects, bounded timeouts."""
    return httpx.Client(
        transport=GuardedTransport(URLPolicy(allow)),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        trust_env=False,
    )
