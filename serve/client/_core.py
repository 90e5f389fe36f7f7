"""The client, written once for sync and async.

Every API call is a *protocol*: a generator that builds requests, decides on retries, parses
responses and raises errors, and that does no I/O itself. It yields *actions* (send this request,
sleep, read the next line of this response, ...) and is sent each action's outcome, or has the
action's exception thrown into it. :class:`~serve.client.Client` performs the actions with
``httpx.Client``, :class:`~serve.client.AsyncClient` with ``httpx.AsyncClient``; the mapping from
calls to HTTP and from HTTP to results and errors lives here only.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import re
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, Callable, Generator, Iterable, Iterator, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from .errors import (APIConnectionError, APIResponseError, ClientError, InvalidArgumentError, StreamInterruptedError,
                     WaitTimeoutError, connection_error, error_from_response)
from .models import Video, VideoDeleted, VideoEvent, VideoList
from .retries import RetryPolicy, parse_retry_after
from .sse import SSEDecoder

URL_ENV, API_KEY_ENV = "SVD_SERVE_URL", "SVD_SERVE_API_KEY"
USER_AGENT = "svd-serve-client/0.1.0"
CHUNK_BYTES = 256 * 1024
#: What a submit's ``image`` may be: a file path, the file's bytes, or a binary file object.
ImageInput = str | os.PathLike | bytes | IO[bytes]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Protocol = Generator[Any, Any, T]

# -- actions: what a protocol asks its driver to do --------------------------------------------------

END = object()  # Next's outcome once the iterator is exhausted


class Action:
    """One step of I/O, performed by ``sync`` or ``asynchronous``; ``perform`` and
    ``perform_async`` return ``(outcome, None)`` or ``(None, the exception)`` for the protocol."""

    def sync(self, http: httpx.Client, opened: list) -> Any:
        raise NotImplementedError

    async def asynchronous(self, http: httpx.AsyncClient, opened: list) -> Any:
        raise NotImplementedError

    def perform(self, http: httpx.Client, opened: list) -> tuple[Any, Exception | None]:
        try:
            return self.sync(http, opened), None
        except Exception as error:  # noqa: BLE001 - thrown into the protocol, which decides
            return None, error

    async def perform_async(self, http: httpx.AsyncClient, opened: list) -> tuple[Any, Exception | None]:
        try:
            return await self.asynchronous(http, opened), None
        except Exception as error:  # noqa: BLE001 - thrown into the protocol, which decides
            return None, error


@dataclass(frozen=True)
class Send(Action):
    """Send a request; a streamed response goes on ``opened``, for the driver to close at the end."""

    request: httpx.Request
    stream: bool = False
    follow_redirects: bool = False

    def sync(self, http, opened) -> httpx.Response:
        response = http.send(self.request, stream=self.stream, follow_redirects=self.follow_redirects)
        if self.stream:
            opened.append(response)
        return response

    async def asynchronous(self, http, opened) -> httpx.Response:
        response = await http.send(self.request, stream=self.stream, follow_redirects=self.follow_redirects)
        if self.stream:
            opened.append(response)
        return response


@dataclass(frozen=True)
class Sleep(Action):
    seconds: float

    def sync(self, http, opened) -> None:
        time.sleep(self.seconds)

    async def asynchronous(self, http, opened) -> None:
        await asyncio.sleep(self.seconds)


@dataclass(frozen=True)
class Read(Action):
    """Read a streamed response's whole body (an error response's, to parse it)."""

    response: httpx.Response

    def sync(self, http, opened) -> bytes:
        return self.response.read()

    async def asynchronous(self, http, opened) -> bytes:
        return await self.response.aread()


@dataclass(frozen=True)
class Iterate(Action):
    """An iterator over a streamed response's lines (``lines=True``) or chunks of bytes."""

    response: httpx.Response
    lines: bool

    def sync(self, http, opened):
        return self.response.iter_lines() if self.lines else self.response.iter_bytes(CHUNK_BYTES)

    async def asynchronous(self, http, opened):
        return self.response.aiter_lines() if self.lines else self.response.aiter_bytes(CHUNK_BYTES)


@dataclass(frozen=True)
class Next(Action):
    """The next item of an iterator made by :class:`Iterate`, or END."""

    iterator: Any

    def sync(self, http, opened):
        return next(self.iterator, END)

    async def asynchronous(self, http, opened):
        return await anext(self.iterator, END)


@dataclass(frozen=True)
class Emit:
    """Not I/O: a value for the caller of an iterating call (``events``); the protocol then goes on."""

    value: Any


