"""The policy settings as ``svd-serve tenants`` options: the option table, turning option text
into policy values, checking them, and the ``--reset`` names.

Kept apart from the commands (:mod:`serve.tenants.admin`) because it is the one place where a
policy field meets its option name: ``add``, ``set`` and ``defaults`` share it, and an error names
the option the user typed rather than the field.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from pydantic import ValidationError

from .errors import TenantsFileError
from .policy import TenantPolicy

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


def fail(message: str) -> NoReturn:
    """A bad option: one line on stderr (``main`` prints TenantsFileError messages), exit 1."""
    raise TenantsFileError(message)


# -- parsing --------------------------------------------------------------------------------------


def convert(option: str, kind: str, raw: str) -> Any:
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
    fail(f"{option} {raw!r}: expected {expected[base]}{suffix}")


def policy_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The policy settings given on the command line, validated on their own (one line per error,
    naming the option)."""
    changes: dict[str, Any] = {}
    for option, field, kind, _ in POLICY_OPTIONS:
        raw = getattr(args, field, None)
        if raw is not None:
            changes[field] = convert(option, kind, raw)
    if getattr(args, "any_model", False):
        if args.allowed_models:
            fail("give either --allowed-model or --any-model, not both")
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
        fail("; ".join(problems))
    return changes


def policy_resets(args: argparse.Namespace) -> list[str]:
    """The ``--reset`` settings as policy fields (an option's spelling, e.g. max-running, works too)."""
    names = []
    for raw in getattr(args, "reset", None) or []:
        name = raw.strip().lstrip("-").replace("-", "_")
        by_option = {option.lstrip("-").replace("-", "_"): field for field, option in OPTION_OF.items()}
        name = by_option.get(name, name)
        if name not in TenantPolicy.model_fields:
            fail(f"--reset {raw}: not a policy setting (one of: {', '.join(TenantPolicy.model_fields)})")
        names.append(name)
    return names


# -- registration ---------------------------------------------------------------------------------


def add_policy_options(parser: argparse.ArgumentParser, *, resettable: bool) -> None:
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
