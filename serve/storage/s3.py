"""The S3 backend (AWS S3 or any S3-compatible store: MinIO, Ceph RGW, R2, GCS interop, ...).

Credentials are never configured here: boto3 finds them in the standard AWS environment
variables, shared config, or the instance / workload identity (IRSA, EKS Pod Identity, ...).
Nothing this module logs or raises contains a credential or a presigned URL. The client recipe
and the reading of botocore errors are shared with the model weights mirror
(:mod:`pipelines.s3client`); the :class:`StorageError` wording is this module's.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pipelines import s3client
from serve.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ObjectNotFound,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
    count_storage_error,
)

if TYPE_CHECKING:
    from serve.config import StorageConfig

logger = logging.getLogger(__name__)

__all__ = ["S3Storage", "content_disposition"]

_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
# Defence in depth: access key ids never reach a message even if a store echoes one.
_ACCESS_KEY_RE = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")


#: ``svd_storage_errors_total``'s ``op`` of each S3 operation this backend calls.
METRIC_OPS = {"PutObject": "put", "GetObject": "get", "HeadObject": "exists", "DeleteObject": "delete",
              "DeleteObjects": "delete", "ListObjectsV2": "list", "presign GetObject": "presign"}
#: ... and its ``reason`` of each kind of S3 failure (the rest: other).
_METRIC_REASONS = {"bad_credentials": "credentials", "no_credentials": "credentials",
                   "access_denied": "access_denied", "not_found": "not_found"}


def failure_reason(failure: s3client.S3Failure) -> str:
    """credentials (ExpiredToken, InvalidAccessKeyId, SignatureDoesNotMatch, none found),
    access_denied (AccessDenied, a 403), not_found (NoSuchKey, a 404), or other (NoSuchBucket
    included: a configuration error, not a missing object)."""
    return _METRIC_REASONS.get(failure.kind, "other")


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    s = _ACCESS_KEY_RE.sub("<redacted>", s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename=`` fallback and an RFC 6266/5987 ``filename*=``."""
    cleaned = "".join(c for c in filename if unicodedata.category(c)[0] != "C")
    cleaned = cleaned.replace("/", "_").replace("\\", "_").strip() or "download"
    ascii_name = (
        unicodedata.normalize("NFKD", cleaned).encode("ascii", "ignore").decode("ascii").replace('"', "")
    ).strip() or "download"
    value = f'attachment; filename="{ascii_name}"'
    if ascii_name != cleaned:
        value += f"; filename*=UTF-8''{quote(cleaned, safe='')}"
    return value


