"""Tenants and API keys.

A tenants file (YAML or JSON) maps tenant names to SHA-256 hashes of their keys; keys
themselves are shown once when created and never stored. API keys are 32 random bytes, so a
plain SHA-256 is a safe one-way function for them (no password-style stretching needed).

    tenants:
      acme:
        key_hashes: ["sha256:9f86d0…"]
        weight: 2.0          # fair-share weight of the GPU stages

The registry re-reads the file when its modification time changes, so adding, revoking or
rotating a key takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import SVDServeError

KEY_PREFIX = "svd_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AuthenticationError(SVDServeError):
    code = "unauthorized"


class Tenant(BaseModel):
    """One tenant: its key hashes and its share of the GPUs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tenant name; also the storage prefix of its files.")
    key_hashes: list[str] = Field(default_factory=list, description="sha256:<hex> of each valid API key.")
    weight: float = Field(default=1.0, gt=0, description="Fair-share weight when tenants compete for the GPUs.")


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def read_tenants(path: str | Path) -> dict[str, Tenant]:
    path = Path(path)
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    tenants = {}
    for name, body in (raw.get("tenants") or {}).items():
        tenants[name] = Tenant(name=name, **(body or {}))
    return tenants


def write_tenants(path: str | Path, tenants: dict[str, Tenant]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"tenants": {name: t.model_dump(exclude={"name"}) for name, t in sorted(tenants.items())}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tenants-")
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(body, handle, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_tenant(path: str | Path, name: str, *, weight: float = 1.0) -> str:
    """Create a tenant with one key; returns the key (shown once, never stored)."""
    if not TENANT_NAME.match(name):
        raise ValueError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    tenants = read_tenants(path)
    if name in tenants:
        raise ValueError(f"tenant {name!r} already exists (use rotate to issue a new key)")
    key = new_api_key()
    tenants[name] = Tenant(name=name, key_hashes=[hash_key(key)], weight=weight)
    write_tenants(path, tenants)
    return key


class TenantRegistry:
    """Authenticates bearer keys against the tenants file, reloading it when it changes."""

    def __init__(self, path: str | Path | None, *, check_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._by_hash: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        self._mtime: float | None = None
        self._checked_at = 0.0
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if not force and mtime == self._mtime:
            return
        tenants = read_tenants(self.path) if mtime is not None else {}
        self._tenants = tenants
        self._by_hash = {h: t for t in tenants.values() for h in t.key_hashes}
        self._mtime = mtime

    def tenants(self) -> dict[str, Tenant]:
        with self._lock:
            self._reload()
            return dict(self._tenants)

    def get(self, name: str) -> Tenant | None:
        return self.tenants().get(name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """``Authorization: Bearer <key>`` -> the tenant, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("missing Authorization header: send 'Authorization: Bearer <API key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <API key>'")
        with self._lock:
            self._reload()
            tenant = self._by_hash.get(hash_key(key.strip()))
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant
