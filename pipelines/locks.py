"""A lock with a shared side (many holders at once) and an exclusive side (one holder, nobody
sharing): model forwards share, what rewrites a model's modules (a LoRA load, an export that
swaps in fake parameters while it traces) is exclusive."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class SharedExclusiveLock:
    """Many holders of the shared side or one of the exclusive side; a waiting exclusive holder
    blocks new shared ones, so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared, self._exclusive = 0, False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    @contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
