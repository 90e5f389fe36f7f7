"""The changes an administrator makes to the tenants file: create or remove a tenant, issue,
rotate or revoke its credentials, and change its policy or the defaults.

Every function is one locked read-modify-write of the file (:func:`edit_tenants_file`), so a
running registry picks the change up without a restart. New credentials are returned once, as
:class:`IssuedCredentials`; only a key's hash is stored. These are what ``svd-serve tenants``
(:mod:`serve.tenants.admin`), ``svd-serve up`` and the tests call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TenantsFileError
from .file import TenantsFile, edit_tenants_file
from .keys import hash_key, key_id, new_api_key, new_webhook_secret
from .policy import TenantPolicy
from .tenant import Tenant, build_tenant, check_tenant_name, validate_overrides


@dataclass(frozen=True)
class IssuedCredentials:
    """Credentials shown once: the API key and/or the webhook secret (only the key's hash is stored)."""

    tenant: str
    api_key: str | None = None
    key_id: str | None = None
    webhook_secret: str | None = None

    def __repr__(self) -> str:
        return f"IssuedCredentials(tenant={self.tenant!r}, key_id={self.key_id!r})"


def _require(document: TenantsFile, name: str) -> Tenant:
    tenant = document.tenants.get(name)
    if tenant is None:
        raise TenantsFileError(f"unknown tenant {name!r}")
    return tenant


def _replace(document: TenantsFile, tenant: Tenant, **changes: Any) -> Tenant:
    """Rebuild the tenant with ``changes`` against the document's current defaults."""
    values = {
        "key_hashes": list(tenant.key_hashes),
        "webhook_secret": tenant.webhook_secret,
        "overrides": tenant.policy_overrides,
        **changes,
    }
    updated = build_tenant(tenant.name, defaults=document.defaults, **values)
    document.tenants[tenant.name] = updated
    return updated


def _check_resets(reset: list[str] | tuple[str, ...]) -> None:
    unknown = [field for field in reset if field not in TenantPolicy.model_fields]
    if unknown:
        raise TenantsFileError(f"unknown policy setting {unknown[0]!r}")


def create_tenant(path: str | Path, name: str, *, policy: dict[str, Any] | None = None) -> IssuedCredentials:
    """Create a tenant with one API key and a webhook secret; both are returned (shown once)."""
    check_tenant_name(name)  # before the lock: a bad name must not create the file's folder
    with edit_tenants_file(path) as document:
        if name in document.tenants:
            raise TenantsFileError(f"tenant {name!r} already exists (use rotate to issue a new key)")
        key, secret = new_api_key(), new_webhook_secret()
        document.tenants[name] = build_tenant(
            name, key_hashes=[hash_key(key)], webhook_secret=secret,
            overrides=validate_overrides(policy or {}, "policy"), defaults=document.defaults,
        )
    return IssuedCredentials(tenant=name, api_key=key, key_id=key_id(hash_key(key)), webhook_secret=secret)


def add_tenant(path: str | Path, name: str, *, weight: float | None = None, **policy: Any) -> str:
    """Create a tenant with one key; returns the key (shown once, never stored)."""
    if weight is not None:
        policy["weight"] = weight
    return create_tenant(path, name, policy=policy).api_key  # type: ignore[return-value]


def rotate_key(path: str | Path, name: str, *, keep_old: bool = False) -> IssuedCredentials:
    """A new API key; the old ones are removed unless ``keep_old`` (a grace period: revoke them
    later with :func:`revoke_key`)."""
    with edit_tenants_file(path) as document:
        tenant = _require(document, name)
        key = new_api_key()
        hashes = (list(tenant.key_hashes) if keep_old else []) + [hash_key(key)]
        _replace(document, tenant, key_hashes=hashes)
    return IssuedCredentials(tenant=name, api_key=key, key_id=key_id(hash_key(key)))


def rotate_webhook_secret(path: str | Path, name: str) -> IssuedCredentials:
    with edit_tenants_file(path) as document:
        tenant = _require(document, name)
        secret = new_webhook_secret()
        _replace(document, tenant, webhook_secret=secret)
    return IssuedCredentials(tenant=name, webhook_secret=secret)


def remove_tenant(path: str | Path, name: str) -> None:
    """Remove the tenant and every key of it (its jobs stay until their retention ends)."""
    with edit_tenants_file(path) as document:
        _require(document, name)
        del document.tenants[name]


def revoke_key(path: str | Path, name: str, key_hash_prefix: str) -> str:
    """Remove the one key whose hash starts with ``key_hash_prefix`` (hex, ``sha256:`` optional).
    Returns the revoked key's id. Raises if none or several keys match."""
    prefix = key_hash_prefix.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{6,64}", prefix):
        raise TenantsFileError("--key-hash: give at least 6 hex digits of the key's SHA-256 hash")
    with edit_tenants_file(path) as document:
        tenant = _require(document, name)
        matches = [h for h in tenant.key_hashes if h.removeprefix("sha256:").startswith(prefix)]
        if not matches:
            raise TenantsFileError(f"tenant {name!r} has no key whose hash starts with {prefix}")
        if len(matches) > 1:
            raise TenantsFileError(f"{len(matches)} keys of tenant {name!r} match {prefix}: give more digits")
        _replace(document, tenant, key_hashes=[h for h in tenant.key_hashes if h != matches[0]])
    return key_id(matches[0])


def update_policy(
    path: str | Path, name: str, changes: dict[str, Any], *, reset: list[str] | tuple[str, ...] = ()
) -> Tenant:
    """Set policy keys of a tenant (``reset``: drop its own value, falling back to the defaults)."""
    _check_resets(reset)
    with edit_tenants_file(path) as document:
        tenant = _require(document, name)
        overrides = {k: v for k, v in tenant.policy_overrides.items() if k not in reset}
        overrides.update(changes)
        return _replace(document, tenant, overrides=validate_overrides(overrides, "policy"))


def update_defaults(path: str | Path, changes: dict[str, Any], *, reset: list[str] | tuple[str, ...] = ()) -> dict:
    """Change the ``defaults:`` section; every tenant is re-validated against the new defaults."""
    _check_resets(reset)
    with edit_tenants_file(path) as document:
        defaults = {k: v for k, v in document.defaults.items() if k not in reset}
        defaults.update(changes)
        document.defaults = validate_overrides(defaults, "defaults")
        for tenant in list(document.tenants.values()):
            _replace(document, tenant)
        return dict(document.defaults)
