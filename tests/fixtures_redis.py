"""A real ``redis-server`` for tests: started on a free 127.0.0.1 port, no persistence, in a tmp dir.

Code under test talks to it over TCP with redis-py, exactly as it would talk to a production
Redis; nothing is faked. Import ``redis_server`` into a test module or ``conftest.py``; tests
should use their own key prefix (``unique_prefix()``) rather than flushing the shared server.

Without a ``redis-server`` binary the fixture skips (install it with
``scripts/install-system-deps.sh``), except in CI (``CI`` set to true/1/yes), where a missing
server is a failure: CI must not silently skip the Redis backend.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = "redis-server"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def unique_prefix(name: str = "test") -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_redis_server() -> str:
    """Path of ``redis-server``; skips the test (fails it in CI) when it is not installed."""
    path = shutil.which(REDIS_SERVER)
    if path is None:
        message = (
            "redis-server is not installed: the Redis job-store tests need a real server. "
            "Install it with scripts/install-system-deps.sh (Debian package redis-server)."
        )
        if in_ci():
            pytest.fail(message + " CI is set, so this is an error rather than a skip.", pytrace=False)
        pytest.skip(message)
    return path


@contextlib.contextmanager
def start_redis_server(workdir: Path, *, password: str | None = None, timeout_s: float = 10.0) -> Iterator[str]:
    """Run a private redis-server in ``workdir``; yields its URL (without the password)."""
    binary = require_redis_server()
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(3):  # a free port can be taken by someone else before the server binds it
        port = _free_port()
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(workdir / f"redis-{port}.log"),
        ]  # fmt: skip
        if password is not None:
            args += ["--requirepass", password]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(proc, port, password, timeout_s)
        except Exception as exc:  # noqa: BLE001 - retried on another port, re-raised below
            last_error = exc
            _stop(proc)
            continue
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"could not start redis-server: {last_error}")


def _wait_ready(proc: subprocess.Popen, port: int, password: str | None, timeout_s: float) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {stderr.strip()}")
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
        try:
            if client.ping():
                return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            client.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """URL (``redis://127.0.0.1:PORT/0``) of a redis-server shared by the whole session."""
    with start_redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
