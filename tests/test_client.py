"""The Python client (``serve.client``) and ``svd-serve client``.

Most tests run against a fake of the native ``/v1/videos`` API served by uvicorn in a thread, so
that they can script what a real service does only now and then: a 429 with ``Retry-After``, a 503,
a connection dropped after the job was created, an event stream that breaks off, a redirect to
presigned storage. One end-to-end test runs ``svd-serve client`` against ``make serve``'s local
deployment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from serve.cli import main
from serve.client import (APIConnectionError, AsyncClient, AuthenticationError, Client, ConflictError,
                          InvalidArgumentError, NotFoundError, RateLimitError, ServiceUnavailableError,
                          StreamInterruptedError, UnprocessableEntityError, Video, VideoEvent, WaitTimeoutError)
from serve.client.retries import RetryPolicy, parse_retry_after
from serve.client.sse import SSEDecoder
from threads import uvicorn_in_thread

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO_ROOT / "pipelines" / "assets" / "sample.png"
KEY = "sk-test"
CLIP = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 1200  # ~300 KB: several chunks
EVENT_GAP_S = 0.02


# -- the fake service ---------------------------------------------------------------------------------


def video_object(video_id: str, status: str, *, position: int | None = None, stage: str | None = None,
                 step: int = 0, total: int = 3, percent: float = 0.0, params: dict | None = None) -> dict:
    now = 1_750_000_000
    ended = status in ("completed", "failed", "cancelled")
    return {
        "id": video_id, "object": "video", "created_at": now, "completed_at": now if status == "completed" else None,
        "expires_at": None, "status": status, "progress": int(percent), "model": "svd-test", "prompt": None,
        "seconds": "0.86", "size": "64x64",
        "error": {"code": "invalid_image", "message": "the image is broken"} if status == "failed" else None,
        "started_at": now if status != "queued" else None, "finished_at": now if ended else None,
        "timestamps": {"created_at": "2025-01-02T03:04:05.123456+00:00", "started_at": None,
                       "finished_at": None, "expires_at": None},
        "params": params or {"seed": 7, "num_frames": 6},
        "queue_position": position,
        "progress_detail": {"stage": stage, "step": step, "total_steps": total, "percent": percent,
                            "updated_at": None},
        "timings": {"sampling": 0.5} if ended else {},
        "output": ({"url": f"http://x/v1/videos/{video_id}/content", "content_type": "video/mp4",
                    "file_name": f"{video_id}.mp4", "file_size": len(CLIP)} if status == "completed" else None),
        "webhook_url": None, "webhook": None,
        "a_newer_field": {"the client": "must not mind"},
    }


def timeline(video_id: str, *, steps: int = 3, queued: int = 2, outcome: str = "completed",
             params: dict | None = None) -> list[dict]:
    """The states a job goes through: queued (positions counting down), the stages, the outcome."""
    states = [video_object(video_id, "queued", position=n, total=steps, params=params) for n in reversed(range(queued))]
    states.append(video_object(video_id, "in_progress", stage="image_encode", total=steps, percent=1, params=params))
    states += [video_object(video_id, "in_progress", stage="sampling", step=k, total=steps, percent=5 + 80 * k / steps,
                            params=params) for k in range(1, steps + 1)]
    states.append(video_object(video_id, "in_progress", stage="decode", step=steps, total=steps, percent=90,
                               params=params))
    states.append(video_object(video_id, outcome, step=steps, total=steps, percent=100, params=params))
    return states


class DropConnection(Response):
    """Sends the head and a byte of the body, then fails: the client sees the connection drop."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise ConnectionAbortedError("dropped on purpose")


