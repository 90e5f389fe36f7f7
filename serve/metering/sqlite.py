"""SQLite usage ledger: one node; shares the job store's file (its own ``usage_records`` table).

The same connection discipline as :class:`serve.jobstore.SqliteJobStore`: WAL, ``busy_timeout``,
one connection per thread (re-opened after ``fork``), every write a ``BEGIN IMMEDIATE``
transaction. A record is a row keyed by ``job_id``; the insert is ``ON CONFLICT (job_id) DO
NOTHING``, so recording a job twice (from any thread or process) stores it once. Summaries scan
the ``(tenant, finished_us, job_id)`` index in pages, so a large window never holds all of a
tenant's rows in memory at once.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from serve.jobstore.base import JobStoreError, translate_errors
from serve.jobstore.models import dt_to_us
from serve.metering.base import DEFAULT_USAGE_RETENTION_S, UsageLedger
from serve.metering.models import UsageRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_records (
    job_id        TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    finished_us   INTEGER NOT NULL,
    outcome       TEXT NOT NULL,
    charged       INTEGER NOT NULL,
    video_seconds REAL NOT NULL,
    data          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant_finished ON usage_records (tenant, finished_us, job_id);
CREATE INDEX IF NOT EXISTS usage_finished ON usage_records (finished_us)
"""

#: Rows fetched per page while scanning a window.
_PAGE = 1000

_translate = translate_errors(sqlite3.Error)


class SqliteUsageLedger(UsageLedger):
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_s: float = DEFAULT_USAGE_RETENTION_S,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] | None = None,
    ):
        kwargs = {"clock": clock} if clock is not None else {}
        super().__init__(retention_s=retention_s, **kwargs)
        self.path = str(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            raise ValueError("SqliteUsageLedger needs a file path (every thread and process opens it)")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._schema_ready = False
        _translate(self._conn)()  # the first connection creates the schema

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
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
        if not self._schema_ready:
            try:
                with self._transaction(conn):
                    for statement in filter(str.strip, _SCHEMA.split(";")):
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

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction(self._conn())

    # ------------------------------------------------------------------ writes

    @_translate
    def record(self, rec: UsageRecord) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO usage_records (job_id, tenant, finished_us, outcome, charged, video_seconds, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
                (rec.job_id, rec.tenant, dt_to_us(rec.finished_at), rec.outcome.value, int(rec.charged),
                 rec.video_seconds, rec.model_dump_json()),
            )
            return cursor.rowcount == 1

    @_translate
    def _purge_before(self, cutoff_us: int) -> int:
        with self._write() as conn:
            return conn.execute("DELETE FROM usage_records WHERE finished_us < ?", (cutoff_us,)).rowcount

    # ------------------------------------------------------------------ reads

    @_translate
    def get(self, job_id: str) -> UsageRecord | None:
        row = self._conn().execute("SELECT data FROM usage_records WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else UsageRecord.model_validate_json(row[0])

    def _scan(self, tenant: str, start_us: int, end_us: int, limit: int | None) -> Iterator[UsageRecord]:
        after: tuple[int, str] | None = None
        left = limit
        while left is None or left > 0:
            page = _PAGE if left is None else min(_PAGE, left)
            sql = "SELECT finished_us, job_id, data FROM usage_records WHERE tenant = ? AND finished_us < ?"
            args: list[object] = [tenant, end_us]
            if after is None:
                sql += " AND finished_us >= ?"
                args.append(start_us)
            else:
                sql += " AND (finished_us, job_id) > (?, ?)"
                args += list(after)
            sql += " ORDER BY finished_us, job_id LIMIT ?"
            args.append(page)
            try:
                rows = self._conn().execute(sql, args).fetchall()
            except sqlite3.Error as exc:  # a generator runs outside the @_translate wrapper
                raise JobStoreError(f"usage ledger unavailable ({type(exc).__name__}: {exc})") from exc
            for _, _, data in rows:
                yield UsageRecord.model_validate_json(data)
            if len(rows) < page:
                return
            after = (rows[-1][0], rows[-1][1])
            if left is not None:
                left -= len(rows)

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        try:
            return self._conn().execute("SELECT 1").fetchone()[0] == 1
        except sqlite3.Error:
            return False

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        pid = os.getpid()
        for owner_pid, conn in conns:
            # A connection inherited through fork belongs to the parent: leave it alone.
            if owner_pid == pid:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def __repr__(self) -> str:
        return f"SqliteUsageLedger(path={self.path!r})"
