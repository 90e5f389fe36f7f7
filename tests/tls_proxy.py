"""A small TLS terminator for tests: HTTPS on a loopback port, forwarded as plain HTTP upstream.

Clients that only build ``https://`` URLs (fal's) reach a plain-HTTP service through it, the way
a load balancer or ingress terminates TLS in production. It makes a self-signed certificate for
``127.0.0.1`` and ``localhost`` with the ``cryptography`` package (point a client at
``proxy.ca_file``, e.g. through ``SSL_CERT_FILE``), keeps the client's ``Host`` header and sets
``X-Forwarded-Proto: https`` and ``X-Forwarded-For``, so the service builds ``https://`` URLs
that lead back through the proxy.

One request per connection: the proxy asks both sides for ``Connection: close`` and closes the
client connection when the upstream response ends, so it never has to parse bodies to find where
a request ends (streamed responses, server-sent events included, are relayed as they arrive).

    with TLSProxy("http://127.0.0.1:8000", workdir) as proxy:
        httpx.get(f"{proxy.url}/healthz", verify=str(proxy.ca_file))
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

#: Hop-by-hop headers the proxy replaces (and the forwarding headers it sets itself).
_DROPPED = {b"connection", b"keep-alive", b"proxy-connection", b"x-forwarded-proto", b"x-forwarded-for"}
_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024


def make_self_signed_cert(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``hosts``: (cert.pem, key.pem) in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svd-serve tests")])
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _rewrite_head(head: bytes, extra: list[bytes]) -> bytes:
    """The head with hop-by-hop and forwarding headers replaced by ``extra``."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in _DROPPED]
    return b"\r\n".join([lines[0], *kept, *extra]) + b"\r\n\r\n"


class TLSProxy:
    """HTTPS on ``127.0.0.1:<port>`` -> plain HTTP to ``upstream``; runs its own event loop thread."""

    def __init__(self, upstream: str, workdir: Path) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.ca_file, self._key_file = make_self_signed_cert(Path(workdir))
        self.port = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: what a client puts in its URLs (and ``Host`` header)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def start(self) -> "TLSProxy":
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the TLS proxy did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "TLSProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the event loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.ca_file, self._key_file)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context, limit=_MAX_HEAD))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as error:  # noqa: BLE001 - reported to start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        pump = None
        try:
            try:
                head = await client_reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
                return
            self.requests += 1
            peer = (client_writer.get_extra_info("peername") or ("127.0.0.1",))[0]
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=_MAX_HEAD)
            upstream_writer.write(_rewrite_head(head, [b"X-Forwarded-Proto: https",
                                                       f"X-Forwarded-For: {peer}".encode("latin-1"),
                                                       b"Connection: close"]))
            await upstream_writer.drain()
            # The request body (if any) follows the head; relay whatever the client sends next.
            pump = asyncio.ensure_future(self._relay(client_reader, upstream_writer))
            try:
                response_head = await upstream_reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                client_writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await client_writer.drain()
                return
            client_writer.write(_rewrite_head(response_head, [b"Connection: close"]))
            await client_writer.drain()
            await self._relay(upstream_reader, client_writer)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, asyncio.CancelledError):
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()
