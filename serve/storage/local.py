"""The local-directory backend: objects are files under ``ROOT/PREFIX/``.

Writes are atomic (a temporary file in the same directory, then ``os.replace``) and every key is
resolved and checked to stay inside the backend's directory, symlinks included.

Signed URLs: a directory has no presigned URLs, so :meth:`LocalStorage.signed_url` signs a URL of
the service's own public file route (``/files/{key}?expires=...&signature=...``) with HMAC-SHA256.
The key comes from the environment variable ``signing_key_env`` (config
``storage.url_signing_key_env``); without it, from a key file created once, mode 0600, in the
storage root (outside the object prefix). Every process that uses the same directory (several
ingress replicas of one node, or of several nodes sharing the volume) reads the same file, so each
verifies the others' URLs; a per-process random key could not. Deleting the file (and restarting)
rotates the key and invalidates every URL signed so far. The key is never logged.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

from serve.storage.base import (
    DEFAULT_CHUNK_SIZE,
    SIGNED_URL_PATH,
    ObjectNotFound,
    SignedURLError,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
    count_storage_error,
    os_error_reason,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIGNING_KEY_ENV", "SIGNING_KEY_FILE", "LocalStorage"]

#: The environment variable the URL signing key is read from unless configured otherwise.
DEFAULT_SIGNING_KEY_ENV = "SVD_SERVE_URL_SIGNING_KEY"
#: The generated key's file in the storage root (used when that variable is not set).
SIGNING_KEY_FILE = ".url-signing-key"
MIN_SIGNING_KEY_BYTES = 32
_SIGNATURE_VERSION = "svd-serve-file-url/v1"
_KEY_LOCK = threading.Lock()


def _normalize_prefix(prefix: str) -> str:
    prefix = (prefix or "").strip("/")
    return check_key(prefix) if prefix else ""


def _rmdir_quiet(path: str | Path) -> None:
    """Remove an empty directory; one already gone, or refilled by a concurrent put, is left."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


