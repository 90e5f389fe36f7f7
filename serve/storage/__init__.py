"""Object storage for clips and uploaded images: one interface, a local and an S3 backend.

``make_storage(config.storage)`` builds the configured backend. Build keys with :func:`job_key`
(``{tenant}/{job_id}/{name}``); the backend adds the configured prefix. No Ray imports here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ObjectNotFound,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
    job_key,
    job_prefix,
    validate_id,
    validate_name,
)
from serve.storage.local import LocalStorage
from serve.storage.s3 import S3Storage

if TYPE_CHECKING:
    from serve.config import StorageConfig

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "check_key",
    "check_prefix",
    "job_key",
    "job_prefix",
    "make_storage",
    "validate_id",
    "validate_name",
]


#: ``svd_storage_errors_total`` series exported at 0 by every process that opens storage, so alert
#: expressions on them (credentials, access_denied) have data before the first error.
ZERO_OPS = ("put", "get", "presign")


def make_storage(config: StorageConfig) -> Storage:
    """The backend that ``config`` (a ``serve.config.StorageConfig``) selects."""
    if config.backend == "local":
        storage: Storage = LocalStorage(config.local_dir, prefix=config.prefix,
                                        signing_key_env=config.url_signing_key_env)
    elif config.backend == "s3":
        storage = S3Storage(config)
    else:
        raise ValueError(f"unknown storage backend {config.backend!r}")
    from serve.telemetry import STORAGE_REASONS, zero_counters

    zero_counters("storage_errors", [{"backend": config.backend, "op": op, "reason": reason}
                                     for op in ZERO_OPS for reason in STORAGE_REASONS])
    return storage
