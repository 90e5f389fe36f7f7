"""Tenants, their API keys and their admission policy.

A tenants file (YAML or JSON) maps tenant names to SHA-256 hashes of their keys; keys
themselves are shown once when created and never stored. API keys are 32 random bytes, so a
plain SHA-256 is a safe one-way function for them (no password-style stretching needed).

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

A tenant's effective :class:`TenantPolicy` is the built-in defaults, overlaid by the file's
``defaults:`` section, overlaid by the tenant's own ``policy:`` (key by key; a list such as
``allowed_models`` is replaced, not merged). The file keeps only the tenant's own keys, so a
change to ``defaults:`` reaches every tenant that does not override it. The pre-policy form
``weight:`` directly under a tenant is still read (as ``policy.weight``).

The registry re-reads the file when it changes, so adding, revoking or rotating a key and
changing a policy take effect without a restart. See ``docs/tenants.md``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipelines.errors import SVDServeError

logger = logging.getLogger("ray.serve.svd_serve")

KEY_PREFIX = "svd_"
WEBHOOK_SECRET_PREFIX = "whsec_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Characters of the key hash shown as a key's id (``sha256:`` + 12 hex digits).
KEY_ID_CHARS = 12


class AuthenticationError(SVDServeError):
    code = "unauthorized"


class TenantsFileError(SVDServeError, ValueError):
    """The tenants file (or a change to it) is invalid; the message names the place, never a value."""

    code = "invalid_tenants_file"


class TenantPolicy(BaseModel):
    """What one tenant may do: its request rate, its queue and concurrency, its share of the GPUs,
    the models and the size of the jobs it may ask for, and how long its jobs are kept.

    ``None`` means "no limit of this kind" (the service's own global limits still apply).
    """

    model_config = ConfigDict(extra="forbid")

    rate_limit_per_minute: float | None = Field(
        default=150.0,
        gt=0,
        description="Sustained submissions (POST /v1/videos) per minute, enforced by a token bucket shared by "
        "every ingress replica. Over it: 429 rate_limited with Retry-After. None: no rate limit.",
    )
    burst: int = Field(
        default=20,
        ge=1,
        description="Token-bucket size: submissions that may arrive back to back after a quiet period before "
        "the per-minute rate applies. Ignored without a rate limit.",
    )
    max_running_jobs: int | None = Field(
        default=4,
        ge=1,
        description="Jobs of this tenant generating at once, across the cluster. More are not rejected: they "
        "wait in the queue until one of the tenant's running jobs ends. None: bounded only by fair sharing.",
    )
    max_queued_jobs: int | None = Field(
        default=100,
        ge=1,
        description="Jobs of this tenant waiting in the queue. A submission past it gets 429 queue_full "
        "(this tenant's quota, not a service outage). None: unbounded.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Fair-share weight: when tenants compete for the GPUs, running slots split in proportion.",
    )
    allowed_models: list[str] = Field(
        default_factory=list,
        description="Model sources this tenant may use (exact or shell-style glob, e.g. 'stabilityai/*'), compared "
        "with the deployed model's source. Empty: any model. Not allowed: 403 model_not_allowed.",
    )
    max_num_frames: int | None = Field(
        default=None, ge=2, description="Most frames per clip (num_frames). Over it: 422 limit_exceeded."
    )
    max_pixels: int | None = Field(
        default=None,
        ge=64 * 64,
        description="Most pixels per frame (width x height). Over it: 422 limit_exceeded.",
    )
    max_long_side: int | None = Field(
        default=None, ge=64, description="Largest width or height in pixels. Over it: 422 limit_exceeded."
    )
    max_inference_steps: int | None = Field(
        default=None, ge=1, description="Most sampling steps (num_inference_steps). Over it: 422 limit_exceeded."
    )
    retention_s: float | None = Field(
        default=None,
        gt=0,
        description="How long this tenant's job records and clips are kept (seconds after they finish); "
        "overrides job_store.retention_s. None: the service's retention.",
    )

    @field_validator("allowed_models")
    @classmethod
    def _clean_models(cls, value: list[str]) -> list[str]:
        cleaned: list[str] = []
        for item in value:
            item = item.strip()
            if not item:
                raise ValueError("allowed_models entries must not be empty")
            if item not in cleaned:
                cleaned.append(item)
        return cleaned

    @model_validator(mode="after")
    def _cross_field(self) -> "TenantPolicy":
        if self.max_pixels is not None and self.max_long_side is not None and self.max_pixels < 64 * self.max_long_side:
            # Otherwise max_long_side could never be reached: even the narrowest clip (64 wide) at that
            # length is refused by max_pixels, which is a contradiction worth catching at write time.
            raise ValueError(
                f"max_pixels ({self.max_pixels}) is below 64 x max_long_side ({64 * self.max_long_side}): "
                "max_long_side could never be reached; lower it or raise max_pixels"
            )
        return self

    # -- derived --------------------------------------------------------------------------

    @property
    def rate_per_s(self) -> float | None:
        return None if self.rate_limit_per_minute is None else self.rate_limit_per_minute / 60.0

    def allows_model(self, source: str) -> bool:
        if not self.allowed_models:
            return True
        return any(
            fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(source.rstrip("/"), pattern.rstrip("/"))
            for pattern in self.allowed_models
        )

    def limit_violations(self, *, num_frames: int, width: int, height: int, num_inference_steps: int) -> list[str]:
        """One sentence per cap the (resolved) request exceeds; empty when it fits."""
        problems = []
        if self.max_num_frames is not None and num_frames > self.max_num_frames:
            problems.append(f"num_frames {num_frames} exceeds this tenant's limit of {self.max_num_frames}")
        if self.max_inference_steps is not None and num_inference_steps > self.max_inference_steps:
            problems.append(
                f"num_inference_steps {num_inference_steps} exceeds this tenant's limit of {self.max_inference_steps}"
            )
        if self.max_long_side is not None and max(width, height) > self.max_long_side:
            problems.append(
                f"{width}x{height}: the long side {max(width, height)} exceeds this tenant's limit of "
                f"{self.max_long_side} pixels"
            )
        if self.max_pixels is not None and width * height > self.max_pixels:
            problems.append(
                f"{width}x{height} = {width * height} pixels per frame exceeds this tenant's limit of {self.max_pixels}"
            )
        return problems


class Tenant(BaseModel):
    """One tenant: its key hashes, its webhook signing secret and its effective policy.

    ``policy`` is the *effective* policy (defaults merged). :attr:`policy_overrides` holds only
    the keys the tenant's own ``policy:`` sets, which is what :func:`write_tenants` writes back.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tenant name; also the storage prefix of its files.")
    key_hashes: list[str] = Field(default_factory=list, description="sha256:<hex> of each valid API key.")
    webhook_secret: str | None = Field(
        default=None,
        repr=False,
        description="HMAC-SHA256 key of this tenant's webhook signatures. A secret: never logged; the CLI prints it "
        "once, when it is created or rotated.",
    )
    policy: TenantPolicy = Field(default_factory=TenantPolicy, description="Effective admission policy.")

    _overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _legacy_weight(cls, data: Any) -> Any:
        """``weight:`` directly under a tenant (the pre-policy format, and ``Tenant(weight=...)``)."""
        if not isinstance(data, dict) or "weight" not in data:
            return data
        data = dict(data)
        weight = data.pop("weight")
        policy = data.get("policy")
        if isinstance(policy, TenantPolicy):
            if "weight" in policy.model_fields_set and policy.weight != weight:
                raise ValueError("weight is given both directly and under policy, with different values")
            values = policy.model_dump(include=policy.model_fields_set)
            data["policy"] = TenantPolicy.model_validate({**values, "weight": weight})
        else:
            policy = dict(policy or {})
            if "weight" in policy and policy["weight"] != weight:
                raise ValueError("weight is given both directly and under policy, with different values")
            policy["weight"] = weight
            data["policy"] = policy
        return data

    @field_validator("key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", item):
                raise ValueError("key_hashes entries must be 'sha256:' followed by 64 lowercase hex digits")
        return value

    def model_post_init(self, context: Any) -> None:
        self._overrides = self.policy.model_dump(include=self.policy.model_fields_set)

    @property
    def weight(self) -> float:
        """The effective fair-share weight (``policy.weight``), read by admission and the runner."""
        return self.policy.weight

    @property
    def policy_overrides(self) -> dict[str, Any]:
        """The policy keys this tenant sets itself (what its ``policy:`` section holds)."""
        return dict(self._overrides)

    def __repr__(self) -> str:  # never the secret; the hashes add nothing to a log line either
        return f"Tenant(name={self.name!r}, keys={len(self.key_hashes)}, policy={self.policy!r})"

    __str__ = __repr__


# -- keys -----------------------------------------------------------------------------------------


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """A short, non-secret handle of a key: its hash's first hex digits (``revoke --key-hash``)."""
    return key_hash.removeprefix("sha256:")[:KEY_ID_CHARS]


# -- the file -------------------------------------------------------------------------------------


@dataclass
class TenantsFile:
    """The whole file: the ``defaults:`` overrides and every tenant (with effective policies)."""

    defaults: dict[str, Any]
    tenants: dict[str, Tenant]


def _describe(error: ValidationError, where: str) -> str:
    """One line naming each bad place, without the offending values (they may be secrets)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in (where, *item.get("loc", ())) if p != "")
        parts.append(f"{loc}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _policy_overrides(raw: Any, where: str) -> dict[str, Any]:
    """Validate a partial policy mapping on its own; returns its keys, normalised."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TenantsFileError(f"{where}: must be a mapping of policy settings")
    try:
        policy = TenantPolicy.model_validate(raw)
    except ValidationError as error:
        raise TenantsFileError(_describe(error, where)) from None
    return policy.model_dump(include=set(raw))


def build_tenant(
    name: str,
    *,
    key_hashes: list[str] | None = None,
    webhook_secret: str | None = None,
    overrides: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Tenant:
    """A tenant whose effective policy is ``defaults`` overlaid by ``overrides``."""
    where = f"tenants.{name}"
    if not TENANT_NAME.match(name):
        raise TenantsFileError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    overrides = dict(overrides or {})
    try:
        policy = TenantPolicy.model_validate({**(defaults or {}), **overrides})
        tenant = Tenant(name=name, key_hashes=list(key_hashes or []), webhook_secret=webhook_secret, policy=policy)
    except ValidationError as error:
        raise TenantsFileError(_describe(error, where)) from None
    tenant._overrides = TenantPolicy.model_validate(overrides).model_dump(include=set(overrides))
    return tenant


def parse_tenants(raw: Any) -> TenantsFile:
    """The parsed file content (a mapping) -> :class:`TenantsFile`. Raises :class:`TenantsFileError`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise TenantsFileError("the tenants file must be a mapping with 'defaults' and 'tenants'")
    unknown = set(raw) - {"defaults", "tenants"}
    if unknown:
        raise TenantsFileError(f"unknown top-level keys {sorted(unknown)}: expected 'defaults' and 'tenants'")
    defaults = _policy_overrides(raw.get("defaults"), "defaults")
    body = raw.get("tenants") or {}
    if not isinstance(body, dict):
        raise TenantsFileError("tenants: must be a mapping of tenant name to its settings")
    tenants: dict[str, Tenant] = {}
    for name, entry in body.items():
        name = str(name)
        entry = dict(entry or {})
        where = f"tenants.{name}"
        unknown = set(entry) - {"key_hashes", "webhook_secret", "policy", "weight"}
        if unknown:
            raise TenantsFileError(f"{where}: unknown keys {sorted(unknown)} "
                                   "(expected key_hashes, webhook_secret, policy)")
        own = entry.get("policy")
        if "weight" in entry:  # the pre-policy format
            if own is None:
                own = {}
            if isinstance(own, dict):
                if "weight" in own and own["weight"] != entry["weight"]:
                    raise TenantsFileError(
                        f"{where}: weight is given both directly and under policy, with different values")
                own = {**own, "weight": entry["weight"]}
        overrides = _policy_overrides(own, f"{where}.policy")
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


# -- administration (what `svd-serve tenants` does) -----------------------------------------------


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
    values = {
        "key_hashes": list(tenant.key_hashes),
        "webhook_secret": tenant.webhook_secret,
        "overrides": tenant.policy_overrides,
        **changes,
    }
    updated = build_tenant(tenant.name, defaults=document.defaults, **values)
    document.tenants[tenant.name] = updated
    return updated


def create_tenant(path: str | Path, name: str, *, policy: dict[str, Any] | None = None) -> IssuedCredentials:
    """Create a tenant with one API key and a webhook secret; both are returned (shown once)."""
    if not TENANT_NAME.match(name):
        raise TenantsFileError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    with edit_tenants_file(path) as document:
        if name in document.tenants:
            raise TenantsFileError(f"tenant {name!r} already exists (use rotate to issue a new key)")
        key, secret = new_api_key(), new_webhook_secret()
        document.tenants[name] = build_tenant(
            name, key_hashes=[hash_key(key)], webhook_secret=secret,
            overrides=_policy_overrides(policy or {}, "policy"), defaults=document.defaults,
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
    unknown = [field for field in reset if field not in TenantPolicy.model_fields]
    if unknown:
        raise TenantsFileError(f"unknown policy setting {unknown[0]!r}")
    with edit_tenants_file(path) as document:
        tenant = _require(document, name)
        overrides = {k: v for k, v in tenant.policy_overrides.items() if k not in reset}
        overrides.update(changes)
        return _replace(document, tenant, overrides=_policy_overrides(overrides, "policy"))


def update_defaults(path: str | Path, changes: dict[str, Any], *, reset: list[str] | tuple[str, ...] = ()) -> dict:
    """Change the ``defaults:`` section; every tenant is re-validated against the new defaults."""
    unknown = [field for field in reset if field not in TenantPolicy.model_fields]
    if unknown:
        raise TenantsFileError(f"unknown policy setting {unknown[0]!r}")
    with edit_tenants_file(path) as document:
        defaults = {k: v for k, v in document.defaults.items() if k not in reset}
        defaults.update(changes)
        document.defaults = _policy_overrides(defaults, "defaults")
        for tenant in list(document.tenants.values()):
            _replace(document, tenant)
        return dict(document.defaults)


# -- the registry the API authenticates against ---------------------------------------------------


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
