"""Load a fine-tuned U-Net that comes without the rest of its pipeline.

A fine-tune of SVD usually changes only the U-Net, and is published either as a diffusers folder
(``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``) or as one ``.safetensors``
file holding the U-Net's state dict, whose config is then the base model's ``unet/config.json``.
Both may be local paths or live on S3 (``s3://bucket/key.safetensors`` is a file, any other
``s3://bucket/prefix`` a folder), mirrored into ``<cache root>/s3-unet/<bucket>/<key>`` with the
same (size, ETag) manifest, lock and atomic downloads as the model mirror, so a restart with an
unchanged object downloads nothing.

Loading builds the model from its config with empty (meta) weights and assigns the checkpoint's
tensors with ``load_state_dict(strict=True, assign=True)``: the weights are held once, not
allocated randomly and then overwritten. ``from_single_file`` is not used: it expects original
Stability checkpoints with their own key names. Only safetensors are read (no pickle).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from pipelines.errors import ModelLoadError
from pipelines.loader.fingerprint import component_configs, file_fingerprint, fingerprint_parts
from pipelines.loader.layout import _pick_weights, _read_model_index
from pipelines.loader.s3 import (
    _LOCK_NAME,
    _PART_SUFFIX,
    _download_s3_object,
    _endpoint_label,
    _list_s3_objects,
    _locked,
    _parse_s3_url,
    _read_manifest,
    _s3_client,
    _s3_error,
    _write_manifest,
)
from pipelines.loader.spec import ModelSpec, _cache_root, _one_line, _runtime_device_dtype, _wants_fp16_files

__all__ = ["load_unet_checkpoint", "resolve_unet_checkpoint", "unet_checkpoint_fingerprint", "write_unet_checkpoint"]

logger = logging.getLogger(__name__)


def load_unet_checkpoint(source: str, *, base_dir: Path, spec: ModelSpec) -> tuple[Any, str]:
    """Load the U-Net at ``source`` (local or ``s3://``) on the spec's device and dtype.

    ``base_dir`` is the base model's save_pretrained directory: it names the U-Net class (its
    model_index.json) and, for a single-file checkpoint, the config. Returns ``(unet, fingerprint)``;
    the fingerprint equals the base layout's ``unet`` fingerprint when config and weights are equal.
    """
    path = resolve_unet_checkpoint(source, spec)
    return _load_resolved(path, base_dir=Path(base_dir), spec=spec, label=source), unet_checkpoint_fingerprint(
        path, base_dir=base_dir, spec=spec
    )


def resolve_unet_checkpoint(source: str, spec: ModelSpec) -> Path:
    """A local path for ``source``: the path itself, or the S3 object/prefix mirrored into the cache."""
    if source.startswith("s3://"):
        return _fetch_s3(source, spec)
    if "://" in source:
        raise ModelLoadError(f"Unsupported U-Net checkpoint source {source!r}: use a path or an s3:// URL")
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"U-Net checkpoint {path} does not exist")
    return path


def unet_checkpoint_fingerprint(path: Path, *, base_dir: Path, spec: ModelSpec) -> str:
    """The fingerprint of a resolved checkpoint: U-Net class, config and weight file digests."""
    class_ref, configs, weights = _checkpoint_parts(Path(path), Path(base_dir), spec)
    return fingerprint_parts(class_ref, configs, [file_fingerprint(w) for w in weights])


def write_unet_checkpoint(unet, path: str | Path) -> Path:
    """Save ``unet``'s state dict as one safetensors file (the single-file checkpoint form)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous() and clone(): safetensors refuses views and tensors sharing storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in unet.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _checkpoint_parts(path: Path, base_dir: Path, spec: ModelSpec) -> tuple[list, dict[str, Path], list[Path]]:
    """``([library, class], {config name: path}, weight files)`` of a local checkpoint."""
    index = _read_model_index(base_dir)
    class_ref = index.get("unet")
    if not (isinstance(class_ref, list) and len(class_ref) == 2 and class_ref[0] == "diffusers"):
        raise ModelLoadError(f"{base_dir}/model_index.json names no diffusers unet to load {path} into")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"U-Net checkpoint {path} is not a .safetensors file (pickles are not loaded)")
        config = base_dir / "unet" / "config.json"
        if not config.is_file():
            raise ModelLoadError(f"{base_dir} has no unet/config.json for the single-file checkpoint {path}")
        return class_ref, {"config.json": config}, [path]
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"U-Net checkpoint folder {path} has no config.json")
    files = [p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    _, chosen = _pick_weights(files, want_fp16=_wants_fp16_files(spec), mode=spec.variant, where=str(path))
    if not chosen:
        raise ModelLoadError(f"U-Net checkpoint folder {path} has no weight files (*.safetensors)")
    if any(name.endswith(".bin") for name in chosen):
        raise ModelLoadError(f"U-Net checkpoint folder {path} has only .bin weights: convert them to safetensors")
    return class_ref, component_configs(path), [path / name for name in sorted(chosen)]


def _load_resolved(path: Path, *, base_dir: Path, spec: ModelSpec, label: str):
    import diffusers
    import torch
    from safetensors.torch import load_file

    device, dtype = _runtime_device_dtype(spec)
    class_ref, configs, weights = _checkpoint_parts(path, base_dir, spec)
    cls = getattr(diffusers, class_ref[1], None)
    if cls is None or not issubclass(cls, torch.nn.Module):
        raise ModelLoadError(f"{base_dir}/model_index.json names unet class {class_ref[1]!r}, which diffusers lacks")
    try:
        config = json.loads(configs["config.json"].read_text())
        with _empty_weights():
            unet = cls.from_config(config)
        state: dict[str, torch.Tensor] = {}
        for weight in weights:
            if weight.suffix == ".safetensors":  # a sharded set's index JSON only maps keys to shards
                state.update(load_file(str(weight)))
    except Exception as err:  # noqa: BLE001 - anything from the libraries becomes one actionable line
        raise ModelLoadError(f"Could not read the U-Net checkpoint {label}: {_one_line(err)}") from err
    _check_state_dict(unet, state, label)
    keep = tuple(getattr(unet, "_keep_in_fp32_modules", None) or ())

    def wanted(key: str):  # from_pretrained keeps _keep_in_fp32_modules in fp32 under fp16
        return torch.float32 if dtype == torch.float16 and set(key.split(".")) & set(keep) else dtype

    state = {k: v.to(wanted(k)) if v.is_floating_point() else v for k, v in state.items()}
    unet.load_state_dict(state, strict=True, assign=True)
    # Buffers outside the state dict were built for real (not on meta) in fp32: cast them too.
    # (Not unet.to(dtype): diffusers warns on every such call.)
    for prefix, module in unet.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(wanted(f"{prefix}.{name}" if prefix else name))
    unet = unet.to(device).eval()
    unet.requires_grad_(False)
    logger.info("Loaded the U-Net checkpoint %s (%d tensors) as %s on %s", label, len(state), dtype, device)
    return unet


def _empty_weights():
    """accelerate's ``init_empty_weights`` (parameters on the meta device), if accelerate is installed."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency; without it, allocate twice
        return contextlib.nullcontext()
    return init_empty_weights()


def _check_state_dict(unet, state: dict, label: str) -> None:
    """One line saying how the checkpoint's keys differ from the model's, if they do."""
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'key')} missing (e.g. {missing[0]!r})")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')} (e.g. {unexpected[0]!r})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{_count(len(wrong), 'key')} with the wrong shape (e.g. {k!r}: "
            f"{list(state[k].shape)} in the checkpoint, {list(expected[k])} in the model)"
        )
    if problems:
        raise ModelLoadError(f"U-Net checkpoint {label} does not match the U-Net config: " + "; ".join(problems))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# S3: one object, or a folder, mirrored with s3.py's manifest, lock and atomic download
# --------------------------------------------------------------------------------------------


def _fetch_s3(source: str, spec: ModelSpec) -> Path:
    bucket, prefix = _parse_s3_url(source)
    key = prefix.rstrip("/")
    if not key:
        raise ModelLoadError(f"{source!r} names a bucket, not a U-Net checkpoint file or folder")
    client = _s3_client(spec)
    endpoint = _endpoint_label(spec)
    root = _cache_root(spec) / "s3-unet" / bucket
    if key.endswith(".safetensors"):
        obj = _head_object(client, bucket, key, endpoint=endpoint)
        parent, _, name = key.rpartition("/")
        local_dir = root / parent if parent else root
        _mirror(client, bucket, parent + "/" if parent else "", local_dir, {name: obj}, endpoint=endpoint)
        return local_dir / name
    url = f"s3://{bucket}/{prefix}"
    listing = _list_s3_objects(client, bucket, prefix, url=url, endpoint=endpoint)
    if not listing:
        raise ModelLoadError(f"No objects under {url}: check the bucket and prefix")
    if "config.json" not in listing:
        raise ModelLoadError(f"{url} has no config.json: it is not a diffusers U-Net folder")
    top = [rel for rel in listing if "/" not in rel]
    _, chosen = _pick_weights(top, want_fp16=_wants_fp16_files(spec), mode=spec.variant, where=url)
    wanted = {rel: listing[rel] for rel in ["config.json", *chosen]}
    local_dir = root / key
    _mirror(client, bucket, prefix, local_dir, wanted, endpoint=endpoint, listed=set(listing))
    return local_dir


def _head_object(client, bucket: str, key: str, *, endpoint: str) -> dict:
    from pipelines import s3client

    url = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except s3client.botocore_errors() as err:
        if s3client.classify(err).kind == "not_found":
            raise ModelLoadError(f"No U-Net checkpoint at {url}: check the key") from err
        raise _s3_error(err, action="read", url=url, endpoint=endpoint, bucket=bucket) from err
    return {"key": key, "size": int(head["ContentLength"]), "etag": str(head.get("ETag", "")).strip('"')}


def _mirror(
    client, bucket: str, prefix: str, local_dir: Path, wanted: dict[str, dict], *, endpoint: str,
    listed: set[str] | None = None,
) -> None:
    """Download the ``wanted`` objects (rel -> key/size/etag) unless the manifest has them already.

    The manifest is s3.py's, for (bucket, prefix) in ``local_dir``: a folder checkpoint and a file
    inside it share it, and concurrent replicas serialize on its lock. With ``listed`` (a full
    listing of the prefix), files whose object is gone are deleted.
    """
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(f"Cannot create the cache directory {local_dir}: {_one_line(err)}") from err
    with _locked(local_dir / _LOCK_NAME):
        manifest = _read_manifest(local_dir, bucket=bucket, prefix=prefix)
        for rel, obj in sorted(wanted.items()):
            target = local_dir / rel
            if manifest.get(rel) == obj and target.is_file() and target.stat().st_size == obj["size"]:
                continue
            for part in target.parent.glob(f".{target.name}.*{_PART_SUFFIX}"):
                part.unlink(missing_ok=True)  # left by a killed download; we hold the lock
            _download_s3_object(client, bucket, obj, target, endpoint=endpoint)
            manifest[rel] = obj
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)
        gone = sorted(set(manifest) - listed) if listed is not None else []
        for rel in gone:
            (local_dir / rel).unlink(missing_ok=True)
            del manifest[rel]
        if gone:
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)


#: The files of a PEFT LoRA adapter directory (what ``save_pretrained`` writes).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def fetch_adapter(source: str, spec: ModelSpec) -> Path:
    """A local copy of a LoRA adapter directory: a local path as is, an ``s3://bucket/prefix``
    mirrored once (its two files) into the cache under ``s3-adapters``; unchanged objects are not
    downloaded again."""
    if not source.startswith("s3://"):
        return Path(source).expanduser()
    bucket, prefix = _parse_s3_url(source)
    prefix = prefix.rstrip("/") + "/"
    url = f"s3://{bucket}/{prefix}"
    client = _s3_client(spec)
    endpoint = _endpoint_label(spec)
    listing = _list_s3_objects(client, bucket, prefix, url=url, endpoint=endpoint)
    missing = [name for name in ADAPTER_FILES if name not in listing]
    if missing:
        raise ModelLoadError(f"{url} is not a PEFT LoRA adapter: {', '.join(missing)} missing")
    local_dir = _cache_root(spec) / "s3-adapters" / bucket / prefix.rstrip("/")
    _mirror(client, bucket, prefix, local_dir, {name: listing[name] for name in ADAPTER_FILES}, endpoint=endpoint)
    return local_dir