class LocalStorage(Storage):
    """Objects stored as files under ``root/prefix``. ``presigned_url`` is always ``None`` (the API
    streams the bytes); :meth:`signed_url` signs URLs of the service's public file route."""

    def __init__(self, root: str | os.PathLike[str], prefix: str = "", *,
                 signing_key_env: str = DEFAULT_SIGNING_KEY_ENV) -> None:
        self.root = Path(root).expanduser().absolute()
        self.prefix = _normalize_prefix(prefix)
        self.base = self.root / self.prefix if self.prefix else self.root
        self.signing_key_env = signing_key_env
        self.signing_key_file = self.root / SIGNING_KEY_FILE
        self._signing_key: bytes | None = None  # read on first use: most processes never sign

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_signing_key": None}  # the key never travels in a pickle

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------------------ paths
    def _resolve(self, rel: str) -> Path:
        base = self.base.resolve()
        path = (base / rel).resolve()
        if path == base or not path.is_relative_to(base):
            raise ValueError(f"storage key {rel!r} resolves outside the storage root")
        return path

    def local_path(self, key: str) -> Path:
        """The file that holds ``key`` (which need not exist); ``ValueError`` if the key is
        malformed or would resolve outside the root."""
        return self._resolve(check_key(key))

    def _open(self, key: str):
        path = self.local_path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _missing("get", key) from None
        except OSError as exc:
            raise _failed("get", f"cannot read {key}", exc) from exc

    # ----------------------------------------------------------------------------- objects
    def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        path = self.local_path(key)
        data = bytes(data)
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            raise _failed("put", f"cannot write {key}", exc) from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return StoredObject(key=key, size=len(data), content_type=content_type)

    def get(self, key: str) -> bytes:
        with self._open(key) as fh:
            try:
                return fh.read()
            except OSError as exc:
                raise _failed("get", f"cannot read {key}", exc) from exc

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        fh = self._open(key)  # eagerly: a missing object raises here, not on first next()

        def chunks() -> Iterator[bytes]:
            with fh:
                while True:
                    block = fh.read(chunk_size)
                    if not block:
                        return
                    yield block

        return chunks()

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            pass  # a "folder", not an object
        except OSError as exc:
            raise _failed("delete", f"cannot delete {key}", exc) from exc

    def delete_prefix(self, prefix: str) -> int:
        top = self._resolve(check_prefix(prefix))
        if not top.is_dir():
            return 0
        deleted = 0
        try:
            # Bottom-up; symlinks are unlinked, never followed, so nothing outside the root goes.
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        deleted += 1
                    except FileNotFoundError:
                        pass
                for name in dirnames:
                    sub = os.path.join(dirpath, name)
                    if os.path.islink(sub):
                        os.unlink(sub)
                    else:
                        _rmdir_quiet(sub)
            _rmdir_quiet(top)
        except OSError as exc:
            raise _failed("delete", f"cannot delete {prefix}/", exc) from exc
        return deleted

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def size(self, key: str) -> int:
        path = self.local_path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise _missing("exists", key) from None
        except OSError as exc:
            raise _failed("exists", f"cannot stat {key}", exc) from exc
        if not path.is_file():
            raise _missing("exists", key)
        return st.st_size

    def presigned_url(
        self, key: str, *, filename: str | None = None, content_type: str | None = None
    ) -> str | None:
        check_key(key)
        return None

    # ---------------------------------------------------------------------------- signed URLs
    def signed_url(self, key: str, *, base_url: str, expires_s: int, filename: str | None = None,
                   content_type: str | None = None, now: float | None = None) -> str:
        check_key(key)
        if expires_s <= 0:
            raise ValueError("expires_s must be positive")
        expires = int(now if now is not None else time.time()) + int(expires_s)
        query: dict[str, str | int] = {"expires": expires}
        if filename:
            query["filename"] = filename
        if content_type:
            query["content_type"] = content_type
        query["signature"] = self._signature(key, expires, filename, content_type)
        return f"{base_url.rstrip('/')}{SIGNED_URL_PATH}/{quote(key, safe='/')}?{urlencode(query)}"

    def verify_signed_url(self, key: str, *, expires: int, signature: str, filename: str | None = None,
                          content_type: str | None = None, now: float | None = None) -> None:
        check_key(key)
        expected = self._signature(key, expires, filename or None, content_type or None)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise SignedURLError("invalid", "the URL's signature does not match")
        if (now if now is not None else time.time()) >= expires:
            raise SignedURLError("expired", "the URL has expired")

    def _signature(self, key: str, expires: int, filename: str | None, content_type: str | None) -> str:
        # JSON, not joined text: no choice of file name can make two different URLs sign alike.
        message = json.dumps([_SIGNATURE_VERSION, key, int(expires), filename, content_type], separators=(",", ":"))
        digest = hmac.new(self._key(), message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _key(self) -> bytes:
        with _KEY_LOCK:
            if self._signing_key is None:
                self._signing_key = self._load_key()
            return self._signing_key

    def _load_key(self) -> bytes:
        value = os.environ.get(self.signing_key_env)
        if value:
            return _checked_key(value.encode(), f"the environment variable {self.signing_key_env}")
        path = self.signing_key_file
        try:
            if not path.exists():
                _create_key_file(path)
            mode = path.stat().st_mode
            if mode & 0o077:
                logger.warning("the URL signing key file %s is readable by other users (mode %o); chmod 600 it",
                               path, mode & 0o777)
            return _checked_key(path.read_bytes().strip(), f"the key file {path}")
        except OSError as exc:
            raise _failed("presign", f"cannot read or create the URL signing key file {path}", exc) from exc

    def ping(self) -> bool:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            return self.base.is_dir() and os.access(self.base, os.W_OK | os.X_OK)
        except OSError as exc:
            logger.warning("local storage %s is not usable: %s", self.base, exc.strerror or exc)
            return False


def _failed(op: str, what: str, exc: OSError) -> StorageError:
    """The StorageError of a failed file operation (``what``: "cannot write KEY"), counted."""
    count_storage_error(backend="local", op=op, reason=os_error_reason(exc))
    return StorageError(f"local storage: {what}: {exc.strerror or exc}")


def _missing(op: str, key: str) -> ObjectNotFound:
    count_storage_error(backend="local", op=op, reason="not_found")
    return ObjectNotFound(key)


def _checked_key(key: bytes, where: str) -> bytes:
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise StorageError(f"the URL signing key in {where} is shorter than {MIN_SIGNING_KEY_BYTES} bytes")
    return key


def _create_key_file(path: Path) -> None:
    """A fresh random key at ``path`` (mode 0600), published whole with a hard link so that of
    several processes starting at once one wins and every one reads that one's complete key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        os.unlink(tmp)
