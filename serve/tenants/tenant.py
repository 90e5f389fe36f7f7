"""One tenant: its key hashes, its webhook secret and its policy, and how such a record is built.

A tenant's effective :class:`~serve.tenants.policy.TenantPolicy` is the built-in defaults,
overlaid by the file's ``defaults:`` section, overlaid by the tenant's own ``policy:`` (key by key;
a list such as ``allowed_models`` is replaced, not merged). :func:`build_tenant` does that merge
and remembers the tenant's own keys, which is all the file writes back.

The pre-policy format, ``weight:`` directly under a tenant, is migrated here and only here
(:func:`fold_legacy_weight`): both the file parser and ``Tenant(weight=...)`` go through it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import TenantsFileError
from .policy import TenantPolicy

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_tenant_name(name: str) -> None:
    if not TENANT_NAME.match(name):
        raise TenantsFileError(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")


def fold_legacy_weight(entry: dict[str, Any]) -> dict[str, Any]:
    """A tenant entry with the pre-policy ``weight:`` moved to ``policy.weight``.

    ``policy`` may be a mapping (the file) or a :class:`TenantPolicy` (``Tenant(policy=...)``); only
    the keys it sets itself count, so the weight becomes one of the tenant's own settings. Raises
    ValueError when both places give a weight and they differ.
    """
    if "weight" not in entry:
        return entry
    entry = dict(entry)
    weight = entry.pop("weight")
    policy = entry.get("policy")
    if isinstance(policy, TenantPolicy):
        policy = policy.model_dump(include=policy.model_fields_set)
    elif policy is None:
        policy = {}
    if not isinstance(policy, dict):
        return entry  # not a mapping: the policy's own validation reports it
    if "weight" in policy and policy["weight"] != weight:
        raise ValueError("weight is given both directly and under policy, with different values")
    entry["policy"] = {**policy, "weight": weight}
    return entry


class Tenant(BaseModel):
    """One tenant: its key hashes, its webhook signing secret and its effective policy.

    ``policy`` is the *effective* policy (defaults merged). :attr:`policy_overrides` holds only
    the keys the tenant's own ``policy:`` sets, which is what ``write_tenants`` writes back.
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
        return fold_legacy_weight(data) if isinstance(data, dict) else data

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


def describe_errors(error: ValidationError, where: str) -> str:
    """One line naming each bad place, without the offending values (they may be secrets)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in (where, *item.get("loc", ())) if p != "")
        parts.append(f"{loc}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def validate_overrides(raw: Any, where: str) -> dict[str, Any]:
    """Validate a partial policy mapping on its own; returns its keys, normalised."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TenantsFileError(f"{where}: must be a mapping of policy settings")
    try:
        policy = TenantPolicy.model_validate(raw)
    except ValidationError as error:
        raise TenantsFileError(describe_errors(error, where)) from None
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
    check_tenant_name(name)
    overrides = dict(overrides or {})
    try:
        policy = TenantPolicy.model_validate({**(defaults or {}), **overrides})
        tenant = Tenant(name=name, key_hashes=list(key_hashes or []), webhook_secret=webhook_secret, policy=policy)
    except ValidationError as error:
        raise TenantsFileError(describe_errors(error, where)) from None
    # The effective policy has every default key set, so the tenant's own keys are recorded apart.
    tenant._overrides = TenantPolicy.model_validate(overrides).model_dump(include=set(overrides))
    return tenant
