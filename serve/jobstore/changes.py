"""Change notices: who wants to know that a job changed learns it when it happens, not by polling.

The job store publishes ``job_id`` after every committed change of a job (the write itself stays
the truth; a notice only says "read again"). Waiters (the SSE stream of ``/v1/videos/{id}/events``)
hold a :class:`JobWatch` and wake on the job's next notice.

Two transports, one per store backend:

* :class:`RedisChanges`: Redis pub/sub on one channel; a listener thread per process.
* :class:`SocketChanges`: SQLite is one node, so notices are Unix datagrams between the processes
  of that node: each listening process binds a socket in a directory named after the database
  file, and a publisher sends one datagram to every socket there (a dead process's socket is
  removed by the first publisher that finds it refused).

A lost notice costs latency, never correctness: a waiter also wakes on its timeout and re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("ray.serve.svd_serve")

_MAX_NOTICE = 256
_STOP = b"\x00stop"  # sent by a closing store to its own listener (no job id starts with NUL)

#: The notice name that means "a job became queued" (the dispatchers watch it).
QUEUE_CHANNEL = "queue"


class JobWatch:
    """Notices of one job, collected from the moment the watch is opened (so none is missed
    between a read and the next wait)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def _notify(self) -> None:
        self._loop.call_soon_threadsafe(self._event.set)

    async def changed(self, timeout: float) -> bool:
        """Wait for a notice since the last call; False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self._event.clear()
        return True


class JobChanges:
    """Publish and watch job-change notices. Subclasses bring the transport."""

    def __init__(self) -> None:
        self._watches: dict[str, set[JobWatch]] = {}
        self._lock = threading.Lock()
        self._listening = False

    def publish(self, job_id: str) -> None:
        """Announce a committed change of ``job_id``. Never raises (a notice is a hint)."""
        try:
            self._send(job_id)
        except Exception:  # noqa: BLE001 - the change is committed; waiters fall back to timeouts
            logger.debug("could not publish a job change notice", exc_info=True)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[JobWatch]:
        """Collect notices of ``job_id`` while the block runs (call from a running event loop)."""
        watch = JobWatch(job_id)
        with self._lock:
            if not self._listening:
                self._listening = True
                try:
                    self._start_listener()
                except OSError:  # waiters still wake on their timeouts
                    logger.warning("job change notices unavailable in this process", exc_info=True)
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watches = self._watches.get(job_id)
                if watches is not None:
                    watches.discard(watch)
                    if not watches:
                        del self._watches[job_id]

    def _deliver(self, job_id: str) -> None:
        with self._lock:
            watches = list(self._watches.get(job_id, ()))
        for watch in watches:
            try:
                watch._notify()
            except RuntimeError:  # its event loop is closed: that waiter is gone
                pass

    def _send(self, job_id: str) -> None:
        raise NotImplementedError

    def _start_listener(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening (publishing still works)."""


class SocketChanges(JobChanges):
    """Notices between the processes of one node, over Unix datagram sockets in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The directory has a predictable name in a shared /tmp: use it only if it is ours alone.
        info = os.stat(self.directory)
        self.usable = info.st_uid == os.getuid() and not info.st_mode & 0o077
        if not self.usable:
            logger.warning("job change notices off: %s is not private to this user", self.directory)
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._out_lock = threading.Lock()
        self._in: socket.socket | None = None
        self._path: Path | None = None

    @classmethod
    def for_database(cls, db_path: str) -> "SocketChanges":
        # Socket paths are limited to ~107 bytes, so the directory is a short one named by a hash
        # of the database's absolute path: every process using that file finds the same one.
        digest = hashlib.sha256(os.path.abspath(db_path).encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / f"svd-serve-changes-{digest}")

    def _send(self, job_id: str) -> None:
        if not self.usable:
            return
        payload = job_id.encode()[:_MAX_NOTICE]
        try:
            peers = [entry.path for entry in os.scandir(self.directory) if entry.name.endswith(".sock")]
        except FileNotFoundError:
            return
        with self._out_lock:
            for peer in peers:
                try:
                    self._out.sendto(payload, peer)
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):
                        os.unlink(peer)  # its process is gone
                except (BlockingIOError, OSError):
                    pass  # a busy receiver drops this notice and wakes on its timeout

    def _start_listener(self) -> None:
        if not self.usable:
            return
        self._path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self._in = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._in.bind(str(self._path))
        threading.Thread(target=self._listen, args=(self._in,), name="job-changes", daemon=True).start()

    def _listen(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_MAX_NOTICE)
            except OSError:
                return  # closed
            if data == _STOP:
                return
            self._deliver(data.decode(errors="replace"))

    def close(self) -> None:
        if self._in is not None:
            with contextlib.suppress(OSError):
                self._out.sendto(_STOP, str(self._path))  # wakes the listener blocked in recv
            with contextlib.suppress(OSError):
                self._in.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        with contextlib.suppress(OSError):
            self._out.close()


class RedisChanges(JobChanges):
    """Notices over Redis pub/sub: every process of the cluster that watches subscribes once."""

    def __init__(self, client: Any, channel: str) -> None:
        super().__init__()
        self._client = client
        self.channel = channel
        self._stop = threading.Event()

    def _send(self, job_id: str) -> None:
        self._client.publish(self.channel, job_id)

    def _start_listener(self) -> None:
        threading.Thread(target=self._listen, name="job-changes", daemon=True).start()

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self._deliver(data.decode() if isinstance(data, bytes) else str(data))
            except Exception:  # noqa: BLE001 - Redis down: waiters fall back to their timeouts
                logger.debug("job change listener lost Redis; reconnecting", exc_info=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def close(self) -> None:
        self._stop.set()
