"""SQLite usage ledger: one node; shares the job store's file (its own ``usage_records`` table).

The same connection discipline as :class:`serve.jobstore.SqliteJobStore`, from
:class:`serve.db.sqlite.SqliteDatabase`: WAL, ``busy_timeout``, one connection per thread
(re-opened after ``fork``), every write a ``BEGIN IMMEDIATE`` transaction. A record is a row keyed
by ``job_id``; the insert is ``ON CONFLICT (job_id) DO NOTHING``, so recording a job twice (from
any thread or process) stores it once. Summaries scan the ``(tenant, finished_us, job_id)`` index
in pages, so a large window never holds all of a tenant's rows in memory at once.

The whole record is the ``data`` column (its JSON), so a field added to :class:`UsageRecord` (such
as ``model``) needs no schema change: rows written before it read back with the field's default.
The ``model`` filter is applied to the streamed pages (see :mod:`serve.metering.base`); there is
no model column or index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from serve.db.sqlite import SqliteDatabase, sqlite_errors
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

_translate = sqlite_errors()


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
        with _translate:  # the first connection creates the schema
            self._db = SqliteDatabase(path, schema=_SCHEMA, busy_timeout_s=busy_timeout_s, name="usage ledger")
        self.path = self._db.path

    # ------------------------------------------------------------------ writes

    @_translate
    def record(self, rec: UsageRecord) -> bool:
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO usage_records (job_id, tenant, finished_us, outcome, charged, video_seconds, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
                (rec.job_id, rec.tenant, dt_to_us(rec.finished_at), rec.outcome.value, int(rec.charged),
                 rec.video_seconds, rec.model_dump_json()),
            )
            return cursor.rowcount == 1

    @_translate
    def _purge_before(self, cutoff_us: int) -> int:
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM usage_records WHERE finished_us < ?", (cutoff_us,)).rowcount

    # ------------------------------------------------------------------ reads

    @_translate
    def get(self, job_id: str) -> UsageRecord | None:
        row = self._db.conn().execute("SELECT data FROM usage_records WHERE job_id = ?", (job_id,)).fetchone()
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
            with sqlite_errors("usage ledger"):  # a generator runs outside the @_translate wrapper
                rows = self._db.conn().execute(sql, args).fetchall()
            for _, _, data in rows:
                yield UsageRecord.model_validate_json(data)
            if len(rows) < page:
                return
            after = (rows[-1][0], rows[-1][1])
            if left is not None:
                left -= len(rows)

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        return self._db.ping()

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"SqliteUsageLedger(path={self.path!r})"
