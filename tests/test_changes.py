"""Change notices: a job changed in one process wakes a watcher in another, on both backends, in
milliseconds; the dispatchers' queue channel wakes on admission; stale listeners are cleaned up."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_redis import redis_server, unique_prefix  # noqa: F401  (fixture)

from serve.jobstore import QUEUE_CHANNEL, Job, JobStore, RedisJobStore, SqliteJobStore
from serve.jobstore.changes import SocketChanges

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "redis"])
def opened(request, tmp_path):
    """(store in this process, python source that opens the same store in another process)."""
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"
        store: JobStore = SqliteJobStore(path)
        source = f"from serve.jobstore import SqliteJobStore; store = SqliteJobStore({str(path)!r})"
    else:
        url, prefix = request.getfixturevalue("redis_server"), unique_prefix("changes")
        store = RedisJobStore(url, key_prefix=prefix)
        source = f"from serve.jobstore import RedisJobStore; store = RedisJobStore({url!r}, key_prefix={prefix!r})"
    yield store, source
    store.close()


def in_other_process(source: str, action: str) -> float:
    """Run ``action`` against the store in a fresh Python process; returns when it acted (epoch s)."""
    script = textwrap.dedent(f"""
        import time
        {source}
        {action}
        print(time.time())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_a_change_in_another_process_wakes_the_watcher(opened):
    store, source = opened
    job, _ = store.create(Job(tenant="acme"))

    async def scenario() -> tuple[bool, float]:
        with store.changes.watch(job.id) as watch:
            acted = asyncio.get_running_loop().run_in_executor(
                None, in_other_process, source, f"assert store.claim({job.id!r}, owner='w', lease_s=60)")
            woke = await watch.changed(timeout=30)
            return woke, time.time() - await acted

    woke, lag = asyncio.run(scenario())
    assert woke, "no notice arrived"
    assert lag < 1.0, f"the notice took {lag:.3f}s"  # milliseconds in practice; bounded for a busy machine
    assert store.get(job.id, tenant=None).status.value == "in_progress"


def test_admission_announces_the_queue(opened):
    store, source = opened

    async def scenario() -> bool:
        with store.changes.watch(QUEUE_CHANNEL) as queue:
            acted = asyncio.get_running_loop().run_in_executor(
                None, in_other_process, source, "from serve.jobstore import Job; store.create(Job(tenant='acme'))")
            woke = await queue.changed(timeout=30)
            await acted
            return woke

    assert asyncio.run(scenario())


def test_no_notice_means_the_watcher_times_out(opened):
    store, _ = opened
    job, _ = store.create(Job(tenant="acme"))

    async def scenario() -> bool:
        with store.changes.watch(job.id) as watch:
            return await watch.changed(timeout=0.2)

    assert asyncio.run(scenario()) is False


def test_a_dead_listener_socket_is_removed_by_the_next_publisher(tmp_path):
    changes = SocketChanges(tmp_path / "notices")
    stale = tmp_path / "notices" / f"{os.getpid()}-dead.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(stale))
    listener.close()  # its process is gone; the file stays
    changes.publish("vid_x")
    assert not stale.exists()
    changes.close()


def test_a_directory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "notices"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    changes = SocketChanges(shared)
    assert not changes.usable
    changes.publish("vid_x")  # a no-op, never an error
    changes.close()


def test_closing_a_store_ends_its_listener(tmp_path):
    import threading

    changes = SocketChanges(tmp_path / "notices")
    others = set(threading.enumerate())

    async def listen_once() -> None:
        with changes.watch("vid_x"):
            pass

    asyncio.run(listen_once())
    mine = {t for t in threading.enumerate() if t.name == "job-changes"} - others
    assert len(mine) == 1
    changes.close()
    for thread in mine:
        thread.join(timeout=5)
        assert not thread.is_alive()
