"""The SSRF guard (serve/urlguard.py, issue #4), exercised end to end over loopback.

Nothing here mocks the guard. Test servers listen on 127.0.0.x / ::1 and count every TCP
connection they accept, ``socket.create_connection`` and ``anyio.connect_tcp`` (what httpcore's
sync and async backends connect with) are wrapped to record every connection attempt, and DNS is
replaced by a fake ``socket.getaddrinfo`` only in the tests that need a name to resolve somewhere
(rebinding, allowlisted names). The client tests run twice, ``[sync]`` (:class:`GuardedTransport`)
and ``[async]`` (:class:`AsyncGuardedTransport`): both must pin the same way.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import random
import socket
import socketserver
import threading
import time

import anyio
import httpx
import pytest

from serve.urlguard import (
    CONNECT_TIMEOUT_S,
    MAX_REDIRECTS,
    AsyncGuardedTransport,
    BlockedURLError,
    GuardedTransport,
    UnresolvableHostError,
    URLPolicy,
    async_guarded_client,
    guarded_client,
    is_public_address,
)

pytestmark = pytest.mark.timeout(30)

_real_getaddrinfo = socket.getaddrinfo
_real_create_connection = socket.create_connection


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback()

# -- hostile URLs (data) ------------------------------------------------------------------------

# Every one of these must be refused with BlockedURLError, before any connection is attempted.
HOSTILE_URLS = [
    # loopback, in every spelling
    "http://127.0.0.1/",
    "https://127.0.0.1/",
    "http://localhost/",
    "HTTP://LOCALHOST./",
    "http://127.0.0.1./",
    "http://[::1]/",
    "http://0.0.0.0/",
    "http://0/",
    "http://2130706433/",  # decimal
    "http://0x7f000001/",  # hex
    "http://0x7f.1/",  # hex, short form
    "http://0177.0.0.1/",  # octal
    "http://127.1/",  # short form
    "http://127.0.0.1:22/",
    "http://example.com@127.0.0.1/",  # userinfo trick (also: credentials)
    "http://127.0.0.1#@example.com/",  # fragment trick: the host is 127.0.0.1
    # private, CGNAT, link-local / cloud metadata, multicast, broadcast, reserved
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://192.0.2.1/",  # TEST-NET-1 (documentation)
    "http://198.18.0.1/",  # benchmarking
    # IPv6 forms
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25lo]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:7f00:1]/",  # IPv4-mapped, hex
    "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped 169.254.169.254
    "http://[::127.0.0.1]/",  # deprecated IPv4-compatible
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[2002:c0a8:0101::1]/",  # 6to4 of 192.168.1.1
    "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 169.254.169.254
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    # credentials, schemes, malformed
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/",
    "ftp://example.com/x",
    "dict://127.0.0.1:11211/",
    "ldap://127.0.0.1/",
    "javascript:alert(1)",
    "data:text/plain,hello",
    "http:///nohost",
    "https:/127.0.0.1/",
    "//127.0.0.1/",
    "127.0.0.1",
    "http://127.0.0.1:99999/",
]

# httpx's own URL parser refuses these before the request reaches the transport (InvalidURL):
# still no connection, but the error is httpx's, not the guard's.
REFUSED_BY_HTTPX_PARSER = {"http://0177.0.0.1/", "http://127.0.0.1:99999/"}

# Loopback spellings with the port of a live trap server (listening on [::] and 0.0.0.0):
# if the guard let one through, the trap would see the connection.
LIVE_HOSTILE_URLS = [
    "http://127.0.0.1:{port}/",
    "http://127.0.0.2:{port}/",
    "http://localhost:{port}/",
    "http://0.0.0.0:{port}/",
    "http://0:{port}/",
    "http://2130706433:{port}/",
    "http://0x7f000001:{port}/",
    "http://127.1:{port}/",
    "http://[::1]:{port}/",
    "http://[::]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
]


# -- test servers -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        server: Server = self.server  # type: ignore[assignment]
        with server.lock:
            server.requests.append((self.path, dict(self.headers.items())))
        status, headers, body = server.routes.get(self.path, (200, {}, b"ok"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A tiny HTTP server on ``host`` that records requests and counts accepted connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int = 0, routes: dict | None = None, *, dual_stack: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.dual_stack = dual_stack
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict]] = []
        self.connections = 0
        self.routes = routes if routes is not None else {}
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def url(self, path: str = "/") -> str:
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}{path}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers():
    """Factory: ``servers(host, port=0, routes=None)``; every server is stopped afterwards."""
    started: list[Server] = []

    def start(host: str, port: int = 0, routes: dict | None = None, **kwargs) -> Server:
        server = Server(host, port, routes, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def trap():
    """A server that must never be reached: [::] dual-stack (all of 127/8, ::1, ::ffff:127...)."""
    if HAS_IPV6:
        server = Server("::", dual_stack=True)
    else:
        server = Server("0.0.0.0")
    yield server
    server.stop()


@pytest.fixture
def connections(monkeypatch):
    """Every address httpcore tried to connect to, sync or async (the real connect still happens)."""
    attempts: list[tuple] = []
    real_connect_tcp = anyio.connect_tcp

    def recording_create_connection(address, *args, **kwargs):
        attempts.append(address)
        return _real_create_connection(address, *args, **kwargs)

    async def recording_connect_tcp(remote_host, remote_port, **kwargs):
        attempts.append((remote_host, remote_port))
        return await real_connect_tcp(remote_host, remote_port, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording_create_connection)
    monkeypatch.setattr(anyio, "connect_tcp", recording_connect_tcp)
    return attempts


class OnOwnLoop:
    """An ``httpx.AsyncClient`` driven from these synchronous tests, on an event loop of its own
    for the client's whole life (its connection pool belongs to that loop)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def get(self, url: str) -> httpx.Response:
        return self.loop.run_until_complete(self.client.get(url))

    def __enter__(self) -> "OnOwnLoop":
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.loop.run_until_complete(self.client.aclose())
        finally:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def open_client(kind):
    """``guarded_client(**kwargs)``, or ``async_guarded_client(**kwargs)`` on its own loop."""

    def open_(**kwargs):
        return guarded_client(**kwargs) if kind == "sync" else OnOwnLoop(async_guarded_client(**kwargs))

    return open_


