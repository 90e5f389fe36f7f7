"""``svd-serve tenants``: add, list, revoke and rotate tenants and their keys, and set their policy.

    svd-serve tenants add acme --weight 2 --rate-limit 60
    svd-serve tenants list
    svd-serve tenants set acme --max-running 8 --reset burst
    svd-serve tenants rotate acme [--keep-old] [--webhook-secret]
    svd-serve tenants revoke acme [--key-hash 1a2b3c4d]
    svd-serve tenants defaults --rate-limit 300

An API key and a webhook secret are printed once, when created or rotated; the file keeps only
the key's SHA-256 hash (and the webhook secret, which signing needs). ``list`` never prints a hash
or a secret. Every command edits the tenants file (``--file``, default ``$SVD_SERVE_TENANTS_FILE``
or ``./data/tenants.yaml``) under a lock and replaces it atomically; running services pick the
change up within a second, without a restart. Failures print one line and exit non-zero.

This module holds the commands and what they print; the policy options are
:mod:`serve.tenants.options`, and the changes to the file :mod:`serve.tenants.edits`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipelines.errors import SVDServeError

from . import edits
from .file import load_tenants_file, read_tenants
from .options import add_policy_options, fail, policy_changes, policy_resets
from .policy import TenantPolicy

TENANTS_FILE_ENV = "SVD_SERVE_TENANTS_FILE"
DEFAULT_TENANTS_FILE = "./data/tenants.yaml"

# -- argument parsing -----------------------------------------------------------------------------


def _tenants_file(args: argparse.Namespace) -> str:
    return args.file or os.environ.get(TENANTS_FILE_ENV) or DEFAULT_TENANTS_FILE


# -- output ---------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(value) if value else "any"
    return str(value)


def _policy_line(policy: Any, overrides: dict[str, Any] | None = None) -> str:
    """``name=value`` pairs of a policy, then which of them are set here rather than inherited."""
    line = " ".join(f"{field}={_show(getattr(policy, field))}" for field in type(policy).model_fields)
    if overrides is not None:
        line += f" (own: {', '.join(overrides) or 'none'})"
    return line


def _print_credentials(issued: Any, *, as_json: bool, header: str, footer: str | None = None) -> None:
    if as_json:
        body = {"tenant": issued.tenant}
        if issued.api_key is not None:
            body.update(api_key=issued.api_key, key_id=issued.key_id)
        if issued.webhook_secret is not None:
            body["webhook_secret"] = issued.webhook_secret
        print(json.dumps(body))
        return
    print(header)
    if issued.api_key is not None:
        print(f"  api key:        {issued.api_key}")
        print(f"  key id:         {issued.key_id}")
    if issued.webhook_secret is not None:
        print(f"  webhook secret: {issued.webhook_secret}")
    print("Store these now: they are not shown again" + (" (only the key's hash is kept)." if issued.api_key else "."))
    if footer:
        print(footer)


# -- commands -------------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    issued = edits.create_tenant(_tenants_file(args), args.name, policy=policy_changes(args))
    _print_credentials(issued, as_json=args.json, header=f"added tenant {args.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    document = load_tenants_file(_tenants_file(args))
    defaults = TenantPolicy.model_validate(document.defaults)
    if args.json:
        print(json.dumps({
            "defaults": defaults.model_dump(),
            "tenants": [
                {"name": t.name, "keys": len(t.key_hashes), "webhook_secret": t.webhook_secret is not None,
                 "policy": t.policy.model_dump(), "overrides": sorted(t.policy_overrides)}
                for _, t in sorted(document.tenants.items())
            ],
        }))
        return 0
    print(f"defaults: {_policy_line(defaults)}")
    if not document.tenants:
        print(f"no tenants in {_tenants_file(args)}")
        return 0
    for name, tenant in sorted(document.tenants.items()):
        keys = len(tenant.key_hashes)
        webhook = "set" if tenant.webhook_secret else "none"
        print(f"{name}: {keys} key{'s' if keys != 1 else ''}, webhook secret {webhook}")
        print(f"  {_policy_line(tenant.policy, tenant.policy_overrides)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = _tenants_file(args)
    if args.key_hash:
        revoked = edits.revoke_key(path, args.name, args.key_hash)
        left = len(read_tenants(path)[args.name].key_hashes)
        print(f"revoked key {revoked} of tenant {args.name} ({left} key{'s' if left != 1 else ''} left)")
    else:
        edits.remove_tenant(path, args.name)
        print(f"removed tenant {args.name}: its keys no longer work; its jobs stay until their retention ends")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    path = _tenants_file(args)
    if args.webhook_secret:
        if args.keep_old:
            fail("--keep-old applies to API keys, not to --webhook-secret")
        issued = edits.rotate_webhook_secret(path, args.name)
        _print_credentials(issued, as_json=args.json, header=f"new webhook secret of tenant {args.name}")
        return 0
    issued = edits.rotate_key(path, args.name, keep_old=args.keep_old)
    footer = None
    if args.keep_old:
        footer = (f"The old key(s) still work: revoke them with "
                  f"`svd-serve tenants revoke {args.name} --key-hash <key id>` when clients have switched.")
    header = f"new API key of tenant {args.name}" + ("" if args.keep_old else " (the old keys no longer work)")
    _print_credentials(issued, as_json=args.json, header=header, footer=footer)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    changes, resets = policy_changes(args), policy_resets(args)
    if not changes and not resets:
        fail("nothing to change: give a policy option (see --help) or --reset SETTING")
    tenant = edits.update_policy(_tenants_file(args), args.name, changes, reset=resets)
    print(f"updated tenant {args.name}: {_policy_line(tenant.policy, tenant.policy_overrides)}")
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    path = _tenants_file(args)
    changes, resets = policy_changes(args), policy_resets(args)
    if changes or resets:
        defaults = edits.update_defaults(path, changes, reset=resets)
        print(f"updated defaults: {_policy_line(TenantPolicy.model_validate(defaults))}")
    else:
        defaults = load_tenants_file(path).defaults
        print(f"defaults: {_policy_line(TenantPolicy.model_validate(defaults))}")
    return 0


# -- registration ---------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tenants`` and its subcommands to the ``svd-serve`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", default=None, metavar="PATH",
                        help=f"tenants file (default: ${TENANTS_FILE_ENV} or {DEFAULT_TENANTS_FILE})")

    tenants = subparsers.add_parser(
        "tenants", help="manage tenants, their API keys and their limits",
        description="Manage the tenants file: tenants, API keys (only hashes are stored), webhook secrets and "
                    "per-tenant limits. Running services pick changes up without a restart.",
    )
    commands = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")

    add = commands.add_parser("add", parents=[common], help="create a tenant; prints its API key and webhook "
                                                             "secret once")
    add.add_argument("name", help="tenant name: 1-64 letters, digits, '_', '.' or '-'")
    add.add_argument("--json", action="store_true", help="print the credentials as one JSON object")
    add_policy_options(add, resettable=False)
    add.set_defaults(handler=cmd_add)

    show = commands.add_parser("list", parents=[common], help="tenants, their key counts and policies "
                                                              "(never hashes or secrets)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=cmd_list)

    revoke = commands.add_parser("revoke", parents=[common], help="remove a tenant, or one of its keys")
    revoke.add_argument("name", help="tenant name")
    revoke.add_argument("--key-hash", metavar="PREFIX", default=None,
                        help="revoke only the key whose SHA-256 hash starts with PREFIX (its key id, as printed "
                             "when it was issued, or from: printf %%s \"$KEY\" | sha256sum)")
    revoke.set_defaults(handler=cmd_revoke)

    rotate = commands.add_parser("rotate", parents=[common], help="issue a new API key (printed once) and remove "
                                                                  "the old ones")
    rotate.add_argument("name", help="tenant name")
    rotate.add_argument("--keep-old", action="store_true",
                        help="keep the old keys working (a grace period; revoke them later with --key-hash)")
    rotate.add_argument("--webhook-secret", action="store_true",
                        help="rotate the webhook signing secret instead of the API key")
    rotate.add_argument("--json", action="store_true", help="print the credentials as one JSON object")
    rotate.set_defaults(handler=cmd_rotate)

    change = commands.add_parser("set", parents=[common], help="change a tenant's policy")
    change.add_argument("name", help="tenant name")
    add_policy_options(change, resettable=True)
    change.set_defaults(handler=cmd_set)

    defaults = commands.add_parser("defaults", parents=[common],
                                   help="show, or change, the policy defaults every tenant inherits")
    add_policy_options(defaults, resettable=True)
    defaults.set_defaults(handler=cmd_defaults)
    return tenants


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m serve.tenants.admin``); ``svd-serve tenants`` is the usual one."""
    parser = argparse.ArgumentParser(prog="svd-serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SVDServeError as error:
        print(f"svd-serve tenants: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
