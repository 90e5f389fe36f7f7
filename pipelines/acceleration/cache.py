"""Compiled artifacts reused across replicas and restarts: torch's "mega-cache" (``jit`` engine)
or AOTInductor packages (``aot`` engine, see aot.py).

After a replica compiles its warm-up shapes, ``torch.compiler.save_cache_artifacts()`` gives one
portable blob holding Inductor's FX-graph cache, AOTAutograd's cache and the autotuning results;
``torch.compiler.load_cache_artifacts()`` in a fresh process pre-fills the local caches, so the
same compile finds every graph already built and only dynamo's trace remains. Under the ``aot``
engine the blob is an archive of compiled packages, loaded as they are. Blobs are kept in a
directory (a volume shared by replicas) or under ``s3://bucket/prefix``.

The key says what makes a blob usable: torch, CUDA and Triton versions, the GPU kind (name and
compute capability) or CPU, the network's class and config (its architecture: compiled graphs
take weights as inputs, so a fine-tune of the same architecture shares its base's blob), the
dtype, the acceleration options and the warm-up shapes. A blob made elsewhere under another key is
never loaded; a corrupt one is logged and ignored (the replica compiles as if it were absent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .options import StageAcceleration, WarmupShape

logger = logging.getLogger(__name__)

#: Bumped when what goes into a key changes.
KEY_VERSION = 2
SUFFIX = ".megacache"
#: The ``aot`` engine's blob: an archive of compiled packages (aot.pack).
AOT_SUFFIX = ".aoti"
SUFFIXES = (SUFFIX, AOT_SUFFIX)


def device_kind(device: torch.device) -> str:
    """``cuda:NVIDIA H200:sm90`` / ``cpu:x86_64``: what compiled kernels are specific to."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
    if device.type == "cpu":
        # CPU kernels are built for the host's vector instructions: one built for AVX-512 dies with
        # SIGILL on an AVX2 host, where no exception handler can skip it.
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            return f"cpu:{platform.machine()}:{pick_vec_isa() or 'scalar'}"
        except Exception:  # noqa: BLE001 - no compiler to probe with: the compile would fail anyway
            return f"cpu:{platform.machine()}:unprobed"
    return f"{device.type}:{platform.machine()}"


def network_signature(network: torch.nn.Module) -> str:
    """Class and config of a network: its architecture, not its weights."""
    config = getattr(network, "config", None)
    if config is None:  # a sub-module such as the VAE decoder: its structure stands in for a config
        described = repr(network)
    else:
        described = json.dumps(dict(config), sort_keys=True, default=str)
    return f"{type(network).__module__}.{type(network).__qualname__}:" + hashlib.sha256(described.encode()).hexdigest()[:16]


def network_variant(network: torch.nn.Module) -> list[str]:
    """Run-time settings inside the network that compiled code bakes in or is called under: the
    low-VRAM feed-forward chunking and guidance-batch split, which an ahead-of-time package cannot
    see change (dynamo's guards would)."""
    from .lowvram import SPLIT_MARK

    settings = {(getattr(m, "_chunk_size", None), getattr(m, "_chunk_dim", None)) for m in network.modules()
                if getattr(m, "_chunk_size", None) is not None}
    variant = sorted(f"chunk {size} dim {dim}" for size, dim in settings)
    return variant + (["split guidance batch"] if SPLIT_MARK in vars(network) else [])


def cache_key(*, stage: str, network: torch.nn.Module, options: StageAcceleration,
              shapes: Sequence[WarmupShape]) -> dict[str, Any]:
    parameter = next(network.parameters())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "version": KEY_VERSION,
        "stage": stage,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": device_kind(parameter.device),
        "network": network_signature(network),
        "variant": network_variant(network),
        "dtype": str(parameter.dtype),
        "options": options.model_dump(mode="json", exclude={"cache_dir", "warmup"}),
        "shapes": sorted(shape.label() for shape in shapes),
    }


def key_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{key['stage']}-{digest}"


class CompileCache:
    """A directory or ``s3://bucket/prefix`` of mega-cache blobs, each with a JSON of its key."""

    def __init__(self, location: str, *, s3_client: Any = None) -> None:
        self.location = location
        self._s3 = s3_client
        if location.startswith("s3://"):
            bucket, _, prefix = location[len("s3://"):].partition("/")
            if not bucket:
                raise ValueError(f"{location!r} is not a valid s3://bucket/prefix")
            self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        else:
            self.bucket = None
            self.directory = Path(location).expanduser()

    def load(self, key: dict[str, Any]) -> bool:
        """Pre-fill torch's local caches from the blob for ``key``; False when there is none (or it
        cannot be used)."""
        name = key_name(key)
        data = self.read_blob(key, suffix=SUFFIX)
        if data is None:
            return False
        try:
            loaded = torch.compiler.load_cache_artifacts(data)  # None when the blob does not deserialise
        except Exception as err:  # a blob from a broken write must never stop a replica
            loaded, reason = None, str(err)
        else:
            reason = "it does not deserialise"
        if loaded is None:
            logger.warning("compile cache %s in %s is unusable (%s); compiling from scratch", name, self.location, reason)
            return False
        logger.info("compile cache hit: %s (%d bytes) from %s", name, len(data), self.location)
        return True

    def save(self, key: dict[str, Any]) -> int:
        """Store what this process has compiled so far under ``key``; returns the blob's size."""
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            logger.info("compile cache: nothing compiled to save for %s", key_name(key))
            return 0
        data, _info = artifacts
        return self.write_blob(key, data, suffix=SUFFIX)

    def read_blob(self, key: dict[str, Any], *, suffix: str) -> bytes | None:
        """The raw blob stored under ``key`` with ``suffix``; None when there is none."""
        try:
            return self._read(key_name(key) + suffix)
        except FileNotFoundError:
            return None

    def write_blob(self, key: dict[str, Any], data: bytes, *, suffix: str) -> int:
        """Store ``data`` under ``key`` with ``suffix`` (and the key beside it); returns its size."""
        name = key_name(key)
        self._write(name + ".json", json.dumps(key, indent=2, sort_keys=True).encode())
        self._write(name + suffix, data)  # last: a reader never finds a blob without its key file
        logger.info("compile cache saved: %s%s (%d bytes) to %s", name, suffix, len(data), self.location)
        return len(data)

    def entries(self) -> list[str]:
        """Names of the blobs held (for the warm-cache command's report)."""
        if self.bucket is None:
            if not self.directory.is_dir():
                return []
            names = [p.name for p in self.directory.iterdir()]
        else:
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            names = [obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", [])]
        return sorted(name.rsplit(".", 1)[0] for name in names
                      if name.endswith(SUFFIXES) and not name.startswith("."))

    # -- storage ------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._s3 is None:
            from pipelines import s3client

            self._s3 = s3client.make_client(endpoint_url=None, region=None, max_attempts=3, read_timeout=120,
                                            compatible_stores=bool(os.environ.get("AWS_ENDPOINT_URL_S3")
                                                                   or os.environ.get("AWS_ENDPOINT_URL")))
        return self._s3

    def _read(self, name: str) -> bytes:
        if self.bucket is None:
            return (self.directory / name).read_bytes()
        client = self._client()
        try:
            return client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(name) from None

    def _write(self, name: str, data: bytes) -> None:
        if self.bucket is not None:
            self._client().put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Atomic: replicas starting at the same moment read a whole blob or none.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
