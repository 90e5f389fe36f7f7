"""Threads the tests share: an ASGI app served by uvicorn on a loopback port, and calls run at
the same moment."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def uvicorn_in_thread(app) -> Iterator[str]:
    """``app`` served on a free loopback port in a daemon thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", log_config=None, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def run_concurrently(calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each call in its own thread, released together by a barrier; their results by name."""
    results: dict[str, Any] = {}
    barrier = threading.Barrier(len(calls))

    def worker(name: str, call: Callable[[], Any]) -> None:
        barrier.wait()
        results[name] = call()

    threads = [threading.Thread(target=worker, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
