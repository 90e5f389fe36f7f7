"""The storage interface shared by every backend, its errors, and the tenant-scoped key helpers.

Keys are logical, slash-separated paths such as ``acme/0b5c.../clip.mp4``; each backend puts them
under its configured prefix (``PREFIX/TENANT/JOB/NAME``). Build them with :func:`job_key` so a
tenant id or a file name from a request can never name another tenant's objects. This module
imports neither Ray nor boto3.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SIGNED_URL_PATH",
    "ObjectNotFound",
    "SignedURLError",
    "Storage",
    "StorageError",
    "StoredObject",
    "check_key",
    "check_prefix",
    "count_storage_error",
    "job_key",
    "job_prefix",
    "os_error_reason",
    "validate_id",
    "validate_name",
]

DEFAULT_CHUNK_SIZE = 1 << 20

#: The service's public route that serves a signed URL of a backend with no presigned URLs of its
#: own (local): ``GET {base_url}/files/{key}?expires=...&signature=...``, no API key.
SIGNED_URL_PATH = "/files"

#: Tenant and job ids: a letter or digit, then up to 127 letters, digits, ``_``, ``.`` or ``-``.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME_LEN = 255
_MAX_KEY_BYTES = 1024  # S3's own limit on a key's UTF-8 length


class StorageError(Exception):
    """A storage operation failed (unreachable store, missing bucket, access denied, ...).

    The message is one line that names the bucket/key concerned and never any credential.
    """


class ObjectNotFound(StorageError, LookupError):
    """The object does not exist. ``key`` is the logical key that was asked for."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key


class SignedURLError(Exception):
    """A signed URL that does not verify: ``reason`` is ``invalid`` (wrong or missing signature,
    or another backend's URL) or ``expired`` (a valid signature past its expiry)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class StoredObject:
    """What :meth:`Storage.put` stored: the logical key, its size in bytes and its content type."""

    key: str
    size: int
    content_type: str


# --------------------------------------------------------------------------------------- keys
def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid tenant or job id, else raise ``ValueError``."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: must match {ID_RE.pattern}")
    return value


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe single path component (an object's file name), else raise."""
    if not isinstance(name, str) or not name:
        raise ValueError("invalid object name: empty")
    if name in (".", ".."):
        raise ValueError(f"invalid object name {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError(f"invalid object name {name!r}: no path separators allowed")
    if _CONTROL_RE.search(name):
        raise ValueError(f"invalid object name {name!r}: control characters")
    if len(name) > _MAX_NAME_LEN:
        raise ValueError(f"invalid object name: longer than {_MAX_NAME_LEN} characters")
    return name


def job_key(tenant: str, job_id: str, name: str) -> str:
    """``{tenant}/{job_id}/{name}`` after validating each part (``ValueError`` otherwise)."""
    return f"{validate_id(tenant, 'tenant id')}/{validate_id(job_id, 'job id')}/{validate_name(name)}"


def job_prefix(tenant: str, job_id: str) -> str:
    """``{tenant}/{job_id}``: the prefix to pass to :meth:`Storage.delete_prefix` for one job."""
    return f"{validate_id(tenant, 'tenant id')}/{validate_id(job_id, 'job id')}"


def check_key(key: str) -> str:
    """Validate a logical key: non-empty ``/``-separated segments, none ``.``/``..``, no control
    characters or backslashes, at most 1024 UTF-8 bytes. Returns it; raises ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError("invalid storage key: empty")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise ValueError(f"invalid storage key: longer than {_MAX_KEY_BYTES} bytes")
    if _CONTROL_RE.search(key) or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: control characters or backslash")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a prefix for :meth:`Storage.delete_prefix`; one trailing ``/`` is dropped."""
    if isinstance(prefix, str) and prefix.endswith("/"):
        prefix = prefix[:-1]
    return check_key(prefix)


# ------------------------------------------------------------------------------- metrics
def count_storage_error(*, backend: str, op: str, reason: str) -> None:
    """Count one failed storage call in ``svd_storage_errors_total{backend, op, reason}`` (``op``:
    put, get, presign, delete, exists, list; ``reason``: credentials, access_denied, not_found,
    other). Nothing happens outside a Ray worker."""
    from serve.telemetry import count_storage_error as count

    count(backend=backend, op=op, reason=reason)


def os_error_reason(exc: OSError) -> str:
    """``svd_storage_errors_total``'s reason of a failed file operation."""
    if isinstance(exc, PermissionError):
        return "access_denied"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "not_found"
    return "other"


# ---------------------------------------------------------------------------------- interface
class Storage(ABC):
    """Object storage for clips and uploaded conditioning images. Implementations are thread-safe.

    Every method takes logical keys (see :func:`job_key`) and raises ``ValueError`` for a malformed
    key, :class:`ObjectNotFound` for a missing object and :class:`StorageError` for anything else.
    """

    @abstractmethod
    def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        """Store ``data`` under ``key``, replacing any existing object (atomically: readers see
        the old or the new object, never a partial one)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The object in chunks of at most ``chunk_size`` bytes, for streaming HTTP responses.

        The object is opened when this is called, so a missing object raises
        :class:`ObjectNotFound` here, before a response has started; close the iterator
        (or exhaust it) to release the file / connection.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` and return how many were deleted.

        The prefix is a folder: ``acme/job1`` deletes ``acme/job1/...`` but not ``acme/job10/...``.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes."""

    @abstractmethod
    def presigned_url(
        self, key: str, *, filename: str | None = None, content_type: str | None = None
    ) -> str | None:
        """A time-limited URL from which a client can GET the object directly, or ``None`` when
        the backend has none (local): the caller then serves the bytes itself.

        ``filename`` adds a ``Content-Disposition: attachment`` with that file name;
        ``content_type`` overrides the response's ``Content-Type``. Whether the object exists
        is not checked.
        """

    def signed_url(self, key: str, *, base_url: str, expires_s: int, filename: str | None = None,
                   content_type: str | None = None) -> str:
        """A URL from which anyone holding it can GET the object, without an API key, until it
        expires (a client's drop-in download link).

        This default returns the backend's :meth:`presigned_url` (S3: signed by the store itself,
        valid for the backend's configured ``presign_expiry_s``). A backend with none (local)
        overrides it with a URL of this service's :data:`SIGNED_URL_PATH` route under
        ``base_url``, signed for ``expires_s`` seconds and checked by :meth:`verify_signed_url`.
        """
        url = self.presigned_url(key, filename=filename, content_type=content_type)
        if url is None:
            raise StorageError(f"{type(self).__name__} has no presigned URLs and signs none of its own")
        return url

    def verify_signed_url(self, key: str, *, expires: int, signature: str, filename: str | None = None,
                          content_type: str | None = None, now: float | None = None) -> None:
        """Return if ``signature`` is this backend's signature of the other arguments, made by
        :meth:`signed_url`, and ``expires`` (epoch seconds) has not passed; raise
        :class:`SignedURLError` otherwise. A backend whose signed URLs point at the store itself
        (S3) signed none of the service's file URLs: every one is invalid."""
        raise SignedURLError("invalid", "this storage backend serves its signed URLs itself")

    @abstractmethod
    def ping(self) -> bool:
        """Whether the store is reachable and usable (for readiness checks); never raises."""