@pytest.fixture
def client_over(kind):
    """A plain client over a guarded transport (``GuardedTransport`` or ``AsyncGuardedTransport``)."""

    def make(policy: URLPolicy, *, client_kwargs: dict | None = None, **transport_kwargs):
        if kind == "sync":
            return httpx.Client(transport=GuardedTransport(policy, **transport_kwargs), **(client_kwargs or {}))
        transport = AsyncGuardedTransport(policy, **transport_kwargs)
        return OnOwnLoop(httpx.AsyncClient(transport=transport, **(client_kwargs or {})))

    return make


class FakeDNS:
    """Replaces ``socket.getaddrinfo`` for names under ``.test``; everything else resolves as usual."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: list[str] = []

    def set(self, name: str, *answers: list[str]) -> None:
        """Successive answers for ``name``; the last one repeats."""
        self.answers[name] = [list(a) for a in answers]

    def count(self, name: str) -> int:
        return self.calls.count(name)

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            if isinstance(name, str) and name.endswith(".test"):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        self.calls.append(name)
        queue = self.answers[name]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        infos = []
        for ip in answer:
            if ":" in ip:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, int(port or 0), 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port or 0))))
        return infos


@pytest.fixture
def dns(monkeypatch):
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


# -- 1. hostile URLs ----------------------------------------------------------------------------


def test_enough_hostile_urls():
    assert len(HOSTILE_URLS) >= 25
    assert len(set(HOSTILE_URLS)) == len(HOSTILE_URLS)


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_policy_refuses_hostile_url(url, connections):
    policy = URLPolicy()
    with pytest.raises(BlockedURLError):
        host, port = policy.check_url(url)
        policy.resolve(host, port)
    assert connections == []


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_guarded_client_refuses_hostile_url(url, connections, open_client):
    expected = (BlockedURLError, httpx.InvalidURL) if url in REFUSED_BY_HTTPX_PARSER else BlockedURLError
    with open_client(timeout_s=2) as client:
        with pytest.raises(expected):
            client.get(url)
    assert connections == []


@pytest.mark.parametrize("template", LIVE_HOSTILE_URLS)
def test_guarded_client_never_reaches_loopback_trap(template, trap, connections, open_client):
    if "[" in template and not HAS_IPV6:
        pytest.skip("no IPv6 loopback")
    url = template.format(port=trap.port)
    before = trap.connections
    with open_client(timeout_s=2) as client:
        with pytest.raises(BlockedURLError):
            client.get(url)
    with pytest.raises(BlockedURLError):
        check_and_resolve(URLPolicy(), url)
    assert connections == []
    assert trap.connections == before


def test_fetch_image_url_passes_the_refusal_through(trap, connections):
    from pipelines.images import fetch_image_url

    with guarded_client(timeout_s=2) as client:
        for url in (f"http://127.0.0.1:{trap.port}/a.png", "http://169.254.169.254/latest/meta-data/",
                    "http://[::ffff:10.0.0.1]/x.png"):
            with pytest.raises(BlockedURLError):
                fetch_image_url(url, client=client)
    assert connections == [] and trap.requests == []


def check_and_resolve(policy: URLPolicy, url: str) -> str:
    return policy.resolve(*policy.check_url(url))


@pytest.mark.parametrize("address", [
    "93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "::ffff:8.8.8.8",
])
def test_public_addresses_pass(address):
    assert is_public_address(address)
    assert is_public_address(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    assert check_and_resolve(URLPolicy(), f"https://{host}/img.png") == str(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.64.0.1",
    "100.127.255.255", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fc00::1", "fdff::1",
    "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::1", "2002:c0a8:101::1", "2002:7f00:1::", "::7f00:1",
])
def test_private_addresses_refused(address):
    assert not is_public_address(address)


# -- 2. redirects -------------------------------------------------------------------------------


REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://2130706433:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
]


@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_redirect_to_a_blocked_address_is_refused_on_that_hop(target, servers, trap, connections, open_client):
    if "[" in target and not HAS_IPV6:
        pytest.skip("no IPv6 loopback")
    location = target.format(port=trap.port)
    origin = servers("127.0.0.2", routes={"/go": (302, {"Location": location}, b"")})
    before = trap.connections
    with open_client(allow=["127.0.0.2"], timeout_s=2) as client:
        with pytest.raises(BlockedURLError):
            client.get(origin.url("/go"))
    assert [path for path, _ in origin.requests] == ["/go"]  # the first hop was made...
    assert trap.connections == before  # ...the redirect hop was not
    assert connections == [("127.0.0.2", origin.port)]


def _chain(servers, redirects: int):
    """Servers on 127.0.0.2 and 127.0.0.3 (both allowlisted) redirecting to each other ``redirects`` times."""
    a = servers("127.0.0.2")
    b = servers("127.0.0.3")
    hops = [(a if i % 2 == 0 else b, f"/hop{i}") for i in range(redirects + 1)]
    for (server, path), (next_server, next_path) in zip(hops, hops[1:]):
        server.routes[path] = (302, {"Location": next_server.url(next_path)}, b"")
    return hops


@pytest.mark.parametrize("redirects", [1, 2, MAX_REDIRECTS])
def test_redirect_chain_within_the_limit_is_followed(redirects, servers, open_client):
    hops = _chain(servers, redirects)
    with open_client(allow=["127.0.0.2", "127.0.0.3"], timeout_s=2) as client:
        response = client.get(hops[0][0].url(hops[0][1]))
    assert response.status_code == 200 and response.text == "ok"
    assert len(response.history) == redirects
    assert str(response.url) == hops[-1][0].url(hops[-1][1])
    for server, path in hops:
        assert path in [p for p, _ in server.requests]


def test_redirect_chain_over_the_limit_is_refused(servers, open_client):
    hops = _chain(servers, MAX_REDIRECTS + 1)  # 4 redirects
    with open_client(allow=["127.0.0.2", "127.0.0.3"], timeout_s=2) as client:
        with pytest.raises(httpx.TooManyRedirects):
            client.get(hops[0][0].url(hops[0][1]))
    last_server, last_path = hops[-1]
    assert last_path not in [p for p, _ in last_server.requests]
    made = [p for s in {id(s): s for s, _ in hops}.values() for p, _ in s.requests]
    assert len(made) == MAX_REDIRECTS + 1


def test_redirect_to_another_scheme_is_refused(servers, connections, open_client):
    origin = servers("127.0.0.2", routes={"/go": (302, {"Location": "file:///etc/passwd"}, b"")})
    with open_client(allow=["127.0.0.2"], timeout_s=2) as client:
        with pytest.raises((BlockedURLError, httpx.UnsupportedProtocol)):
            client.get(origin.url("/go"))
    assert connections == [("127.0.0.2", origin.port)]


def test_redirect_is_not_followed_when_disabled(servers, trap, connections, open_client):
    # Webhook delivery: a 3xx is the answer, its Location (here a loopback trap) is never visited.
    origin = servers("127.0.0.2", routes={"/hook": (307, {"Location": f"http://127.0.0.1:{trap.port}/"}, b"")})
    before = trap.connections
    with open_client(allow=["127.0.0.2", "127.0.0.1"], timeout_s=2, follow_redirects=False) as client:
        response = client.get(origin.url("/hook"))
    assert response.status_code == 307 and response.history == []
    assert trap.connections == before and connections == [("127.0.0.2", origin.port)]


# -- 3. DNS rebinding ---------------------------------------------------------------------------


@pytest.fixture
def rebinding_pair(servers):
    """A trap on 127.0.0.1:P and the allowlisted server on 127.0.0.2:P (same port)."""
    for _ in range(20):
        trap_server = servers("127.0.0.1")
        try:
            good = servers("127.0.0.2", trap_server.port)
        except OSError:
            continue
        return good, trap_server
    pytest.skip("could not get the same port on 127.0.0.1 and 127.0.0.2")


def test_rebinding_connects_to_the_checked_address(rebinding_pair, dns, connections, open_client):
    good, trap_server = rebinding_pair
    port = good.port
    dns.set("rebind.test", ["127.0.0.2"], ["127.0.0.1"])
    with open_client(allow=["127.0.0.2"], timeout_s=2) as client:
        response = client.get(f"http://rebind.test:{port}/first")
        assert response.status_code == 200
        assert dns.count("rebind.test") == 1  # resolved once for this hop...
        assert connections == [("127.0.0.2", port)]  # ...and connected to that very address
        assert good.requests == [("/first", good.requests[0][1])]
        assert good.requests[0][1]["Host"] == f"rebind.test:{port}"
        assert str(response.url) == f"http://rebind.test:{port}/first"
        # The next request resolves again, gets 127.0.0.1 and is refused.
        with pytest.raises(BlockedURLError):
            client.get(f"http://rebind.test:{port}/second")
    assert dns.count("rebind.test") == 2
    assert trap_server.connections == 0 and len(good.requests) == 1


def test_rebinding_between_redirect_hops_is_caught(rebinding_pair, dns, connections, open_client):
    good, trap_server = rebinding_pair
    port = good.port
    good.routes["/first"] = (302, {"Location": "/second"}, b"")  # relative: same name, new hop
    dns.set("rebind.test", ["127.0.0.2"], ["127.0.0.1"])
    with open_client(allow=["127.0.0.2"], timeout_s=2) as client:
        with pytest.raises(BlockedURLError):
            client.get(f"http://rebind.test:{port}/first")
    assert dns.count("rebind.test") == 2  # once per hop, by name
    assert [p for p, _ in good.requests] == ["/first"]
    assert trap_server.connections == 0
    assert connections == [("127.0.0.2", port)]


def test_concurrent_async_requests_each_connect_to_their_own_checked_address(rebinding_pair, dns, monkeypatch,
                                                                             connections):
    # Many requests share one event loop (thread); the pin is per task, so none connects to an
    # address checked for another. Both servers listen on the same port: a crossed pin would
    # reach the other one.
    good, other = rebinding_pair
    port = good.port
    names = {f"a{i}.test": "127.0.0.2" for i in range(12)} | {f"b{i}.test": "127.0.0.1" for i in range(12)}
    for name, address in names.items():
        dns.set(name, [address])

    def slow_getaddrinfo(*args, **kwargs):  # lookups finish in random order, interleaving the requests
        time.sleep(random.uniform(0, 0.02))
        return dns.getaddrinfo(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)

    async def main() -> list[httpx.Response]:
        async with async_guarded_client(allow=["127.0.0.1", "127.0.0.2"], timeout_s=5) as client:
            return await asyncio.gather(*(client.get(f"http://{name}:{port}/{name}") for name in names))

    assert all(r.status_code == 200 for r in asyncio.run(main()))
    for server, address in ((good, "127.0.0.2"), (other, "127.0.0.1")):
        expected = {f"/{n}" for n, a in names.items() if a == address}
        assert {p for p, _ in server.requests} == expected
        assert all(h["Host"] == f"{p[1:]}:{port}" for p, h in server.requests)
    assert sorted(connections) == sorted((a, port) for a in names.values())


@pytest.mark.parametrize("answer", [
    ["127.0.0.2", "127.0.0.1"],
    ["127.0.0.1", "127.0.0.2"],
    ["127.0.0.2", "10.0.0.1"],
    ["127.0.0.2", "::1"],
    ["127.0.0.2", "::ffff:169.254.169.254"],
])
def test_a_name_with_any_blocked_address_is_refused(answer, servers, dns, connections, open_client):
    good = servers("127.0.0.2")
    dns.set("mixed.test", answer)
    with open_client(allow=["127.0.0.2"], timeout_s=2) as client:
        with pytest.raises(BlockedURLError):
            client.get(f"http://mixed.test:{good.port}/")
    assert good.connections == 0 and connections == []


@pytest.mark.parametrize("answer", [
    ["93.184.215.14", "10.0.0.1"],
    ["10.0.0.1", "93.184.215.14"],
    ["2606:4700:4700::1111", "fd00::1"],
    ["8.8.8.8", "::ffff:127.0.0.1"],
    ["1.1.1.1", "169.254.169.254"],
])
def test_a_public_name_with_any_private_address_is_refused(answer, dns, connections, open_client):
    dns.set("mixed.test", answer)
    with pytest.raises(BlockedURLError):
        check_and_resolve(URLPolicy(), "https://mixed.test/x.png")
    with open_client(timeout_s=2) as client:
        with pytest.raises(BlockedURLError):
            client.get("https://mixed.test/x.png")
    assert connections == []


def test_public_name_resolves_to_its_first_address(dns):
    dns.set("cdn.test", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
    assert check_and_resolve(URLPolicy(), "https://cdn.test/a.png") == "93.184.215.14"


def test_unresolvable_name_is_refused(dns, connections, open_client):
    with open_client(timeout_s=2) as client:
        with pytest.raises(UnresolvableHostError):  # a BlockedURLError; webhook delivery retries it
            client.get("http://nowhere.test/")
    assert connections == []
    assert issubclass(UnresolvableHostError, BlockedURLError)


# -- 4. allowlist -------------------------------------------------------------------------------


def test_cidr_entry_admits_its_addresses_and_nothing_else(servers, trap, dns, connections, open_client):
    inside = [servers("127.0.0.2"), servers("127.0.0.3")]
    outside = servers("127.0.0.4")
    dns.set("inside.test", ["127.0.0.3"])
    with open_client(allow=["127.0.0.2/31"], timeout_s=2) as client:
        for server in inside:
            assert client.get(server.url("/in")).text == "ok"
        assert client.get(f"http://inside.test:{inside[1].port}/by-name").status_code == 200
        assert inside[1].requests[-1][1]["Host"] == f"inside.test:{inside[1].port}"
        for url in (outside.url("/out"), f"http://127.0.0.1:{trap.port}/", "http://10.0.0.1/",
                    f"http://localhost:{trap.port}/", f"http://[::ffff:127.0.0.4]:{outside.port}/"):
            with pytest.raises(BlockedURLError):
                client.get(url)
    assert outside.connections == 0 and trap.requests == []
    assert [p for p, _ in inside[0].requests] == ["/in"]


def test_hostname_entry_admits_that_name_and_nothing_else(servers, dns, connections, open_client):
    server = servers("127.0.0.2")
    for name in ("internal.test", "other.test", "sub.internal.test", "internal.test.evil.test", "xinternal.test"):
        dns.set(name, ["127.0.0.2"])
    with open_client(allow=["Internal.Test."], timeout_s=2) as client:
        response = client.get(f"http://internal.test:{server.port}/ok")
        assert response.status_code == 200
        assert server.requests[-1][1]["Host"] == f"internal.test:{server.port}"
        assert client.get(f"http://INTERNAL.test.:{server.port}/ok2").status_code == 200
        for url in (f"http://other.test:{server.port}/", f"http://sub.internal.test:{server.port}/",
                    f"http://internal.test.evil.test:{server.port}/", f"http://xinternal.test:{server.port}/",
                    f"http://127.0.0.2:{server.port}/"):
            with pytest.raises(BlockedURLError):
                client.get(url)
    assert [p for p, _ in server.requests] == ["/ok", "/ok2"]


def test_allowlisted_name_keeps_its_name_across_a_relative_redirect(servers, dns, open_client):
    server = servers("127.0.0.2", routes={"/a": (302, {"Location": "/b"}, b"")})
    dns.set("internal.test", ["127.0.0.2"])
    with open_client(allow=["internal.test"], timeout_s=2) as client:
        response = client.get(f"http://internal.test:{server.port}/a")
    assert response.status_code == 200
    assert str(response.url) == f"http://internal.test:{server.port}/b"
    assert [(p, h["Host"]) for p, h in server.requests] == [
        ("/a", f"internal.test:{server.port}"), ("/b", f"internal.test:{server.port}")]


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_allowlisted_ipv6_literal(servers, connections, open_client):
    server = servers("::1")
    with open_client(allow=["::1/128"], timeout_s=2) as client:
        response = client.get(f"http://[::1]:{server.port}/v6")
        assert response.status_code == 200 and response.text == "ok"
        assert str(response.url) == f"http://[::1]:{server.port}/v6"
        with pytest.raises(BlockedURLError):
            client.get(f"http://127.0.0.1:{server.port}/v4")
    assert [(p, h["Host"]) for p, h in server.requests] == [("/v6", f"[::1]:{server.port}")]
    assert [a[:2] for a in connections] == [("::1", server.port)]


def test_host_header_on_default_and_non_default_ports(monkeypatch, kind, client_over):
    # What the guarded transport hands to httpx's own transport (replaced below the guard by a
    # recorder, so no network is needed): URL and Host header unchanged (no rewriting to the IP).
    seen: list[httpx.Request] = []

    def capture(self, request):
        seen.append(request)
        return httpx.Response(200, request=request)

    async def capture_async(self, request):
        return capture(self, request)

    if kind == "sync":
        monkeypatch.setattr(httpx.HTTPTransport, "handle_request", capture)
    else:
        monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", capture_async)
    urls = ["http://93.184.215.14/", "http://93.184.215.14:443/", "https://93.184.215.14:80/",
            "https://93.184.215.14/", "http://[2606:4700::1]:8080/", "https://[2606:4700::1]/"]
    with client_over(URLPolicy(["93.184.215.14/32", "2606:4700::/32"])) as client:
        for url in urls:
            client.get(url)
    assert [r.headers["Host"] for r in seen] == [
        "93.184.215.14", "93.184.215.14:443", "93.184.215.14:80", "93.184.215.14",
        "[2606:4700::1]:8080", "[2606:4700::1]"]
    assert [str(r.url) for r in seen] == urls


def test_connections_go_only_to_the_checked_address(servers, client_over):
    # A transport configured with a proxy would connect to the proxy, not to the checked address:
    # the pinned connect refuses it (nothing reaches the "proxy").
    proxy = servers("127.0.0.3")
    with client_over(URLPolicy(["127.0.0.2", "127.0.0.3"]), proxy=proxy.url()) as client:
        with pytest.raises(httpx.ConnectError, match="not checked"):
            client.get("http://127.0.0.2:9/")
    assert proxy.connections == 0


def _tls_material(tmp_path, name: str):
    """A throwaway CA and a leaf certificate for ``name``: (server SSLContext, client SSLContext)."""
    import datetime
    import ssl

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "urlguard test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server_ctx, client_ctx


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"


class TLSServer(Server):
    """HTTPS with keep-alive (HTTP/1.1), so that the client may pool and reuse connections."""

    def __init__(self, host: str, context, routes: dict | None = None) -> None:
        self.context = context
        self.sni: list[str | None] = []
        context.sni_callback = lambda sock, server_name, ctx: self.sni.append(server_name)
        super().__init__(host, 0, routes)
        self.RequestHandlerClass = _KeepAliveHandler

    def get_request(self):
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request, client_address) -> None:
        pass  # failed handshakes are expected in the negative test

    def url(self, path: str = "/") -> str:
        return super().url(path).replace("http://", "https://", 1)


def test_https_is_verified_against_the_name_while_pinned_to_the_checked_address(tmp_path, servers, dns, connections,
                                                                                client_over):
    server_ctx, client_ctx = _tls_material(tmp_path, "secure.test")
    server = TLSServer("127.0.0.2", server_ctx, routes={"/a": (302, {"Location": "/b"}, b"")})
    try:
        dns.set("secure.test", ["127.0.0.2"])
        dns.set("impostor.test", ["127.0.0.2"])
        redirects = {"follow_redirects": True, "max_redirects": MAX_REDIRECTS}
        with client_over(URLPolicy(["127.0.0.2"]), client_kwargs=redirects, verify=client_ctx) as client:
            response = client.get(f"https://secure.test:{server.port}/a")
            assert response.status_code == 200 and response.text == "ok"
            assert str(response.url) == f"https://secure.test:{server.port}/b"
            # The certificate is for secure.test: another name on the same address fails verification,
            # even though a verified keep-alive connection to that very address:port is in the pool.
            with pytest.raises(httpx.ConnectError, match="(?i)certificate"):
                client.get(f"https://impostor.test:{server.port}/")
        assert dns.count("secure.test") == 2  # both hops resolved by name
        assert [(p, h["Host"]) for p, h in server.requests] == [
            ("/a", f"secure.test:{server.port}"), ("/b", f"secure.test:{server.port}")]
        assert "secure.test" in server.sni and "impostor.test" in server.sni
        assert set(connections) == {("127.0.0.2", server.port)}
        assert len(connections) == 2  # one pooled connection for secure.test (both hops), one for impostor.test
    finally:
        server.stop()


# -- 5. timeouts --------------------------------------------------------------------------------


def test_read_timeout_on_a_server_that_never_answers(connections, open_client):
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.2", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    port = silent.getsockname()[1]
    try:
        with open_client(allow=["127.0.0.2"], timeout_s=0.3) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                client.get(f"http://127.0.0.2:{port}/slow")
            elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert 0.25 <= elapsed < 2.0
    assert connections == [("127.0.0.2", port)]


@pytest.mark.parametrize("factory", [guarded_client, async_guarded_client])
def test_client_settings(factory):
    for client in (factory(timeout_s=7), factory(timeout_s=7, follow_redirects=False, headers={"User-Agent": "t/1"})):
        assert client.timeout.read == 7 and client.timeout.write == 7 and client.timeout.pool == 7
        assert client.timeout.connect == min(CONNECT_TIMEOUT_S, 7)
        assert client.max_redirects == MAX_REDIRECTS == 3
        assert client.trust_env is False  # no proxy from the environment
        transport = client._transport
        assert isinstance(transport, GuardedTransport if factory is guarded_client else AsyncGuardedTransport)
    assert factory(timeout_s=7).follow_redirects is True
    assert client.follow_redirects is False and client.headers["User-Agent"] == "t/1"
    assert factory(timeout_s=0.5).timeout.connect <= 0.5
