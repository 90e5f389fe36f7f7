"""Mirror an ``s3://bucket/prefix`` holding a save_pretrained layout into the local cache.

:func:`sync_s3` lists the prefix, downloads what is new or changed and deletes what is gone, under
a file lock so that the stages of one node starting together sync a prefix once. A manifest of
(key, size, ETag) per file, written after every download, makes a restart with an unchanged
bucket download nothing and an interrupted sync resume where it stopped; each file is written to
a temporary name and renamed into place. The boto3 client and the reading of botocore errors are
shared with the storage backend (:mod:`pipelines.s3client`); the wording of the
:class:`~pipelines.errors.ModelLoadError` messages is this module's, and never shows a key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipelines import s3client
from pipelines.errors import ModelLoadError
from pipelines.loader.layout import _component_filter
from pipelines.loader.spec import ModelSpec, _cache_root, _one_line

try:  # POSIX only; without it concurrent syncs of one prefix are still safe, just less efficient.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_MANIFEST_NAME = ".svd-serve-manifest.json"
_LOCK_NAME = ".svd-serve.lock"
_PART_SUFFIX = ".svd-part"
_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class S3SyncResult:
    """What :func:`sync_s3` did: the local mirror and which files it had to (re)download."""

    #: Local directory mirroring the prefix (a diffusers save_pretrained layout).
    local_dir: Path
    #: Paths (relative to ``local_dir``) fetched by this call, because they were new or had changed.
    downloaded: tuple[str, ...]
    #: Number of files whose cached copy matched the bucket's size and ETag and was kept.
    reused: int
    #: Paths deleted because their object no longer exists under the prefix.
    removed: tuple[str, ...]


def sync_s3(spec: ModelSpec, *, components: Sequence[str] | None = None) -> S3SyncResult:
    """Mirror ``spec.source`` (``s3://bucket/prefix``) into the cache and return what was fetched.

    Objects whose (size, ETag) match the manifest of the previous sync, and whose local file still
    has that size, are not downloaded again. Each download is written to a temporary name and
    renamed into place, so an interrupted sync never leaves a partial file that looks current.
    """
    bucket, prefix = _parse_s3_url(spec.source)
    url = f"s3://{bucket}/{prefix}"
    local_dir = _cache_root(spec) / "s3" / bucket / prefix.rstrip("/")

    client = _s3_client(spec)
    endpoint = _endpoint_label(spec)
    listing = _list_s3_objects(client, bucket, prefix, url=url, endpoint=endpoint)
    if not listing:
        raise ModelLoadError(f"No objects under {url}: check the bucket and prefix")
    if "model_index.json" not in listing:
        raise ModelLoadError(f"{url} has no model_index.json: it is not a diffusers save_pretrained layout")
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(f"Cannot create the cache directory {local_dir}: {_one_line(err)}") from err
    in_scope = _component_filter(components)
    wanted = {rel: obj for rel, obj in listing.items() if in_scope(rel)}

    downloaded: list[str] = []
    removed: list[str] = []
    reused = 0
    # One sync per prefix at a time: the stages of one node share the cache and start together.
    with _locked(local_dir / _LOCK_NAME):
        _remove_stale_parts(local_dir)
        manifest = _read_manifest(local_dir, bucket=bucket, prefix=prefix)
        for rel, obj in sorted(wanted.items()):
            target = local_dir / rel
            entry = manifest.get(rel)
            if entry == obj and target.is_file() and target.stat().st_size == obj["size"]:
                reused += 1
                continue
            _download_s3_object(client, bucket, obj, target, endpoint=endpoint)
            manifest[rel] = obj
            # Record progress after every file so an interrupted sync resumes where it stopped.
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)
            downloaded.append(rel)
        for rel in sorted(set(manifest) - set(listing)):
            if in_scope(rel):
                (local_dir / rel).unlink(missing_ok=True)
                del manifest[rel]
                removed.append(rel)
        if removed:
            _write_manifest(local_dir, bucket=bucket, prefix=prefix, objects=manifest)

    logger.info(
        "Synced %s into %s: %d downloaded, %d unchanged, %d removed",
        url,
        local_dir,
        len(downloaded),
        reused,
        len(removed),
    )
    return S3SyncResult(
        local_dir=local_dir, downloaded=tuple(downloaded), reused=reused, removed=tuple(removed)
    )


def _parse_s3_url(source: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b/"); the prefix always ends with '/' unless empty."""
    rest = source[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ModelLoadError(f"{source!r} is not a valid s3://bucket/prefix URL")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ModelLoadError(f"{source!r}: '.' and '..' are not allowed in the prefix")
    # The trailing slash keeps s3://b/models/svd from also matching models/svd-old/.
    return bucket, "".join(f"{p}/" for p in parts)


def _endpoint_label(spec: ModelSpec) -> str:
    raw = spec.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return "AWS S3"
    parts = urlsplit(raw)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no userinfo


def _s3_client(spec: ModelSpec):
    # Reads are large and few: fewer retries than the storage backend, a longer read timeout.
    return s3client.make_client(
        endpoint_url=spec.s3_endpoint_url,
        region=spec.s3_region,
        max_attempts=3,
        read_timeout=120,
        compatible_stores=False,
    )


# What each kind of failure (see pipelines.s3client.classify) says; never a key or a secret.
_S3_MESSAGES = {
    "no_credentials": (
        "No AWS credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
    ),
    "unreachable": "Cannot reach the S3 endpoint {endpoint} to {action} {url}",
    "invalid_request": "Invalid S3 request to {action} {url}: {detail}",
    "no_such_bucket": "S3 bucket {bucket!r} does not exist at {endpoint}",
    "bad_credentials": "S3 rejected the credentials ({code}) when trying to {action} {url}",
    "access_denied": "Access denied to {action} {url}: check the credentials and the bucket policy",
    "not_found": "An object disappeared while trying to {action} {url}; retry the load",
    "client_error": "S3 error {code} while trying to {action} {url}",
    "other": "S3 failure while trying to {action} {url} ({error_type})",
}


def _s3_error(err: Exception, *, action: str, url: str, endpoint: str, bucket: str) -> ModelLoadError:
    failure = s3client.classify(err)
    return ModelLoadError(
        _S3_MESSAGES[failure.kind].format(
            url=url,
            endpoint=endpoint,
            action=action,
            bucket=bucket,
            code=failure.code or failure.status,
            detail=_one_line(err),
            error_type=type(err).__name__,
        )
    )


def _list_s3_objects(client, bucket: str, prefix: str, *, url: str, endpoint: str) -> dict[str, dict]:
    objects: dict[str, dict] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # "folder" marker objects created by consoles
                parts = rel.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise ModelLoadError(
                        f"Object key {key!r} under {url} cannot be mirrored safely to a local path"
                    )
                if parts[-1] in (_MANIFEST_NAME, _LOCK_NAME) or parts[-1].endswith(_PART_SUFFIX):
                    continue  # our own bookkeeping, e.g. from a cache directory copied into the bucket
                objects[rel] = {
                    "key": key,
                    "size": int(obj["Size"]),
                    "etag": str(obj.get("ETag", "")).strip('"'),
                }
    except s3client.botocore_errors() as err:
        raise _s3_error(err, action="list", url=url, endpoint=endpoint, bucket=bucket) from err
    return objects


def _download_s3_object(client, bucket: str, obj: dict, target: Path, *, endpoint: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PART_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            client.download_file(bucket, obj["key"], str(tmp))
        except s3client.botocore_errors() as err:
            raise _s3_error(
                err, action="download", url=f"s3://{bucket}/{obj['key']}", endpoint=endpoint, bucket=bucket
            ) from err
        size = tmp.stat().st_size
        if size != obj["size"]:
            raise ModelLoadError(
                f"s3://{bucket}/{obj['key']} changed during download ({size} bytes, listed {obj['size']}); retry the load"
            )
        os.replace(tmp, target)  # atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Cache bookkeeping: manifest, lock, leftovers
# --------------------------------------------------------------------------------------------


def _remove_stale_parts(local_dir: Path) -> None:
    """Delete temporary files left by a sync that was killed mid-download."""
    for part in local_dir.rglob(f"*{_PART_SUFFIX}"):
        part.unlink(missing_ok=True)


def _read_manifest(local_dir: Path, *, bucket: str, prefix: str) -> dict[str, dict]:
    try:
        data = json.loads((local_dir / _MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}  # first sync, or an unreadable manifest: everything is fetched again
    if (
        not isinstance(data, dict)
        or data.get("version") != _MANIFEST_VERSION
        or data.get("bucket") != bucket
        or data.get("prefix") != prefix
    ):
        return {}
    objects = data.get("objects")
    return dict(objects) if isinstance(objects, dict) else {}


def _write_manifest(local_dir: Path, *, bucket: str, prefix: str, objects: dict[str, dict]) -> None:
    data = {"version": _MANIFEST_VERSION, "bucket": bucket, "prefix": prefix, "objects": objects}
    fd, tmp_name = tempfile.mkstemp(dir=local_dir, prefix=f"{_MANIFEST_NAME}.", suffix=_PART_SUFFIX)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp_name, local_dir / _MANIFEST_NAME)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
