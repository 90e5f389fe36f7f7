"""The local-directory backend: objects are files under ``ROOT/PREFIX/``.

Writes are atomic (a temporary file in the same directory, then ``os.replace``) and every key is
resolved and checked to stay inside the backend's directory, symlinks included.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serve.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ObjectNotFound,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
)

logger = logging.getLogger(__name__)

__all__ = ["LocalStorage"]


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
    """Objects stored as files under ``root/prefix``. ``presigned_url`` is always ``None``."""

    def __init__(self, root: str | os.PathLike[str], prefix: str = "") -> None:
        self.root = Path(root).expanduser().absolute()
        self.prefix = _normalize_prefix(prefix)
        self.base = self.root / self.prefix if self.prefix else self.root

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
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"local storage: cannot read {key}: {exc.strerror or exc}") from exc

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
            raise StorageError(f"local storage: cannot write {key}: {exc.strerror or exc}") from exc
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
                raise StorageError(f"local storage: cannot read {key}: {exc.strerror or exc}") from exc

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
            raise StorageError(f"local storage: cannot delete {key}: {exc.strerror or exc}") from exc

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
            raise StorageError(f"local storage: cannot delete {prefix}/: {exc.strerror or exc}") from exc
        return deleted

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def size(self, key: str) -> int:
        path = self.local_path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"local storage: cannot stat {key}: {exc.strerror or exc}") from exc
        if not path.is_file():
            raise ObjectNotFound(key)
        return st.st_size

    def presigned_url(
        self, key: str, *, filename: str | None = None, content_type: str | None = None
    ) -> str | None:
        check_key(key)
        return None

    def ping(self) -> bool:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            return self.base.is_dir() and os.access(self.base, os.W_OK | os.X_OK)
        except OSError as exc:
            logger.warning("local storage %s is not usable: %s", self.base, exc.strerror or exc)
            return False
