"""The tenants the running API authenticates against: :class:`TenantRegistry`.

It holds the file's tenants in memory, re-reads the file when it changes (so adding, revoking or
rotating a key and changing a policy take effect without a restart), and maps a bearer key to
its tenant by the key's hash. Ingress, the API, the runner and the lifecycle code share it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from .errors import AuthenticationError, TenantsFileError
from .file import read_tenants
from .keys import hash_key
from .tenant import Tenant

logger = logging.getLogger("ray.serve.svd_serve")


#: Authorization schemes that carry an API key: ours (and OpenAI's, Stability's), and fal's.
AUTH_SCHEMES = frozenset({"bearer", "key"})


class TenantRegistry:
    """Authenticates bearer keys against the tenants file, reloading it when it changes.

    A change is noticed within ``check_interval_s`` (the file's mtime, inode and size are
    compared: every write replaces the file, so two writes within one timestamp tick still
    differ). If a changed file is invalid, the last good tenants stay in force and the problem is
    logged once (without any value from the file).
    """

    def __init__(self, path: str | Path | None, *, check_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._by_hash: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._reload(force=True, strict=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()  # type: ignore[union-attr]
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_ino, stat.st_size)

    def _reload(self, force: bool = False, strict: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        if self.path is None:
            return
        signature = self._stat()
        if not force and signature == self._signature:
            return
        try:
            tenants = read_tenants(self.path) if signature is not None else {}
        except TenantsFileError as error:
            if strict:
                raise
            self._signature = signature  # report a bad version once, not on every check
            logger.error("the tenants file changed but is invalid; keeping the previous tenants: %s", error)
            return
        self._tenants = tenants
        self._by_hash = {h: t for t in tenants.values() for h in t.key_hashes}
        self._signature = signature

    def tenants(self) -> dict[str, Tenant]:
        with self._lock:
            self._reload()
            return dict(self._tenants)

    def get(self, name: str) -> Tenant | None:
        return self.tenants().get(name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """``Authorization: Bearer <key>`` (or ``Key <key>``, as fal's clients send it) -> the
        tenant, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("missing Authorization header: send 'Authorization: Bearer <API key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() not in AUTH_SCHEMES or not key.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <API key>'")
        with self._lock:
            self._reload()
            tenant = self._by_hash.get(hash_key(key.strip()))
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant
