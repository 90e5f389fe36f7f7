"""Tenants, their API keys and their admission policy.

One concern per module:

- :mod:`.policy`: :class:`TenantPolicy`, what a tenant may do, and the request checks against it.
- :mod:`.tenant`: :class:`Tenant`, the defaults merge, and the legacy ``weight:`` migration.
- :mod:`.keys`: API keys, their hashes, and webhook secrets (the project's only generator of them).
- :mod:`.file`: the tenants file format, reading it and writing it atomically under a lock.
- :mod:`.edits`: create, rotate, revoke, remove, and policy/default changes of the file.
- :mod:`.admin`: the ``svd-serve tenants`` commands over :mod:`.edits`.
- :mod:`.options`: the policy settings as command-line options of those commands.
- :mod:`.registry`: :class:`TenantRegistry`, the hot-reloading authenticator the API uses.

This package re-exports what ``serve.tenants`` has always offered, so importers need not know the
layout. :mod:`.admin` and :mod:`.options` are not imported here: only the CLI needs them.
See ``docs/tenants.md``.
"""

from __future__ import annotations

from .edits import (
    IssuedCredentials,
    add_tenant,
    create_tenant,
    remove_tenant,
    revoke_key,
    rotate_key,
    rotate_webhook_secret,
    update_defaults,
    update_policy,
)
from .errors import AuthenticationError, TenantsFileError
from .file import (
    TenantsFile,
    edit_tenants_file,
    load_tenants_file,
    parse_tenants,
    read_tenants,
    save_tenants_file,
    write_tenants,
)
from .keys import KEY_ID_CHARS, KEY_PREFIX, WEBHOOK_SECRET_PREFIX, hash_key, key_id, new_api_key, new_webhook_secret
from .policy import TenantPolicy
from .registry import TenantRegistry, logger
from .tenant import TENANT_NAME, Tenant, build_tenant

__all__ = [
    "KEY_ID_CHARS",
    "KEY_PREFIX",
    "TENANT_NAME",
    "WEBHOOK_SECRET_PREFIX",
    "AuthenticationError",
    "IssuedCredentials",
    "Tenant",
    "TenantPolicy",
    "TenantRegistry",
    "TenantsFile",
    "TenantsFileError",
    "add_tenant",
    "build_tenant",
    "create_tenant",
    "edit_tenants_file",
    "hash_key",
    "key_id",
    "load_tenants_file",
    "new_api_key",
    "new_webhook_secret",
    "parse_tenants",
    "read_tenants",
    "remove_tenant",
    "revoke_key",
    "rotate_key",
    "rotate_webhook_secret",
    "save_tenants_file",
    "update_defaults",
    "update_policy",
    "write_tenants",
]
