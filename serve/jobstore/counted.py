"""Job store failures, translated and counted: the decorator each backend wraps its methods in.

:class:`counted_errors` is :class:`serve.db.translate_errors` (a backend error is raised as
:class:`JobStoreError`) that also counts every call which fails with a job store error in
``svd_jobstore_errors_total{backend, op}``, ``op`` being the method's name (``_mutate``, the atomic
step every state transition runs in, is ``mutate``). A failure is counted once, by the innermost
wrapped method it leaves, however many wrapped methods it then passes through.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from serve.db import translate_errors
from serve.jobstore.base import JobStoreError

F = TypeVar("F", bound=Callable[..., Any])

#: Set on an error once counted, so the callers it passes through do not count it again.
_COUNTED = "_svd_counted"


class counted_errors(translate_errors):  # noqa: N801  (used like translate_errors)
    """``@counted_errors(sqlite3.Error, backend="sqlite")`` on a store method; as a ``with`` block
    (a generator's body) it counts under ``op`` (default ``other``)."""

    def __init__(self, *backend_errors: type[BaseException], backend: str, op: str = "other") -> None:
        super().__init__(*backend_errors, what="job store")
        self.backend, self.op = backend, op

    def __call__(self, func: F) -> F:
        errors = counted_errors(*self.backend_errors, backend=self.backend, op=func.__name__.lstrip("_"))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with errors:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, (*self.backend_errors, JobStoreError)):
            return False
        if not getattr(exc, _COUNTED, False):
            from serve.telemetry import count_jobstore_error

            count_jobstore_error(backend=self.backend, op=self.op)
        try:
            return super().__exit__(exc_type, exc, tb)  # raises the translated JobStoreError
        except JobStoreError as translated:
            setattr(translated, _COUNTED, True)
            raise
        finally:
            if isinstance(exc, JobStoreError):
                setattr(exc, _COUNTED, True)
