"""Outbound HTTP that cannot be turned against the service's own network (SSRF).

Following OWASP's SSRF guidance, every URL the service fetches (``image_url``) or calls
(``webhook_url``) must be http(s), and every address its host resolves to must be public:
loopback, private, link-local (cloud metadata at 169.254.169.254), CGNAT, multicast,
unspecified, reserved and documentation ranges are refused, in their IPv6 forms too (``::1``,
``fc00::/7``, ``fe80::/10``, IPv4-mapped and NAT64 addresses are unwrapped and checked).

The check runs in the transport (:class:`GuardedTransport`, :class:`AsyncGuardedTransport`: the
same strategy in both), so it applies to every redirect hop, and the connection goes to the very
address that was checked: the transport's httpcore network backend connects to it, while the URL,
Host header, TLS SNI and certificate check keep the name. So a DNS answer that changes between
check and connect (rebinding) cannot slip through. Use :func:`guarded_client` or
:func:`async_guarded_client`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import urlsplit

import anyio.to_thread
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


class UnresolvableHostError(BlockedURLError):
    """The URL's host name does not resolve (right now): refused like any other blocked URL, but a
    caller that retries (webhook delivery) may treat it as a network failure."""


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
        try:
            url.encode("utf-8")  # an unpaired surrogate (JSON "\ud800") cannot be sent at all
            parts = urlsplit(url)
            hostname = parts.hostname
        except ValueError:  # an unclosed IPv6 bracket, characters NFKC turns into separators, surrogates, ...
            raise BlockedURLError("the URL cannot be parsed (check brackets and characters in its host)") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise BlockedURLError(f"only http and https URLs are allowed, not {parts.scheme or 'no scheme'!r}")
        if parts.username or parts.password:
            raise BlockedURLError("URLs with credentials (user:password@) are not allowed")
        host = (hostname or "").rstrip(".").lower()
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
            except socket.gaierror:
                raise UnresolvableHostError(f"cannot resolve host {host!r}") from None
            except UnicodeError:  # not a valid (IDNA) name: it never will resolve
                raise BlockedURLError(f"cannot resolve host {host!r}") from None
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise UnresolvableHostError(f"cannot resolve host {host!r}")
        if host in self.allowed_hosts:
            return str(addresses[0])
        for address in addresses:
            if any(_unwrap(address) in net or address in net for net in self.allowed_networks):
                continue
            if not is_public_address(address):
                shown = host if literal is None else str(literal)
                raise BlockedURLError(f"{shown} resolves to a private, loopback or reserved address, which is not allowed")
        return str(addresses[0])


class _Pins:
    """Which address each checked host may be connected to, for the request being sent.

    The pin lives in a context variable: each thread (sync clients) and each asyncio task (async
    clients, many requests on one event-loop thread) sees only its own request's pin. It is keyed
    by the backend, so a pin set for one transport never opens a connection for another.
    """

    _current: ContextVar[tuple[object, str, str] | None] = ContextVar("urlguard_pin", default=None)

    @contextmanager
    def pinned(self, host: str, address: str) -> Iterator[None]:
        token = self._current.set((self, _normal_host(host), address))
        try:
            yield
        finally:
            self._current.reset(token)

    def address_for(self, host: str) -> str:
        """The checked address for ``host``; refuses a connection the guard did not check."""
        pin = self._current.get()
        if pin is None or pin[0] is not self or pin[1] != _normal_host(host):
            raise httpcore.ConnectError(f"refusing to connect to {host!r}: it was not checked by the URL guard")
        return pin[2]


class _PinnedBackend(_Pins, httpcore.NetworkBackend):
    """httpcore's network backend, except that it connects only to the address that
    :class:`GuardedTransport` checked for the request being sent."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None) -> httpcore.NetworkStream:
        return self._backend.connect_tcp(self.address_for(host), port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("the URL guard does not connect to unix sockets")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncPinnedBackend(_Pins, httpcore.AsyncNetworkBackend):
    """The async twin of :class:`_PinnedBackend`, for :class:`AsyncGuardedTransport`."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        return await self._backend.connect_tcp(self.address_for(host), port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("the URL guard does not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _pin_pool(transport: httpx.BaseTransport | httpx.AsyncBaseTransport, wrapper: type[_Pins],
              expected: type) -> _Pins:
    """Replace the network backend of ``transport``'s connection pool by a pinning ``wrapper`` of it.

    httpx does not expose httpcore's ``network_backend``; without it there is no pinning, so
    refuse to build a transport rather than connect unchecked.
    """
    pool = transport._pool  # type: ignore[union-attr]
    backend = getattr(pool, "_network_backend", None)
    if not isinstance(backend, expected):
        raise RuntimeError(f"{type(transport).__name__} cannot pin connections with this httpx/httpcore version")
    pool._network_backend = pinned = wrapper(backend)
    return pinned


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
        self._backend = _pin_pool(self, _PinnedBackend, httpcore.SyncBackend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host, port = self.policy.check_url(str(request.url))
        address = self.policy.resolve(host, port)
        with self._backend.pinned(host, address):
            return super().handle_request(request)


class AsyncGuardedTransport(httpx.AsyncHTTPTransport):
    """:class:`GuardedTransport` for async clients, pinned the same way (by the network backend).

    The DNS lookup of the check runs in a worker thread (``getaddrinfo`` blocks), abandoned if the
    request is cancelled. The pin is per asyncio task, so concurrent requests on one event loop
    never see each other's addresses.
    """

    def __init__(self, policy: URLPolicy, **kwargs) -> None:
        super().__init__(**kwargs)
        self.policy = policy
        self._backend = _pin_pool(self, _AsyncPinnedBackend, httpcore.AsyncNetworkBackend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host, port = self.policy.check_url(str(request.url))
        address = await anyio.to_thread.run_sync(self.policy.resolve, host, port, abandon_on_cancel=True)
        with self._backend.pinned(host, address):
            return await super().handle_async_request(request)


def _client_options(timeout_s: float, follow_redirects: bool, headers: Mapping[str, str] | None) -> dict:
    return {
        "follow_redirects": follow_redirects,
        "max_redirects": MAX_REDIRECTS,
        "timeout": httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        "trust_env": False,  # no proxy from the environment: it would not be the checked address
        "headers": headers,
    }


def guarded_client(*, allow: Iterable[str] = (), timeout_s: float = READ_TIMEOUT_S, follow_redirects: bool = True,
                   headers: Mapping[str, str] | None = None) -> httpx.Client:
    """An httpx client for untrusted URLs: checked on every hop, at most 3 redirects, bounded timeouts."""
    return httpx.Client(transport=GuardedTransport(URLPolicy(allow)),
                        **_client_options(timeout_s, follow_redirects, headers))


def async_guarded_client(*, allow: Iterable[str] = (), timeout_s: float = READ_TIMEOUT_S,
                         follow_redirects: bool = True, headers: Mapping[str, str] | None = None) -> httpx.AsyncClient:
    """:func:`guarded_client` for async code (one :class:`AsyncGuardedTransport`)."""
    return httpx.AsyncClient(transport=AsyncGuardedTransport(URLPolicy(allow)),
                             **_client_options(timeout_s, follow_redirects, headers))
