"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the same calls, the same results and errors.

Both only perform the I/O their shared protocols ask for (:mod:`serve.client._core`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import httpx

from ._core import BaseClient, Emit, ImageInput, Protocol, Run, T, returning
from .models import Video, VideoDeleted, VideoEvent, VideoList


class Client(BaseClient):
    """A blocking client of the svd-serve API::

        with Client("http://localhost:8000", api_key="sk-...") as client:
            video = client.submit(image="cat.png", num_frames=14, seed=7)
            video = client.wait(video.id, on_update=lambda v: print(v.status, v.percent))
            if video.status == "completed":
                client.download(video.id, "cat.mp4")

    Errors are :class:`serve.client.ClientError` subclasses (see :mod:`serve.client.errors`).
    """

    _http_class = httpx.Client

    def submit(self, image: ImageInput | None = None, *, image_url: str | None = None,
               idempotency_key: str | None = None, webhook_url: str | None = None,
               webhook_events: Iterable[str] | None = None, **params: Any) -> Video:
        """Submit a job: ``image`` (a file path, its bytes or a binary file) is uploaded as multipart,
        ``image_url`` (http(s) or a data: URL) is sent as JSON; ``params`` are generation parameters
        (``num_frames=14, seed=7, ...``). An ``Idempotency-Key`` (a fresh UUID unless given) goes
        with the submit and each of its retries, so a retried submit never makes two jobs."""
        return self._run(self._submit(image, image_url, idempotency_key, webhook_url, webhook_events, params))

    def get(self, video_id: str) -> Video:
        """The job as it is now."""
        return self._run(self._get(video_id))

    def list(self, *, limit: int | None = None, after: str | None = None, order: str | None = None,
             status: str | None = None) -> VideoList:
        """One page of jobs (newest first unless ``order="asc"``); the next page: ``after=page.last_id``."""
        return self._run(self._list(limit, after, order, status))

    def cancel(self, video_id: str) -> Video:
        """Cancel a job: a queued one never starts, a running one stops within one sampling step."""
        return self._run(self._cancel(video_id))

    def delete(self, video_id: str) -> VideoDeleted:
        """Delete a finished job and its files."""
        return self._run(self._delete(video_id))

    def events(self, video_id: str) -> Iterator[VideoEvent]:
        """The job's server-sent events (``status``, ``progress``) until it ends; raises
        :class:`StreamInterruptedError` if the stream ends first."""
        return self._iterate(self._events(video_id))

    def wait(self, video_id: str, *, timeout: float | None = None, poll_interval: float | None = None,
             on_update: Callable[[Video], Any] | None = None) -> Video:
        """Follow the job until it completes, fails or is cancelled, and return it. Follows the
        event stream, and polls if the stream drops. ``on_update`` is called with each new state;
        past ``timeout`` seconds, :class:`WaitTimeoutError`."""
        return self._run(self._wait(video_id, timeout, poll_interval, on_update))

    def download(self, video_id: str, path: str | os.PathLike, *, variant: str = "video") -> Path:
        """Stream the clip (or ``variant="thumbnail"``) to ``path`` (a file, or a folder to put the
        server's file name in), following redirects to presigned storage URLs; returns the file."""
        return self._run(self._download(video_id, path, variant))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, protocol: Protocol[T]) -> T:
        result = None
        for result in self._iterate(returning(protocol)):
            pass
        return result

    def _iterate(self, protocol: Protocol) -> Iterator:
        run = Run(protocol)
        try:
            for action in run:
                if not isinstance(action, Emit):
                    run.result = action.perform(self._http, run.opened)
                else:
                    yield action.value
        finally:
            protocol.close()
            for response in run.opened:
                response.close()


class AsyncClient(BaseClient):
    """The asyncio client: :class:`Client`'s calls, awaited (``events`` is an async iterator)::

        async with AsyncClient("http://localhost:8000", api_key="sk-...") as client:
            video = await client.submit(image_url="https://example.com/cat.png")
            async for event in client.events(video.id):
                print(event.event, event.data.percent)
    """

    _http_class = httpx.AsyncClient

    async def submit(self, image: ImageInput | None = None, *, image_url: str | None = None,
                     idempotency_key: str | None = None, webhook_url: str | None = None,
                     webhook_events: Iterable[str] | None = None, **params: Any) -> Video:
        """See :meth:`Client.submit`."""
        return await self._run(self._submit(image, image_url, idempotency_key, webhook_url, webhook_events, params))

    async def get(self, video_id: str) -> Video:
        return await self._run(self._get(video_id))

    async def list(self, *, limit: int | None = None, after: str | None = None, order: str | None = None,
                   status: str | None = None) -> VideoList:
        return await self._run(self._list(limit, after, order, status))

    async def cancel(self, video_id: str) -> Video:
        return await self._run(self._cancel(video_id))

    async def delete(self, video_id: str) -> VideoDeleted:
        return await self._run(self._delete(video_id))

    def events(self, video_id: str) -> AsyncIterator[VideoEvent]:
        """See :meth:`Client.events`. To stop early, wrap it in ``contextlib.aclosing`` so that the
        stream is closed at once rather than when the iterator is collected."""
        return self._iterate(self._events(video_id))

    async def wait(self, video_id: str, *, timeout: float | None = None, poll_interval: float | None = None,
                   on_update: Callable[[Video], Any] | None = None) -> Video:
        """See :meth:`Client.wait` (``on_update`` is a plain function, called in the event loop)."""
        return await self._run(self._wait(video_id, timeout, poll_interval, on_update))

    async def download(self, video_id: str, path: str | os.PathLike, *, variant: str = "video") -> Path:
        return await self._run(self._download(video_id, path, variant))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, protocol: Protocol[T]) -> T:
        result = None
        async for result in self._iterate(returning(protocol)):
            pass
        return result

    async def _iterate(self, protocol: Protocol) -> AsyncIterator:
        run = Run(protocol)
        try:
            for action in run:
                if not isinstance(action, Emit):
                    run.result = await action.perform_async(self._http, run.opened)
                else:
                    yield action.value
        finally:
            protocol.close()
            for response in run.opened:
                await response.aclose()