class Run:
    """One protocol being driven. Iterating gives its actions (Emits included); after each action
    the driver sets ``result`` to the pair ``perform`` returned, which the protocol is sent next."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol, self.opened = protocol, []
        self.result: tuple[Any, BaseException | None] = (None, None)
        self.value: Any = None  # what the protocol returned

    def __iter__(self) -> Iterator[Any]:
        while True:
            (outcome, error), self.result = self.result, (None, None)
            try:
                action = self.protocol.throw(error) if error is not None else self.protocol.send(outcome)
            except StopIteration as stop:
                self.value = stop.value
                return
            yield action


def returning(protocol: Protocol[T]) -> Protocol[T]:
    """The protocol, emitting its return value last (how a driver gets the result of a call)."""
    value = yield from protocol
    yield Emit(value)


def intercept(protocol: Protocol[T], handle: Callable[[Any], None]) -> Protocol[T]:
    """Run ``protocol`` inside another, handing what it emits to ``handle`` instead of the caller."""
    run = Run(protocol)
    for action in run:
        if isinstance(action, Emit):
            handle(action.value)
            continue
        try:
            run.result = (yield action), None
        except Exception as error:  # noqa: BLE001 - handed on to the inner protocol
            run.result = None, error
    return run.value


# -- the client ---------------------------------------------------------------------------------------


class BaseClient:
    """What :class:`Client` and :class:`AsyncClient` share: configuration and every protocol."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_retry_wait: float = 60.0,
        poll_interval: float = 2.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``base_url`` and ``api_key`` default to ``$SVD_SERVE_URL`` and ``$SVD_SERVE_API_KEY``.
        ``timeout`` bounds each network operation (connect at most 10 s); a wait between two
        events of a stream may be as long. Retries (429/503, dropped connections: see
        :mod:`serve.client.retries`) stop after ``max_retries`` or ``max_retry_wait`` seconds of
        waiting in all. ``wait`` polls every ``poll_interval`` seconds if the event stream drops."""
        base_url = base_url or os.environ.get(URL_ENV)
        if not base_url:
            raise InvalidArgumentError(f"no server URL: pass base_url (--url) or set {URL_ENV}")
        if not re.match(r"https?://[^/]", base_url):
            raise InvalidArgumentError(f"{base_url!r} is not an http(s) URL")
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self.poll_interval = poll_interval
        self._http = self._http_class(base_url=self.base_url, headers=headers, transport=transport,
                                      timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    # -- requests -------------------------------------------------------------------------------------

    def _call(self, method: str, url: str, *, idempotent: bool, stream: bool = False,
              follow_redirects: bool = False, **options: Any) -> Protocol[httpx.Response]:
        """Send a request, retrying as :mod:`.retries` says; the response once its status is below 400
        (streamed: its body is still to read), else the mapped error."""
        attempt, waited = 0, 0.0
        while True:
            request = self._http.build_request(method, url, **options)
            try:
                response = yield Send(request, stream, follow_redirects)
                if response.status_code < 400:
                    return response
                if stream:
                    yield Read(response)
            except httpx.RequestError as error:
                delay = self.retry.after_error(error, idempotent=idempotent, attempt=attempt, waited=waited)
                if delay is None:
                    raise connection_error(error, f"{method} {request.url}") from None
            else:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = self.retry.after_status(response.status_code, retry_after, attempt=attempt, waited=waited)
                if delay is None:
                    raise error_from_response(response, retry_after)
            yield Sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    def _object(self, model: type[M], method: str, url: str, *, idempotent: bool, **options: Any) -> Protocol[M]:
        response = yield from self._call(method, url, idempotent=idempotent, **options)
        return _parse(model, response.content, f"{method} {response.request.url}")

    # -- protocols of the public calls ------------------------------------------------------------------

    def _submit(self, image: ImageInput | None, image_url: str | None, idempotency_key: str | None,
                webhook_url: str | None, webhook_events: Iterable[str] | None,
                params: dict[str, Any]) -> Protocol[Video]:
        if image is None and image_url is None:
            raise InvalidArgumentError("no image: give image (a file path, bytes or a binary file) or image_url")
        if image is not None and image_url is not None:
            raise InvalidArgumentError("give image or image_url, not both")
        fields = {name: _plain(value) for name, value in params.items() if value is not None}
        if webhook_url is not None:
            fields["webhook_url"] = webhook_url
        events = list(webhook_events or [])
        if image_url is not None:
            options: dict[str, Any] = {"json": {"image_url": image_url, **fields,
                                                **({"webhook_events": events} if events else {})}}
        else:
            name, data = _read_image(image)
            form = {key: value if isinstance(value, str) else json.dumps(value) for key, value in fields.items()}
            if events:
                form["webhook_events"] = ",".join(events)
            content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
            options = {"data": form, "files": {"image": (name, data, content_type)}}
        # One key per submit, the same on each of its retries: a retried submit never makes two jobs.
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return (yield from self._object(Video, "POST", "/v1/videos", idempotent=True, headers=headers, **options))

    def _get(self, video_id: str) -> Protocol[Video]:
        return self._object(Video, "GET", _video_path(video_id), idempotent=True)

    def _list(self, limit: int | None, after: str | None, order: str | None, status: str | None) -> Protocol[VideoList]:
        query = {name: value for name, value in
                 {"limit": limit, "after": after, "order": order, "status": status}.items() if value is not None}
        return self._object(VideoList, "GET", "/v1/videos", idempotent=True, params=query)

    def _cancel(self, video_id: str) -> Protocol[Video]:
        return self._object(Video, "POST", f"{_video_path(video_id)}/cancel", idempotent=False)

    def _delete(self, video_id: str) -> Protocol[VideoDeleted]:
        return self._object(VideoDeleted, "DELETE", _video_path(video_id), idempotent=False)

    def _events(self, video_id: str, deadline: float | None = None) -> Protocol[Video]:
        """Emits each event; returns the terminal video, or raises StreamInterruptedError when the
        stream ends first (a ``deadline`` also bounds how long a read may wait)."""
        timeout = self._http.timeout
        if deadline is not None:
            read = max(0.001, deadline - time.monotonic())
            timeout = httpx.Timeout(connect=timeout.connect, read=min(read, timeout.read or read), write=timeout.write,
                                    pool=timeout.pool)
        url = f"{_video_path(video_id)}/events"
        response = yield from self._call("GET", url, idempotent=True, stream=True, timeout=timeout,
                                         headers={"Accept": "text/event-stream"})
        lines, decoder = (yield Iterate(response, lines=True)), SSEDecoder()
        while True:
            try:
                line = yield Next(lines)
            except httpx.RequestError as error:
                raise _interrupted(video_id, error) from None
            if line is END:
                raise _interrupted(video_id, None)
            event = decoder.feed(line)
            if event is None:
                continue
            try:
                video = Video.model_validate_json(event.data)
            except ValidationError:
                continue  # an event of a kind this client does not know
            yield Emit(VideoEvent(event=event.event, data=video, id=event.id))
            if video.is_terminal:
                return video

    def _wait(self, video_id: str, timeout: float | None, poll_interval: float | None,
              on_update: Callable[[Video], Any] | None) -> Protocol[Video]:
        deadline = None if timeout is None else time.monotonic() + timeout
        poll_interval = self.poll_interval if poll_interval is None else poll_interval
        last: list[Video] = []

        def seen(video: Video) -> None:
            if on_update is not None and (not last or video != last[-1]):
                on_update(video)
            last[:] = [video]

        try:
            return (yield from intercept(self._events(video_id, deadline), lambda event: seen(event.data)))
        except APIConnectionError:
            pass  # the stream dropped (or never opened): poll instead
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeoutError(f"video {video_id} is still {last[-1].status if last else 'running'} after "
                                       f"{timeout:g}s")
            video = yield from self._get(video_id)
            seen(video)
            if video.is_terminal:
                return video
            yield Sleep(poll_interval if left is None else min(poll_interval, left))

    def _download(self, video_id: str, path: str | os.PathLike, variant: str) -> Protocol[Path]:
        url = f"{_video_path(video_id)}/content"
        response = yield from self._call("GET", url, idempotent=True, stream=True, follow_redirects=True,
                                         params={"variant": variant}, headers={"Accept": "*/*"})
        target = Path(path)
        if target.is_dir():
            target = target / _file_name(response, video_id)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        chunks = yield Iterate(response, lines=False)
        try:
            with partial.open("wb") as file:
                while (chunk := (yield Next(chunks))) is not END:
                    file.write(chunk)
            partial.replace(target)
        except httpx.RequestError as error:
            raise connection_error(error, f"download of {video_id}") from None
        except OSError as error:
            raise ClientError(f"{target}: cannot write the download: {error.strerror or error}",
                              code="write_failed") from None
        finally:
            partial.unlink(missing_ok=True)
        return target


# -- helpers ------------------------------------------------------------------------------------------


def _video_path(video_id: str) -> str:
    if not video_id or not isinstance(video_id, str):
        raise InvalidArgumentError("a video id is required")
    return f"/v1/videos/{quote(video_id, safe='')}"


def _parse(model: type[M], content: bytes, what: str) -> M:
    try:
        return model.model_validate_json(content)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem.get("loc", ())) or "body"
        raise APIResponseError(f"{what}: not an svd-serve response ({where}: {problem['msg']})") from None


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _read_image(image: ImageInput) -> tuple[str, bytes]:
    """The upload's file name and bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.name, path.read_bytes()
        except OSError as error:
            hint = " (pass URLs as image_url)" if re.match(r"(https?|data):", str(image)) else ""
            raise InvalidArgumentError(f"image {image}: {error.strerror or error}{hint}") from None
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise InvalidArgumentError("image: open the file in binary mode ('rb')")
        return Path(getattr(image, "name", None) or "image").name, data
    raise InvalidArgumentError(f"image: a file path, bytes or a binary file, not {type(image).__name__}")


def _file_name(response: httpx.Response, video_id: str) -> str:
    match = re.search(r'filename="?([^";]+)"?', response.headers.get("Content-Disposition", ""))
    if match and Path(match.group(1)).name not in ("", ".", ".."):
        return Path(match.group(1)).name
    extension = mimetypes.guess_extension(response.headers.get("Content-Type", "").split(";")[0]) or ".mp4"
    return f"{video_id}{extension}"


def _interrupted(video_id: str, error: httpx.RequestError | None) -> StreamInterruptedError:
    reason = f": {error}" if error is not None and str(error) else ""
    return StreamInterruptedError(f"the event stream of video {video_id} ended before the video did{reason}")
