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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

TENANTS_FILE_ENV = "SVD_SERVE_TENANTS_FILE"
DEFAULT_TENANTS_FILE = "./data/tenants.yaml"

#: (option, policy field, kind, help). kind: "float", "int", "float?"/"int?" (accept "none"), "duration?".
POLICY_OPTIONS: list[tuple[str, str, str, str]] = [
    ("--weight", "weight", "float", "fair-share weight when tenants compete for the GPUs (default 1)"),
    ("--rate-limit", "rate_limit_per_minute", "float?",
     "submissions per minute, shared by all ingress replicas; 'none' for no limit (default 150)"),
    ("--burst", "burst", "int", "submissions allowed back to back before the rate applies (default 20)"),
    ("--max-running", "max_running_jobs", "int?", "jobs generating at once; more wait queued (default 4)"),
    ("--max-queued", "max_queued_jobs", "int?", "jobs waiting in the queue; more get 429 queue_full (default 100)"),
    ("--max-frames", "max_num_frames", "int?", "most frames per clip; more get 422 (default: none)"),
    ("--max-pixels", "max_pixels", "int?", "most width x height per frame; more get 422 (default: none)"),
    ("--max-long-side", "max_long_side", "int?", "largest width or height; more get 422 (default: none)"),
    ("--max-steps", "max_inference_steps", "int?", "most num_inference_steps; more get 422 (default: none)"),
    ("--retention", "retention_s", "duration?",
     "how long finished jobs and clips are kept: seconds or 90m, 12h, 7d (default: the service's)"),
]
OPTION_OF = {field: option for option, field, _, _ in POLICY_OPTIONS}
OPTION_OF["allowed_models"] = "--allowed-model"


def _fail(message: str):
    from .tenants import TenantsFileError

    raise TenantsFileError(message)


# -- argument parsing -----------------------------------------------------------------------------


def _tenants_file(args: argparse.Namespace) -> str:
    return args.file or os.environ.get(TENANTS_FILE_ENV) or DEFAULT_TENANTS_FILE


def _convert(option: str, kind: str, raw: str) -> Any:
    """Option text -> value. Done here rather than by argparse so a bad value is one line."""
    text = raw.strip()
    if kind.endswith("?") and text.lower() in {"none", "unlimited", "off"}:
        return None
    base = kind.rstrip("?")
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "duration":
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.lower())
            if not match:
                raise ValueError
            return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    except ValueError:
        pass
    expected = {"int": "a whole number", "float": "a number", "duration": "seconds or a duration such as 12h or 7d"}
    suffix = " or 'none'" if kind.endswith("?") else ""
    _fail(f"{option} {raw!r}: expected {expected[base]}{suffix}")


