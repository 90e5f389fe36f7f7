"""``svd-serve models``: list, add, change and remove the models of the zoo at run time.

    svd-serve models list
    svd-serve models add svd-xt-1-0 --source stabilityai/stable-video-diffusion-img2vid-xt --preload
    svd-serve models add acme/anime --base svd-xt-1-0 --unet s3://models/anime/unet.safetensors
    svd-serve models add acme/slowmo --base svd-xt-1-0 --lora s3://models/slowmo --lora-scale 0.8 --private acme
    svd-serve models set acme/anime --default num_frames=25 --max-num-frames 25
    svd-serve models remove acme/anime

The registry lives in the job store (``--config`` names the app config whose ``job_store`` it is,
else ``--job-store`` gives ``sqlite:PATH`` or ``redis://host:port/db``, else ``./data/jobs.sqlite3``,
what ``svd-serve up`` uses), so every ingress and replica sees a change within seconds, without a
restart. Models declared in the app config are listed but cannot be changed here.
Failures print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipelines.errors import SVDServeError

from .catalog import ModelCatalog
from .entry import DEFAULTABLE_PARAMS, ModelEntry
from .store import ModelStore, RedisModelStore, SqliteModelStore

DEFAULT_JOB_STORE = "sqlite:./data/jobs.sqlite3"


class ModelsCommandError(SVDServeError):
    """An expected failure of ``svd-serve models``: printed as one line."""


def _open(args: argparse.Namespace) -> tuple[ModelStore, ModelCatalog | None]:
    if args.config:
        from ..config import AppConfig

        try:
            config = AppConfig.from_file(args.config)
        except (OSError, ValidationError, ValueError) as error:
            raise ModelsCommandError(f"cannot read the app config {args.config}: {str(error).splitlines()[0]}") from None
        from .store import make_model_store

        store = make_model_store(config.job_store)
        return store, ModelCatalog(config, store, ttl_s=0)
    target = args.job_store or DEFAULT_JOB_STORE
    if target.startswith("sqlite:"):
        return SqliteModelStore(target.removeprefix("sqlite:")), None
    if target.startswith(("redis://", "rediss://")):
        return RedisModelStore(target, key_prefix=args.key_prefix), None
    raise ModelsCommandError(f"--job-store must be sqlite:PATH or redis://host:port/db, not {target!r}")


def _entry_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The entry fields the options give (only those given)."""
    fields: dict[str, Any] = {}
    for name in ("kind", "source", "base", "unet", "lora", "lora_scale", "revision", "dtype", "variant",
                 "description"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.private is not None:
        fields.update(visibility="private", tenant=args.private)
    if args.public:
        fields.update(visibility="public", tenant=None)
    if args.preload is not None:
        fields["preload"] = args.preload
    limits = {name: getattr(args, name) for name in ("max_num_frames", "max_pixels", "max_long_side")
              if getattr(args, name) is not None}
    if limits:
        fields["limits"] = limits
    if args.default:
        defaults = {}
        for item in args.default:
            name, sep, value = item.partition("=")
            if not sep or name not in DEFAULTABLE_PARAMS:
                raise ModelsCommandError(f"--default {item!r}: give NAME=VALUE with NAME one of "
                                         f"{', '.join(sorted(DEFAULTABLE_PARAMS))}")
            try:
                defaults[name] = json.loads(value)
            except json.JSONDecodeError:
                defaults[name] = value
        fields["defaults"] = defaults
    return fields


def _validated(fields: dict[str, Any]) -> ModelEntry:
    try:
        return ModelEntry.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ModelsCommandError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None


def _check_paths(entry: ModelEntry) -> None:
    """A local source, U-Net or adapter that does not exist is a typo: refuse it now, not at the first job."""
    for name in ("source", "unet", "lora"):
        value = getattr(entry, name)
        if value and (value.startswith(("/", ".", "~")) or value.count("/") > 1) and "://" not in value:
            if not Path(value).expanduser().exists():
                raise ModelsCommandError(f"{name}: {value} does not exist")


def _check_base(entry: ModelEntry, store: ModelStore, catalog: ModelCatalog | None) -> None:
    """The base chain resolves (no loop, no LoRA on a LoRA, no other tenant's private model as a
    base). Without the app config, a base missing from the registry may be a declared model: noted."""
    if entry.base is None:
        return
    if catalog is not None:
        try:
            catalog.weights(entry)
        except (LookupError, ValueError) as error:
            raise ModelsCommandError(str(error).replace("is not registered", "is not a registered or declared "
                                                        "model this one may use")) from None
        return
    base = store.get(entry.base)
    if base is None:
        print(f"svd-serve models: note: base {entry.base!r} is not in the registry; it must be declared in the "
              "app config", file=sys.stderr)
    elif base.kind != "image-to-video":
        raise ModelsCommandError(f"base {entry.base!r} is a {base.kind} model; a fine-tune's base is image-to-video")
    elif base.visibility == "private" and base.tenant != entry.tenant:
        raise ModelsCommandError(f"base {entry.base!r} is private to another tenant")
    elif entry.lora and base.lora:
        raise ModelsCommandError(f"base {entry.base!r} has a LoRA adapter itself; register the adapter on its base")


def _save(entry: ModelEntry, store: ModelStore, catalog: ModelCatalog | None, done: str) -> int:
    _check_paths(entry)
    _check_base(entry, store, catalog)
    store.put(entry)
    print(f"{done} {entry.id}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store, catalog = _open(args)
    declared = catalog.declared_ids() if catalog is not None else frozenset()
    entries = catalog.entries(fresh=True) if catalog is not None else {e.id: e for e in store.list()}
    if args.json:
        print(json.dumps([{**entry.model_dump(mode="json"), "declared": entry.id in declared}
                          for entry in entries.values()], indent=2))
        return 0
    for entry in entries.values():
        weights = entry.source or f"base={entry.base}"
        extra = [f"unet={entry.unet}" if entry.unet else "", f"lora={entry.lora}" if entry.lora else "",
                 f"private={entry.tenant}" if entry.tenant else "", "preload" if entry.preload else "",
                 "declared" if entry.id in declared else ""]
        print("  ".join([entry.id, entry.kind, weights, *filter(None, extra)]))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    store, catalog = _open(args)
    entry = _validated({"id": args.id, **_entry_fields(args)})
    if catalog is not None and entry.id in catalog.declared_ids():
        raise ModelsCommandError(f"{entry.id!r} is declared in the app config; change it there")
    if store.get(entry.id) is not None and not args.replace:
        raise ModelsCommandError(f"{entry.id!r} is already registered (svd-serve models set, or add --replace)")
    return _save(entry, store, catalog, "added")


def cmd_set(args: argparse.Namespace) -> int:
    store, catalog = _open(args)
    if catalog is not None and args.id in catalog.declared_ids():
        raise ModelsCommandError(f"{args.id!r} is declared in the app config; change it there")
    current = store.get(args.id)
    if current is None:
        raise ModelsCommandError(f"no registered model {args.id!r}")
    changes = _entry_fields(args)
    if not changes:
        raise ModelsCommandError("nothing to change: give at least one option")
    merged = current.model_dump()
    for name, value in changes.items():
        merged[name] = {**merged[name], **value} if name in ("defaults", "limits") else value
    return _save(_validated(merged), store, catalog, "changed")


def cmd_remove(args: argparse.Namespace) -> int:
    store, catalog = _open(args)
    if catalog is not None and args.id in catalog.declared_ids():
        raise ModelsCommandError(f"{args.id!r} is declared in the app config; remove it there")
    dependants = [entry.id for entry in store.list() if entry.base == args.id]
    if dependants and not args.force:
        raise ModelsCommandError(f"{', '.join(dependants)} use {args.id!r} as their base: remove them first "
                                 "(or --force)")
    if not store.delete(args.id):
        raise ModelsCommandError(f"no registered model {args.id!r}")
    print(f"removed {args.id}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``svd-serve models ...`` to the top-level parser."""
    models = commands.add_parser("models", help="list, add, change and remove the models of the zoo")
    where = models.add_mutually_exclusive_group()
    where.add_argument("--config", default=None, help="the app config YAML whose job_store holds the registry")
    where.add_argument("--job-store", default=None,
                       help=f"sqlite:PATH or redis://host:port/db (default: {DEFAULT_JOB_STORE}; the Redis password "
                            "comes from $REDIS_PASSWORD)")
    models.add_argument("--key-prefix", default="svd", help="Redis key prefix of the job store (default: svd)")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every model, declared and registered")
    listing.add_argument("--json", action="store_true", help="full entries as JSON")
    listing.set_defaults(handler=cmd_list)

    for name, handler, text in (("add", cmd_add, "register a model"), ("set", cmd_set, "change a registered model")):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("id", help="the model id requests name ('svd-xt', 'acme/anime')")
        parser.add_argument("--kind", choices=["image-to-video", "text-to-image"], default=None)
        parser.add_argument("--source", default=None, help="a whole pipeline: Hub repo id, directory or s3://")
        parser.add_argument("--base", default=None, help="a fine-tune: the id of the model it is based on")
        parser.add_argument("--unet", default=None, help="a fine-tuned U-Net: diffusers folder or .safetensors file")
        parser.add_argument("--lora", default=None, help="a PEFT LoRA adapter directory (path or s3://)")
        parser.add_argument("--lora-scale", type=float, default=None, help="the adapter's strength (default 1)")
        parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
        parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
        parser.add_argument("--variant", choices=["auto", "fp16", "none"], default=None)
        parser.add_argument("--default", action="append", metavar="NAME=VALUE",
                            help="a generation default of this model (repeatable), e.g. num_frames=14")
        parser.add_argument("--max-num-frames", type=int, default=None)
        parser.add_argument("--max-pixels", type=int, default=None)
        parser.add_argument("--max-long-side", type=int, default=None)
        visibility = parser.add_mutually_exclusive_group()
        visibility.add_argument("--private", metavar="TENANT", default=None, help="only this tenant sees the model")
        visibility.add_argument("--public", action="store_true", help="every tenant sees it (the default)")
        preload = parser.add_mutually_exclusive_group()
        preload.add_argument("--preload", dest="preload", action="store_true", default=None,
                             help="warm pool: replicas load it when they start")
        preload.add_argument("--no-preload", dest="preload", action="store_false")
        parser.add_argument("--description", default=None)
        if name == "add":
            parser.add_argument("--replace", action="store_true", help="replace a registered model of this id")
        parser.set_defaults(handler=handler)

    remove = actions.add_parser("remove", help="unregister a model")
    remove.add_argument("id")
    remove.add_argument("--force", action="store_true", help="even if other models use it as their base")
    remove.set_defaults(handler=cmd_remove)