class S3Storage(Storage):
    """Objects under ``s3://BUCKET/PREFIX/``. The boto3 client is created on first use."""

    def __init__(self, config: StorageConfig, *, client: Any = None) -> None:
        if not config.bucket:
            raise ValueError("S3Storage needs storage.bucket")
        self.config = config
        self.bucket: str = config.bucket
        prefix = (config.prefix or "").strip("/")
        self.prefix = check_key(prefix) if prefix else ""
        self._client = client
        self._lock = threading.Lock()
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.config.endpoint_url!r})"

    # A boto3 client does not pickle (Ray ships objects between processes): rebuild it there.
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    # ----------------------------------------------------------------------------- client
    @property
    def client(self) -> Any:
        """The boto3 S3 client (created lazily, shared by all threads: boto3 clients are thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        try:
            return s3client.make_client(
                endpoint_url=self.config.endpoint_url,
                region=self.config.region,
                max_attempts=5,
                read_timeout=60,
            )
        except Exception as exc:  # e.g. a malformed endpoint_url
            raise StorageError(f"S3: cannot create a client for bucket {self.bucket}: {_one_line(exc)}") from exc

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._full(key)}" if key is not None else f"s3://{self.bucket}"

    def _error(self, op: str, key: str | None, exc: Exception) -> StorageError:
        """The StorageError of a failed call (``op``: the S3 operation), counted."""
        failure = s3client.classify(exc)
        count_storage_error(backend="s3", op=METRIC_OPS.get(op, "get"), reason=failure_reason(failure))
        if failure.kind == "no_such_bucket":
            detail = "NoSuchBucket: the bucket does not exist"
        elif failure.answered:
            detail = f"{failure.code or failure.status or '?'}: {failure.message or 'no message'}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return StorageError(_one_line(f"S3 {op} failed for {self._where(key)}: {detail}", 500))

    def _call(self, op: str, key: str | None, fn: Any, /, *, reads: bool = False, missing_is_error: bool = True,
              **kwargs: Any) -> Any:
        """Run one client call; for a read (``reads``) of ``key`` not-found becomes ObjectNotFound
        (counted as an error unless the caller only asks whether it exists), every other failure a
        StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = s3client.classify(exc).code
            if reads and key is not None and code in s3client.NOT_FOUND_CODES:
                if code != "NoSuchKey":
                    # HEAD answers a bare 404 for a missing bucket too: tell them apart (once).
                    self._check_bucket(op, key)
                if missing_is_error:
                    count_storage_error(backend="s3", op=METRIC_OPS.get(op, "get"), reason="not_found")
                raise ObjectNotFound(key) from None
            raise self._error(op, key, exc) from exc
        except BotoCoreError as exc:
            raise self._error(op, key, exc) from exc

    def _check_bucket(self, op: str, key: str) -> None:
        if self._bucket_checked:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if s3client.classify(exc).code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"S3 {op} failed for {self._where(key)}: NoSuchBucket: the bucket does not exist"
                ) from None
            # 403 & co.: the bucket exists, this identity just may not HEAD it (prefix-scoped
            # policies); the key's 404 stands. Not cached, so a later call checks again.
            return
        except BotoCoreError as exc:
            raise self._error(op, key, exc) from exc
        self._bucket_checked = True

    def _head(self, key: str, op: str, *, missing_is_error: bool = True) -> dict[str, Any]:
        return self._call(op, key, self.client.head_object, reads=True, missing_is_error=missing_is_error,
                          Key=self._full(check_key(key)))

    # ----------------------------------------------------------------------------- objects
    def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        check_key(key)
        data = bytes(data)
        extra: dict[str, Any] = {}
        if self.config.server_side_encryption:
            extra["ServerSideEncryption"] = self.config.server_side_encryption
            if self.config.server_side_encryption == "aws:kms" and self.config.kms_key_id:
                extra["SSEKMSKeyId"] = self.config.kms_key_id
        self._call(
            "PutObject", key, self.client.put_object,
            Key=self._full(key), Body=data, ContentType=content_type, **extra,
        )
        return StoredObject(key=key, size=len(data), content_type=content_type)

    def _get_object(self, key: str) -> dict[str, Any]:
        return self._call("GetObject", key, self.client.get_object, reads=True, Key=self._full(check_key(key)))

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        body = self._get_object(key)["Body"]
        try:
            return body.read()
        except (BotoCoreError, OSError) as exc:
            raise self._error("GetObject", key, exc) from exc
        finally:
            body.close()

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        body = self._get_object(key)["Body"]  # eagerly: a missing object raises here

        def chunks() -> Iterator[bytes]:
            from botocore.exceptions import BotoCoreError

            try:
                yield from body.iter_chunks(chunk_size)
            except (BotoCoreError, OSError) as exc:
                raise self._error("GetObject", key, exc) from exc
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        # S3 answers 204 for a missing key as well.
        self._call("DeleteObject", key, self.client.delete_object, Key=self._full(check_key(key)))

    def delete_prefix(self, prefix: str) -> int:
        rel = check_prefix(prefix) + "/"
        folder = self._full(rel)
        from botocore.exceptions import BotoCoreError, ClientError

        deleted = 0
        batch: list[dict[str, str]] = []

        def flush() -> None:
            nonlocal deleted
            if not batch:
                return
            resp = self._call(
                "DeleteObjects", rel, self.client.delete_objects,
                Delete={"Objects": list(batch), "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                count_storage_error(backend="s3", op="delete",  # per-key errors: AccessDenied, InternalError
                                    reason="access_denied" if first.get("Code") == "AccessDenied" else "other")
                raise StorageError(_one_line(
                    f"S3 DeleteObjects failed for {len(errors)} of {len(batch)} objects under "
                    f"s3://{self.bucket}/{folder}: first s3://{self.bucket}/{first.get('Key')}: "
                    f"{first.get('Code')}: {first.get('Message')}", 500))
            deleted += len(batch)
            batch.clear()

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for obj in page.get("Contents") or []:
                    batch.append({"Key": obj["Key"]})
                    if len(batch) >= _DELETE_BATCH:
                        flush()
        except (ClientError, BotoCoreError) as exc:
            raise self._error("ListObjectsV2", rel, exc) from exc
        flush()
        return deleted

    def exists(self, key: str) -> bool:
        try:
            self._head(key, "HeadObject", missing_is_error=False)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key, "HeadObject")["ContentLength"])

    def presigned_url(
        self, key: str, *, filename: str | None = None, content_type: str | None = None
    ) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(check_key(key))}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        if content_type:
            params["ResponseContentType"] = content_type
        try:
            return self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=int(self.config.presign_expiry_s)
            )
        except Exception as exc:  # e.g. no credentials found
            raise self._error("presign GetObject", key, exc) from exc

    def ping(self) -> bool:
        try:
            # A one-key listing under our prefix rather than HeadBucket: works with policies
            # that grant s3:ListBucket only for this prefix.
            folder = f"{self.prefix}/" if self.prefix else ""
            self._call("ListObjectsV2", None, self.client.list_objects_v2, Prefix=folder, MaxKeys=1)
        except StorageError as exc:
            logger.warning("S3 storage is not reachable: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a readiness probe must not raise
            logger.warning("S3 storage is not reachable: %s", _one_line(f"{type(exc).__name__}: {exc}"))
            return False
        return True