def _policy_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The policy settings given on the command line, validated on their own (one line per error,
    naming the option)."""
    from pydantic import ValidationError

    from .tenants import TenantPolicy

    changes: dict[str, Any] = {}
    for option, field, kind, _ in POLICY_OPTIONS:
        raw = getattr(args, field, None)
        if raw is not None:
            changes[field] = _convert(option, kind, raw)
    if getattr(args, "any_model", False):
        if args.allowed_models:
            _fail("give either --allowed-model or --any-model, not both")
        changes["allowed_models"] = []
    elif getattr(args, "allowed_models", None):
        changes["allowed_models"] = list(args.allowed_models)
    try:
        TenantPolicy.model_validate(changes)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False, include_input=False):
            loc = item.get("loc") or ()
            message = str(item["msg"]).removeprefix("Value error, ")
            if loc:
                problems.append(f"{OPTION_OF.get(str(loc[0]), str(loc[0]))}: {message}")
            else:
                problems.append(message)
        _fail("; ".join(problems))
    return changes


def _resets(args: argparse.Namespace) -> list[str]:
    from .tenants import TenantPolicy

    names = []
    for raw in getattr(args, "reset", None) or []:
        name = raw.strip().lstrip("-").replace("-", "_")
        by_option = {option.lstrip("-").replace("-", "_"): field for field, option in OPTION_OF.items()}
        name = by_option.get(name, name)
        if name not in TenantPolicy.model_fields:
            _fail(f"--reset {raw}: not a policy setting (one of: {', '.join(TenantPolicy.model_fields)})")
        names.append(name)
    return names


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
    from .tenants import create_tenant

    issued = create_tenant(_tenants_file(args), args.name, policy=_policy_changes(args))
    _print_credentials(issued, as_json=args.json, header=f"added tenant {args.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .tenants import TenantPolicy, load_tenants_file

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
    from .tenants import read_tenants, remove_tenant, revoke_key

    path = _tenants_file(args)
    if args.key_hash:
        revoked = revoke_key(path, args.name, args.key_hash)
        left = len(read_tenants(path)[args.name].key_hashes)
        print(f"revoked key {revoked} of tenant {args.name} ({left} key{'s' if left != 1 else ''} left)")
    else:
        remove_tenant(path, args.name)
        print(f"removed tenant {args.name}: its keys no longer work; its jobs stay until their retention ends")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from .tenants import rotate_key, rotate_webhook_secret

    path = _tenants_file(args)
    if args.webhook_secret:
        if args.keep_old:
            _fail("--keep-old applies to API keys, not to --webhook-secret")
        issued = rotate_webhook_secret(path, args.name)
        _print_credentials(issued, as_json=args.json, header=f"new webhook secret of tenant {args.name}")
        return 0
    issued = rotate_key(path, args.name, keep_old=args.keep_old)
    footer = None
    if args.keep_old:
        footer = (f"The old key(s) still work: revoke them with "
                  f"`svd-serve tenants revoke {args.name} --key-hash <key id>` when clients have switched.")
    header = f"new API key of tenant {args.name}" + ("" if args.keep_old else " (the old keys no longer work)")
    _print_credentials(issued, as_json=args.json, header=header, footer=footer)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from .tenants import update_policy

    changes, resets = _policy_changes(args), _resets(args)
    if not changes and not resets:
        _fail("nothing to change: give a policy option (see --help) or --reset SETTING")
    tenant = update_policy(_tenants_file(args), args.name, changes, reset=resets)
    print(f"updated tenant {args.name}: {_policy_line(tenant.policy, tenant.policy_overrides)}")
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    from .tenants import TenantPolicy, load_tenants_file, update_defaults

    path = _tenants_file(args)
    changes, resets = _policy_changes(args), _resets(args)
    if changes or resets:
        defaults = update_defaults(path, changes, reset=resets)
        print(f"updated defaults: {_policy_line(TenantPolicy.model_validate(defaults))}")
    else:
        defaults = load_tenants_file(path).defaults
        print(f"defaults: {_policy_line(TenantPolicy.model_validate(defaults))}")
    return 0


# -- registration ---------------------------------------------------------------------------------


def _add_policy_options(parser: argparse.ArgumentParser, *, resettable: bool) -> None:
    group = parser.add_argument_group("policy (see docs/tenants.md)")
    for option, field, _, text in POLICY_OPTIONS:
        group.add_argument(option, dest=field, metavar="VALUE", default=None, help=text)
    group.add_argument("--allowed-model", dest="allowed_models", action="append", metavar="SOURCE", default=None,
                       help="a model source this tenant may use (repeat; globs such as 'stabilityai/*' work); "
                            "replaces the list (default: any model)")
    group.add_argument("--any-model", action="store_true", help="allow any model (clears --allowed-model)")
    if resettable:
        group.add_argument("--reset", action="append", metavar="SETTING", default=None,
                           help="drop this tenant's own value of a setting (e.g. burst or max-running), "
                                "falling back to the defaults; repeatable")


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
    _add_policy_options(add, resettable=False)
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
    _add_policy_options(change, resettable=True)
    change.set_defaults(handler=cmd_set)

    defaults = commands.add_parser("defaults", parents=[common],
                                   help="show, or change, the policy defaults every tenant inherits")
    _add_policy_options(defaults, resettable=True)
    defaults.set_defaults(handler=cmd_defaults)
    return tenants


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m serve.tenants_cli``); ``svd-serve tenants`` is the usual one."""
    from pipelines.errors import SVDServeError

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
