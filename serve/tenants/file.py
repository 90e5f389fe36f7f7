"""The tenants file: its format, reading it, and writing it safely.

A tenants file (YAML or JSON) maps tenant names to SHA-256 hashes of their keys; keys
themselves are shown once when created and never stored (see :mod:`serve.tenants.keys`).

    defaults:                    # policy of every tenant, unless its own policy says otherwise
      rate_limit_per_minute: 150
      burst: 20
      max_queued_jobs: 100
    tenants:
      acme:
        key_hashes: ["sha256:9f86d0…"]
        webhook_secret: whsec_…  # HMAC key of webhook signatures (a secret: the file is mode 0600)
        policy:                  # only what differs from the defaults
          weight: 2.0            # fair-share weight of the GPU stages
          max_running_jobs: 8

The file keeps only each tenant's own policy keys, so a change to ``defaults:`` reaches every
tenant that does not override it (the merge is :func:`serve.tenants.tenant.build_tenant`). The
pre-policy form ``weight:`` directly under a tenant is still read, as ``policy.weight``, by
:func:`serve.tenants.tenant.fold_legacy_weight`; it is never written. See ``docs/tenants.md``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import TenantsFileError
from .tenant import Tenant, build_tenant, fold_legacy_weight, validate_overrides


@dataclass
class TenantsFile:
    """The whole file: the ``defaults:`` overrides and every tenant (with effective policies)."""

    defaults: dict[str, Any]
    tenants: dict[str, Tenant]


def parse_tenants(raw: Any) -> TenantsFile:
    """The parsed file content (a mapping) -> :class:`TenantsFile`. Raises :class:`TenantsFileError`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise TenantsFileError("the tenants file must be a mapping with 'defaults' and 'tenants'")
    unknown = set(raw) - {"defaults", "tenants"}
    if unknown:
        raise TenantsFileError(f"unknown top-level keys {sorted(unknown)}: expected 'defaults' and 'tenants'")
    defaults = validate_overrides(raw.get("defaults"), "defaults")
    body = raw.get("tenants") or {}
    if not isinstance(body, dict):
        raise TenantsFileError("tenants: must be a mapping of tenant name to its settings")
    tenants: dict[str, Tenant] = {}
    for name, entry in body.items():
        name = str(name)
        where = f"tenants.{name}"
        try:
            entry = fold_legacy_weight(dict(entry or {}))
        except ValueError as error:
            raise TenantsFileError(f"{where}: {error}") from None
        unknown = set(entry) - {"key_hashes", "webhook_secret", "policy"}
        if unknown:
            raise TenantsFileError(f"{where}: unknown keys {sorted(unknown)} "
                                   "(expected key_hashes, webhook_secret, policy)")
        overrides = validate_overrides(entry.get("policy"), f"{where}.policy")
        hashes = entry.get("key_hashes") or []
        if not isinstance(hashes, list):
            raise TenantsFileError(f"{where}.key_hashes: must be a list")
        secret = entry.get("webhook_secret")
        if secret is not None and not isinstance(secret, str):
            raise TenantsFileError(f"{where}.webhook_secret: must be a string")
        tenants[name] = build_tenant(name, key_hashes=hashes, webhook_secret=secret, overrides=overrides,
                                     defaults=defaults)
    return TenantsFile(defaults=defaults, tenants=tenants)


def load_tenants_file(path: str | Path) -> TenantsFile:
    path = Path(path)
    if not path.exists():
        return TenantsFile(defaults={}, tenants={})
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise TenantsFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise TenantsFileError(f"{path}: not valid YAML or JSON{where}") from None
    try:
        return parse_tenants(raw)
    except TenantsFileError as error:
        raise TenantsFileError(f"{path}: {error}") from None


def save_tenants_file(path: str | Path, document: TenantsFile) -> None:
    """Atomic replace (mode 0600: the file holds webhook secrets), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tenants: dict[str, Any] = {}
    for name, tenant in sorted(document.tenants.items()):
        entry: dict[str, Any] = {"key_hashes": list(tenant.key_hashes)}
        if tenant.webhook_secret is not None:
            entry["webhook_secret"] = tenant.webhook_secret
        if tenant.policy_overrides:
            entry["policy"] = tenant.policy_overrides
        tenants[name] = entry
    body: dict[str, Any] = {}
    if document.defaults:
        body["defaults"] = dict(document.defaults)
    body["tenants"] = tenants
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tenants-")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(body, handle, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_tenants(path: str | Path) -> dict[str, Tenant]:
    """Every tenant of the file, with its effective policy."""
    return load_tenants_file(path).tenants


def write_tenants(path: str | Path, tenants: dict[str, Tenant]) -> None:
    """Replace the file's tenants, keeping its ``defaults:`` section."""
    path = Path(path)
    defaults = load_tenants_file(path).defaults if path.exists() else {}
    save_tenants_file(path, TenantsFile(defaults=defaults, tenants=dict(tenants)))


@contextlib.contextmanager
def edit_tenants_file(path: str | Path) -> Iterator[TenantsFile]:
    """Read-modify-write under an exclusive lock (a sibling ``.lock`` file), so two admin commands
    run at once cannot lose each other's change. The file is written only if the block succeeds."""
    import fcntl

    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError as error:
        raise TenantsFileError(f"{path}: cannot write next to it ({error.strerror or error})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            document = load_tenants_file(path)
            yield document
            try:
                save_tenants_file(path, document)
            except OSError as error:
                raise TenantsFileError(f"{path}: cannot write it ({error.strerror or error})") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