class FakeAPI:
    """The native API's contract, with scriptable faults. ``requests`` records what arrived."""

    def __init__(self) -> None:
        self.reset()
        self.app = self._build()
        self.base_url = ""

    def reset(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.faults: dict[str, list[Any]] = {}
        self.idempotency: dict[str, str] = {}
        self.next_job: dict[str, Any] = {}

    def fault(self, route: str, *responses: Any) -> None:
        """The next answers of a route: a status, (status, headers), or "drop"; then it works again."""
        self.faults.setdefault(route, []).extend(responses)

    def add_job(self, **options: Any) -> str:
        video_id = f"video_{uuid.uuid4().hex[:12]}"
        params = options.pop("params", None)
        states = timeline(video_id, outcome=options.pop("outcome", "completed"), params=params,
                          **{k: options.pop(k) for k in ("steps", "queued") if k in options})
        self.jobs[video_id] = {"states": states, "at": 0, **options}
        return video_id

    def requests_to(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and re.fullmatch(path, r["path"])]

    def _current(self, video_id: str) -> dict:
        job = self.jobs[video_id]
        return job["states"][job["at"]]

    def _advance(self, video_id: str) -> dict:
        job = self.jobs[video_id]
        state = job["states"][job["at"]]
        if not job.get("stuck"):
            job["at"] = min(job["at"] + 1, len(job["states"]) - 1)
        return state

    def _build(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
            return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

        @app.middleware("http")
        async def record_and_fault(request: Request, call_next):
            body = await request.body()
            self.requests.append({"method": request.method, "path": request.url.path, "query": dict(request.query_params),
                                  "headers": dict(request.headers), "body": body})
            if request.url.path.startswith("/presigned/"):
                return await call_next(request)
            if request.headers.get("authorization") != f"Bearer {KEY}":
                return error(401, "unauthorized", "missing or invalid API key")
            route = f"{request.method} {re.sub(r'video_[0-9a-f]+', '{id}', request.url.path)}"
            pending = self.faults.get(route)
            if pending:
                fault = pending.pop(0)
                if fault == "drop":
                    return DropConnection(status_code=200)
                status, headers = fault if isinstance(fault, tuple) else (fault, None)
                return error(status, {429: "rate_limited", 503: "store_unavailable"}.get(status, "error"),
                             f"scripted {status}", headers)
            return await call_next(request)

        @app.post("/v1/videos")
        async def create(request: Request):
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                form = await request.form()
                upload = form["image"]
                fields = {k: v for k, v in form.items() if k != "image"}
                received = {"image": await upload.read(), "filename": upload.filename,
                            "image_type": upload.content_type, "fields": fields}
            else:
                received = {"json": await request.json()}
            self.requests[-1]["received"] = received
            fields = received["fields"] if "fields" in received else received["json"]
            if "motion_bucket_id" in fields and int(fields["motion_bucket_id"]) > 255:
                return error(422, "invalid_parameter", "motion_bucket_id: 300 is out of range (allowed: 1 to 255)")
            key = request.headers.get("idempotency-key")
            replayed = key in self.idempotency
            video_id = self.idempotency[key] if replayed else self.add_job(**self.next_job)
            if key:
                self.idempotency[key] = video_id
            body = self._current(video_id)
            if self.faults.get("answer to POST /v1/videos"):  # the job is made, then the answer is lost
                self.faults["answer to POST /v1/videos"].pop(0)
                return DropConnection(status_code=202)
            headers = {"Location": f"/v1/videos/{video_id}", **({"Idempotent-Replayed": "true"} if replayed else {})}
            return JSONResponse(body, status_code=202, headers=headers)

        @app.get("/v1/videos")
        async def list_videos(limit: int = 20, after: str | None = None, order: str = "desc",
                              status: str | None = None):
            ids = list(self.jobs) if order == "asc" else list(reversed(self.jobs))
            videos = [self._current(i) for i in ids]
            if status:
                videos = [v for v in videos if v["status"] == status]
            if after:
                videos = videos[[v["id"] for v in videos].index(after) + 1:]
            page = videos[:limit]
            return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": len(videos) > limit}

        @app.get("/v1/videos/{video_id}")
        async def get(video_id: str):
            if video_id not in self.jobs:
                return error(404, "not_found", "video job not found")
            return self._advance(video_id)

        @app.post("/v1/videos/{video_id}/cancel")
        async def cancel(video_id: str):
            current = self._current(video_id)
            if current["status"] in ("completed", "failed"):
                return error(409, "already_finished", f"the job already {current['status']}; nothing to cancel")
            job = self.jobs[video_id]
            job["states"], job["at"] = [video_object(video_id, "cancelled")], 0
            return self._current(video_id)

        @app.delete("/v1/videos/{video_id}")
        async def delete(video_id: str):
            if self._current(video_id)["status"] not in ("completed", "failed", "cancelled"):
                return error(409, "job_running", "cancel it first")
            del self.jobs[video_id]
            return {"id": video_id, "object": "video.deleted", "deleted": True}

        @app.get("/v1/videos/{video_id}/events")
        async def events(video_id: str):
            job = self.jobs[video_id]

            async def stream():
                yield ": keep-alive\n\n"
                sent, status = 0, None
                while True:
                    if job.get("drop_after") is not None and sent >= job["drop_after"]:
                        # Drops once. The last event may be lost with the connection: polling goes on
                        # from it, and the client must not report it twice if it did arrive.
                        job["drop_after"], job["at"] = None, job["at"] - 1
                        await asyncio.sleep(0.1)
                        raise ConnectionAbortedError("stream dropped on purpose")
                    state = self._advance(video_id)
                    kind = "status" if state["status"] != status else "progress"
                    status, sent = state["status"], sent + 1
                    yield f"event: {kind}\nid: {sent}\ndata: {json.dumps(state)}\n\n"
                    if state["status"] in ("completed", "failed", "cancelled"):
                        return
                    await asyncio.sleep(EVENT_GAP_S if not job.get("stuck") else 3600)

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.get("/v1/videos/{video_id}/content")
        async def content(video_id: str, request: Request):
            if self.jobs[video_id].get("redirect"):
                host = "localhost" if "127.0.0.1" in self.base_url else "127.0.0.1"  # another origin
                port = self.base_url.rsplit(":", 1)[1]
                return RedirectResponse(f"http://{host}:{port}/presigned/{video_id}?X-Amz-Signature=abc",
                                        status_code=307)
            return Response(CLIP, media_type="video/mp4",
                            headers={"Content-Disposition": f'attachment; filename="{video_id}.mp4"'})

        @app.get("/presigned/{video_id}")
        async def presigned(video_id: str):
            return Response(CLIP, media_type="video/mp4")

        return app


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeAPI()
    with uvicorn_in_thread(fake.app) as base_url:
        fake.base_url = base_url
        yield fake


@pytest.fixture
def api(fake_server) -> FakeAPI:
    fake_server.reset()
    return fake_server


@pytest.fixture
def client(api):
    with Client(api.base_url, KEY, poll_interval=0.01, max_retry_wait=5) as c:
        yield c


# -- pure parts ---------------------------------------------------------------------------------------


def test_import_is_light():
    """``import serve.client`` (and its CLI) loads neither Ray nor torch nor diffusers."""
    code = ("import sys, serve.client, serve.client.cli; "
            "print(','.join(m for m in ('ray', 'torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_video_tolerates_unknown_and_missing_fields():
    video = Video.model_validate({"id": "v1", "status": "some_new_status", "brand_new": [1, 2],
                                  "progress_detail": {"stage": "sampling", "percent": 12.5, "eta_s": 3}})
    assert video.brand_new == [1, 2] and video.progress_detail.eta_s == 3
    assert video.percent == 12.5 and not video.is_terminal and video.output is None
    assert Video.model_validate(video_object("v2", "completed")).is_terminal


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(formatdate(now + 42, usegmt=True), now=now) == pytest.approx(42, abs=1)
    assert parse_retry_after(formatdate(now - 42, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None and parse_retry_after(None) is None


def test_retry_policy_bounds():
    policy = RetryPolicy(max_retries=3, max_wait=10)
    assert policy.after_status(429, 2.0, attempt=0, waited=0) == 2.0
    assert policy.after_status(503, None, attempt=2, waited=0) == 2.0  # backoff 0.5 * 2**2
    assert policy.after_status(429, 11.0, attempt=0, waited=0) is None  # past the total wait
    assert policy.after_status(429, 1.0, attempt=3, waited=0) is None  # out of retries
    assert policy.after_status(500, None, attempt=0, waited=0) is None
    assert policy.after_status(409, None, attempt=0, waited=0) is None


def test_sse_decoder():
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: status", "id: 4", "data: {\"a\":", "data: 1}", "", "data: x", "", "retry: 5"]
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.event, e.id, e.data) for e in events] == [("status", "4", "{\"a\":\n1}"), ("message", "4", "x")]


# -- the sync client ----------------------------------------------------------------------------------


def test_submit_upload_wait_and_download(api, client, tmp_path):
    video = client.submit(image=SAMPLE_IMAGE, num_frames=6, num_inference_steps=3, output_format="mp4")
    assert isinstance(video, Video) and video.status == "queued" and video.queue_position == 1
    submit = api.requests_to("POST", "/v1/videos")[0]
    assert submit["headers"]["authorization"] == f"Bearer {KEY}"
    uuid.UUID(submit["headers"]["idempotency-key"])  # a fresh UUID by default
    received = submit["received"]
    assert received["image"] == SAMPLE_IMAGE.read_bytes() and received["filename"] == "sample.png"
    assert received["image_type"] == "image/png"
    assert received["fields"] == {"num_frames": "6", "num_inference_steps": "3", "output_format": "mp4"}

    updates: list[Video] = []
    done = client.wait(video.id, on_update=updates.append)
    assert done.status == "completed" and done.output.file_size == len(CLIP)
    assert [(v.status, v.queue_position) for v in updates[:2]] == [("queued", 1), ("queued", 0)]
    assert [v.progress_detail.step for v in updates if v.progress_detail.stage == "sampling"] == [1, 2, 3]
    assert updates[-1] == done and len(api.requests_to("GET", r"/v1/videos/[^/]+")) == 0  # no polling needed

    path = client.download(video.id, tmp_path / "clip.mp4")
    assert path == tmp_path / "clip.mp4" and path.read_bytes() == CLIP
    named = client.download(video.id, tmp_path)  # a folder: the server's file name
    assert named == tmp_path / f"{video.id}.mp4" and named.read_bytes() == CLIP
    assert not list(tmp_path.glob(".*.part"))


def test_submit_image_url_as_json_and_bytes_as_upload(api, client):
    client.submit(image_url="https://example.com/cat.png", seed=5, cond_aug=0.1, webhook_url="https://hook",
                  webhook_events=["progress"])
    assert api.requests[-1]["received"]["json"] == {"image_url": "https://example.com/cat.png", "seed": 5,
                                                    "cond_aug": 0.1, "webhook_url": "https://hook",
                                                    "webhook_events": ["progress"]}
    client.submit(image=SAMPLE_IMAGE.read_bytes(), webhook_events=["progress"], idempotency_key="mine")
    assert api.requests[-1]["received"]["fields"] == {"webhook_events": "progress"}
    assert api.requests[-1]["headers"]["idempotency-key"] == "mine"
    with pytest.raises(InvalidArgumentError, match="not both"):
        client.submit(image=b"x", image_url="https://example.com/cat.png")
    with pytest.raises(InvalidArgumentError, match="image_url"):
        client.submit(image="https://example.com/cat.png")
    assert len(api.requests_to("POST", "/v1/videos")) == 2


def test_429_retry_after_is_honoured_with_the_same_idempotency_key(api, client):
    api.fault("POST /v1/videos", (429, {"Retry-After": "1"}))
    start = time.monotonic()
    video = client.submit(image=SAMPLE_IMAGE)
    assert time.monotonic() - start >= 0.9
    keys = [r["headers"]["idempotency-key"] for r in api.requests_to("POST", "/v1/videos")]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert list(api.jobs) == [video.id]


def test_a_lost_submit_answer_is_retried_without_a_second_job(api, client):
    api.fault("answer to POST /v1/videos", "drop")
    video = client.submit(image=SAMPLE_IMAGE)
    submits = api.requests_to("POST", "/v1/videos")
    assert len(submits) == 2 and submits[0]["headers"]["idempotency-key"] == submits[1]["headers"]["idempotency-key"]
    assert list(api.jobs) == [video.id]


def test_503_then_success_and_http_date_retry_after(api, client):
    video_id = api.add_job()
    api.fault("GET /v1/videos/{id}", 503, (503, {"Retry-After": formatdate(time.time(), usegmt=True)}))
    assert client.get(video_id).id == video_id
    assert len(api.requests_to("GET", f"/v1/videos/{video_id}")) == 3


def test_retries_stop_at_the_wait_budget(api, client):
    api.fault("POST /v1/videos", (429, {"Retry-After": "120"}))
    start = time.monotonic()
    with pytest.raises(RateLimitError) as caught:
        client.submit(image=SAMPLE_IMAGE)
    assert time.monotonic() - start < 1
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (429, "rate_limited", 120)
    api.fault("GET /v1/videos/{id}", 503, 503, 503, 503, 503)
    with pytest.raises(ServiceUnavailableError):
        Client(api.base_url, KEY, max_retries=1).get(api.add_job())


def test_other_4xx_are_not_retried(api, client):
    with pytest.raises(UnprocessableEntityError) as caught:
        client.submit(image=SAMPLE_IMAGE, motion_bucket_id=300)
    error = caught.value
    assert (error.status, error.code) == (422, "invalid_parameter") and "allowed: 1 to 255" in error.message
    assert len(api.requests_to("POST", "/v1/videos")) == 1
    with pytest.raises(NotFoundError):
        client.get("video_000000000000")
    with pytest.raises(AuthenticationError) as caught:
        Client(api.base_url, "wrong").get("video_000000000000")
    assert caught.value.code == "unauthorized"
    assert len(api.requests) == 3


def test_connection_errors_retry_idempotent_requests_only(api, client):
    video_id = api.add_job(queued=5)
    api.fault("GET /v1/videos/{id}", "drop")
    assert client.get(video_id).status == "queued"
    assert len(api.requests_to("GET", f"/v1/videos/{video_id}")) == 2
    api.fault("POST /v1/videos/{id}/cancel", "drop")
    with pytest.raises(APIConnectionError):
        client.cancel(video_id)
    assert len(api.requests_to("POST", f"/v1/videos/{video_id}/cancel")) == 1
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(APIConnectionError) as caught:
        Client(f"http://127.0.0.1:{port}", KEY, max_retries=2).cancel(video_id)  # refused: never sent, so retried
    assert time.monotonic() - start >= 1.4 and caught.value.status is None  # waited 0.5 + 1


def test_events_are_typed_and_end_with_the_job(api, client):
    video_id = api.add_job(steps=2, queued=1)
    events = list(client.events(video_id))
    assert all(isinstance(e, VideoEvent) for e in events)
    assert [e.event for e in events] == ["status", "status", "progress", "progress", "progress", "status"]
    assert [e.id for e in events] == [str(n) for n in range(1, 7)]
    assert events[-1].data.status == "completed" and events[1].data.progress_detail.stage == "image_encode"


def test_wait_falls_back_to_polling_when_the_stream_drops(api, client):
    received: list[VideoEvent] = []
    with pytest.raises(StreamInterruptedError, match="ended before the video did"):
        for event in client.events(api.add_job(drop_after=2)):
            received.append(event)
    assert [e.data.queue_position for e in received][:1] == [1]

    video_id = api.add_job(drop_after=2)
    seen: list[Video] = []
    video = client.wait(video_id, on_update=seen.append)
    assert video.status == "completed"
    assert 1 <= len(api.requests_to("GET", f"/v1/videos/{video_id}")) < len(timeline(video_id))  # it polled
    assert_in_order(seen, video_id)


def assert_in_order(seen: list[Video], video_id: str) -> None:
    """Each update a later state than the one before (none reported twice: polling re-reads the last
    streamed state), ending with the outcome. The fake moves a job on at each read, so a read whose
    answer was lost with a dropped connection skips a state; a real service's reads do not."""
    states = [Video.model_validate(state) for state in timeline(video_id)]
    indexes = [states.index(video) for video in seen]
    assert indexes == sorted(set(indexes)) and indexes[-1] == len(states) - 1, indexes


def test_wait_timeout_and_failed_jobs(api, client):
    stuck = api.add_job(stuck=True)
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="still queued"):
        client.wait(stuck, timeout=0.5)
    assert time.monotonic() - start < 3
    failed = client.wait(api.add_job(outcome="failed"))
    assert failed.status == "failed" and (failed.error.code, failed.error.message) == ("invalid_image",
                                                                                       "the image is broken")


def test_cancel_delete_and_list(api, client):
    ids = [api.add_job(queued=3) for _ in range(3)]
    assert client.cancel(ids[0]).status == "cancelled"
    assert client.delete(ids[0]).deleted
    with pytest.raises(ConflictError) as caught:
        client.delete(ids[1])
    assert caught.value.code == "job_running"
    page = client.list(limit=1)
    assert [v.id for v in page.data] == [ids[2]] and page.has_more and page.last_id == ids[2]
    page = client.list(limit=5, after=page.last_id, order="desc", status="queued")
    assert [v.id for v in page.data] == [ids[1]] and not page.has_more
    assert api.requests[-1]["query"] == {"limit": "5", "after": ids[2], "order": "desc", "status": "queued"}


def test_download_follows_a_redirect_without_the_api_key(api, client, tmp_path):
    video_id = api.add_job(redirect=True)
    assert client.download(video_id, tmp_path / "clip.mp4").read_bytes() == CLIP
    presigned = api.requests_to("GET", f"/presigned/{video_id}")
    assert len(presigned) == 1 and "authorization" not in presigned[0]["headers"]


# -- the async client ---------------------------------------------------------------------------------


def test_async_client(api, tmp_path):
    async def scenario():
        async with AsyncClient(api.base_url, KEY, poll_interval=0.01, max_retry_wait=5) as client:
            api.fault("POST /v1/videos", (429, {"Retry-After": "0.1"}))
            api.next_job = {"drop_after": 3}
            video = await client.submit(image=SAMPLE_IMAGE.read_bytes(), num_frames=6)
            keys = {r["headers"]["idempotency-key"] for r in api.requests_to("POST", "/v1/videos")}
            assert len(keys) == 1 and list(api.jobs) == [video.id]
            seen: list[Video] = []
            done = await client.wait(video.id, on_update=seen.append)  # the stream drops: polls
            assert done.status == "completed" and api.requests_to("GET", f"/v1/videos/{video.id}")
            assert_in_order(seen, video.id)
            api.jobs[video.id]["at"] = 0
            events = [event async for event in client.events(video.id)]
            assert all(isinstance(e, VideoEvent) for e in events) and events[-1].data.status == "completed"
            assert_in_order([e.data for e in events], video.id)
            path = await client.download(video.id, tmp_path / "a.mp4")
            assert path.read_bytes() == CLIP
            with pytest.raises(NotFoundError):
                await client.get("video_000000000000")
            assert (await client.list()).data[0].id == video.id
            assert (await client.cancel(api.add_job())).status == "cancelled"

    asyncio.run(scenario())


# -- svd-serve client ---------------------------------------------------------------------------------


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main(["client", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_progress(api, capsys, tmp_path):
    api.next_job = {"steps": 3}
    out = tmp_path / "clips" / "clip.mp4"
    code, stdout, stderr = run_main(capsys, "generate", "--url", api.base_url, "--key", KEY, "--image",
                                    SAMPLE_IMAGE, "--out", out, "--num-frames", "6", "--num-inference-steps", "3",
                                    "--width", "64", "--height", "64", "--seed", "7")
    assert code == 0, stderr
    assert out.read_bytes() == CLIP and stdout.startswith(f"{out}: video_") and "seed 7" in stdout
    assert "queued, 1 ahead" in stderr and "queued, 0 ahead" in stderr
    assert re.search(r"sampling: +\d+%.*\| 3/3", stderr), stderr
    fields = api.requests_to("POST", "/v1/videos")[0]["received"]["fields"]
    assert fields == {"num_frames": "6", "num_inference_steps": "3", "width": "64", "height": "64", "seed": "7",
                      "output_format": "mp4"}


def test_cli_exit_codes(api, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SVD_SERVE_URL", raising=False)
    monkeypatch.delenv("SVD_SERVE_API_KEY", raising=False)
    out = tmp_path / "clip.mp4"
    target = ["--url", api.base_url, "--key", KEY]

    def one_line(code: int, stdout: str, stderr: str, expected_code: int, expected: str) -> None:
        assert code == expected_code, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("svd-serve client ") and expected in lines[0], stderr
        assert "Traceback" not in stderr

    one_line(*run_main(capsys, "generate", "--image", SAMPLE_IMAGE, "--out", out), 2, "no server URL")
    one_line(*run_main(capsys, "status", "video_1", "--url", api.base_url), 2, "no API key")
    one_line(*run_main(capsys, "generate", *target, "--image", SAMPLE_IMAGE, "--out", out,
                       "--motion-bucket-id", "300"), 2, "motion_bucket_id: 300 is out of range")
    one_line(*run_main(capsys, "generate", *target, "--image", tmp_path / "missing.png", "--out", out), 2,
             "missing.png")
    one_line(*run_main(capsys, "generate", *target, "--image", SAMPLE_IMAGE, "--out", tmp_path / "c.txt"), 2,
             "--out")
    assert api.requests == []  # every bad input was caught before a request
    one_line(*run_main(capsys, "status", *target, "video_000000000000"), 2, "not found (404 not_found)")
    one_line(*run_main(capsys, "status", "--url", api.base_url, "--key", "wrong", "video_1"), 2, "401")
    api.next_job = {"outcome": "failed"}
    one_line(*run_main(capsys, "generate", *target, "--image", SAMPLE_IMAGE, "--out", out, "--quiet"), 1,
             "failed: the image is broken (invalid_image)")
    assert not out.exists()
    api.fault("POST /v1/videos", (429, {"Retry-After": "3600"}))
    one_line(*run_main(capsys, "generate", *target, "--image", SAMPLE_IMAGE, "--out", out, "--quiet"), 1, "429")


def test_cli_status_cancel_list_from_env(api, capsys, monkeypatch):
    monkeypatch.setenv("SVD_SERVE_URL", api.base_url)
    monkeypatch.setenv("SVD_SERVE_API_KEY", KEY)
    code, stdout, _ = run_main(capsys, "generate", "--image", SAMPLE_IMAGE, "--no-wait", "--seed", "1")
    video_id = stdout.strip()
    assert code == 0 and video_id in api.jobs
    code, stdout, _ = run_main(capsys, "status", video_id)
    assert code == 0 and re.search(rf"id: +{video_id}\n", stdout) and re.search(r"status: +queued, 1 ahead", stdout)
    code, stdout, _ = run_main(capsys, "status", video_id, "--json")
    assert json.loads(stdout)["status"] == "queued" and json.loads(stdout)["a_newer_field"]
    code, stdout, _ = run_main(capsys, "list", "--limit", "5")
    assert code == 0 and stdout.startswith(video_id) and "in_progress" in stdout
    code, stdout, _ = run_main(capsys, "cancel", video_id)
    assert (code, stdout) == (0, f"{video_id}: cancelled\n")
    code, stdout, stderr = run_main(capsys, "list", "--status", "completed", "--json")
    assert code == 0 and json.loads(stdout)["data"] == []


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_cli_against_the_local_service(local_service, tmp_path):
    from pipelines.video import decode_video_frames

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SVD_SERVE_URL": local_service.url,
           "SVD_SERVE_API_KEY": local_service.keys["alice"]}

    def cli(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve.cli", "client", *map(str, args)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "clip.mp4"
    done = cli("generate", "--image", SAMPLE_IMAGE, "--out", out, "--num-frames", "6", "--num-inference-steps", "2",
               "--width", "64", "--height", "64", "--seed", "11")
    assert done.returncode == 0, done.stderr
    assert decode_video_frames(out).shape[:3] == (6, 64, 64)
    video_id = re.match(rf"{re.escape(str(out))}: (\S+),", done.stdout).group(1)

    status = cli("status", video_id, "--json")
    assert status.returncode == 0, status.stderr
    video = json.loads(status.stdout)
    assert (video["object"], video["status"], video["params"]["num_frames"]) == ("video", "completed", 6)
    listed = cli("list", "--json", "--limit", "100")
    assert listed.returncode == 0 and video_id in [v["id"] for v in json.loads(listed.stdout)["data"]]
    refused = cli("cancel", video_id)
    assert refused.returncode == 2 and "already" in refused.stderr and len(refused.stderr.splitlines()) == 1

    submitted = cli("generate", "--image", SAMPLE_IMAGE, "--no-wait", "--num-frames", "14", "--num-inference-steps",
                    "150", "--width", "64", "--height", "64")
    assert submitted.returncode == 0, submitted.stderr
    long_id = submitted.stdout.strip()
    cancelled = cli("cancel", long_id)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"{long_id}: "), cancelled.stderr
    with Client(local_service.url, local_service.keys["alice"]) as client:
        assert client.wait(long_id, timeout=120).status == "cancelled"
