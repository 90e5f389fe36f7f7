"""One SQLite file shared by any number of threads and processes (Ray replicas) on one node.

* WAL journal (readers never block the writer), ``busy_timeout`` so a contended writer waits
  instead of failing, ``synchronous=NORMAL`` (durable across process crashes; WAL keeps the file
  consistent across power loss).
* One connection per thread (``threading.local``), re-opened after ``fork`` (a connection is
  never used in two processes).
* :meth:`SqliteDatabase.transaction` is ``BEGIN IMMEDIATE``: it takes the database write lock up
  front, so a read-check-write sequence inside it is atomic across threads *and* processes.
* The schema is created (``CREATE ... IF NOT EXISTS``, in one transaction) by the first
  connection, so several owners (the job store, the usage ledger) can share one file, each with
  its own tables.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from serve.db import translate_errors

__all__ = ["SqliteDatabase", "sqlite_errors"]


def sqlite_errors(what: str = "job store") -> translate_errors:
    """Decorator / ``with`` block raising :class:`sqlite3.Error` as ``JobStoreError``."""
    return translate_errors(sqlite3.Error, what=what)


class SqliteDatabase:
    """``path`` with ``schema`` (``;``-separated statements) applied; ``name`` (e.g. "job store")
    is used in error messages. The first connection is opened (and the schema created) here."""

    def __init__(
        self, path: str | os.PathLike[str], *, schema: str, busy_timeout_s: float = 30.0, name: str = "database"
    ):
        self.path = str(path)
        self.name = name
        if self.path == ":memory:" or self.path.startswith("file:"):
            raise ValueError(f"the SQLite {name} needs a file path (every thread and process opens it)")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._schema = schema
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._schema_ready = False
        self.conn()  # the first connection creates the schema

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, and again in a forked child)."""
        if self._closed:
            raise RuntimeError(f"the {self.name} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        if not self._schema_ready:
            try:
                with self._transaction(conn):
                    for statement in filter(str.strip, self._schema.split(";")):
                        conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._schema_ready = True
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._all_lock:
            self._all.append((os.getpid(), conn))
        return conn

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on this thread's connection (see :meth:`_transaction`)."""
        return self._transaction(self.conn())

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error (a
        failed COMMIT included, so the thread's connection is never left inside a transaction)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def ping(self) -> bool:
        try:
            return self.conn().execute("SELECT 1").fetchone()[0] == 1
        except sqlite3.Error:
            return False

    def close(self) -> None:
        """Close every connection this process opened; :meth:`conn` raises afterwards."""
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        pid = os.getpid()
        for owner_pid, conn in conns:
            # A connection inherited through fork belongs to the parent: closing it here could
            # disturb the parent's locks and WAL, so it is left alone.
            if owner_pid == pid:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def __repr__(self) -> str:
        return f"SqliteDatabase(path={self.path!r}, name={self.name!r})"
