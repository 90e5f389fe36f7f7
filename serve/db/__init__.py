"""Plumbing shared by the durable backends (the job store and the usage ledger).

* :mod:`serve.db.sqlite`: :class:`~serve.db.sqlite.SqliteDatabase`, one SQLite file shared by
  threads and processes (per-thread connections, WAL, ``BEGIN IMMEDIATE`` transactions).
* :mod:`serve.db.redis`: :func:`~serve.db.redis.connect_redis` (the password only from
  ``REDIS_PASSWORD``), URL redaction and key naming.
* :class:`translate_errors`: backend errors raised as :class:`serve.jobstore.JobStoreError`.

Neither submodule is imported here: this package stays free of backend libraries until one is used.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

__all__ = ["translate_errors"]


class translate_errors(contextlib.ContextDecorator):  # noqa: N801  (used like contextlib.suppress)
    """Re-raise ``backend_errors`` as :class:`serve.jobstore.JobStoreError`, so callers (the API
    maps it to 503) need not know the backend. Works as a method decorator and as a ``with`` block
    (a generator runs outside its method's decorator, so it wraps its body in one). The message
    names ``what``, the error type and text only; redis-py and sqlite3 errors carry no credentials.
    """

    def __init__(self, *backend_errors: type[BaseException], what: str = "job store"):
        self.backend_errors = backend_errors
        self.what = what

    def __enter__(self) -> translate_errors:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is not None and isinstance(exc, self.backend_errors):
            # Imported here: serve.jobstore's backends import this package.
            from serve.jobstore.base import JobStoreError

            raise JobStoreError(f"{self.what} unavailable ({type(exc).__name__}: {exc})") from exc
        return False
