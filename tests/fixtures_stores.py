"""Job stores on both backends for the tests that run against each (a SQLite file, a real
redis-server): ``backend`` names one backing store per test, ``open_store()`` opens store objects
on it (several stand in for several replicas), closed when the test ends."""

from __future__ import annotations

import pytest
from fixtures_redis import redis_server, unique_prefix  # noqa: F401  (fixture)

from serve.jobstore import JobStore, RedisJobStore, SqliteJobStore


def open_job_store(backend: tuple[str, str, str], **kwargs) -> JobStore:
    """A store object on ``backend`` (``(kind, location, prefix)``; picklable, for child processes)."""
    kind, location, prefix = backend
    if kind == "sqlite":
        return SqliteJobStore(location, **kwargs)
    return RedisJobStore(location, key_prefix=prefix, **kwargs)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """``(kind, location, prefix)`` of one backing store per test."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "jobs.sqlite3"), ""
    return "redis", request.getfixturevalue("redis_server"), unique_prefix("store")


@pytest.fixture
def open_store(backend):
    opened: list[JobStore] = []

    def factory(**kwargs) -> JobStore:
        opened.append(open_job_store(backend, **kwargs))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()
