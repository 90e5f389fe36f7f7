"""Hostile input never reaches a 500, and expensive work comes after the cheap checks.

The reproductions of issue #13: each was a 500 with a stack trace in the log and is now a 4xx in
the API's own error shape, with a bounded message. Then the order of admission: a tenant over its
rate limit causes no outbound fetch (a real HTTP server counts the connections it gets), and a
completed job whose clip is gone from storage answers 410 before any redirect.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fixtures_api import make_api
from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.errors import MAX_MESSAGE_CHARS, rejection_for

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
SMALL = {"num_frames": 4, "width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture
def api(tmp_path):
    made = make_api(tmp_path, max_upload_bytes=10 * 1024 * 1024, url_allowlist=["127.0.0.1"],
                    tenants={"alice": {}, "limited": {"rate_limit_per_minute": 1, "burst": 5}})
    client = TestClient(made.app, raise_server_exceptions=False)  # a 500 is an answer here, not a raise
    client.keys, client.service = made.keys, made.service
    yield client
    made.service.store.close()


def h(api, tenant="alice", **extra):
    return {"Authorization": f"Bearer {api.keys[tenant]}", **extra}


def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """The sample PNG with one more chunk before its image data."""
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    at = PNG.index(b"IDAT") - 4
    return PNG[:at] + chunk + PNG[at:]


BOMB = zlib.compress(b"A" * 50_000_000)  # 50 MB of text behind a 49 KB chunk


@pytest.mark.parametrize("name, request_kwargs, status, code", [
    ("unknown webhook event", dict(files={"image": ("a.png", PNG, "image/png")}, data={"webhook_events": "bogus"}),
     422, "invalid_parameter"),
    ("unclosed IPv6 bracket in image_url", dict(json={"image_url": "http://[::1/x.png"}), 422, "url_not_allowed"),
    ("bad IPv6 host in image_url", dict(json={"image_url": "http://[zz]"}), 422, "url_not_allowed"),
    ("NFKC-unsafe host in image_url", dict(json={"image_url": "http://\u2100"}), 422, "url_not_allowed"),
    ("unclosed IPv6 bracket in webhook_url", dict(json={"image_url": "data:image/png;base64,",
                                                        "webhook_url": "http://[::1/x"}), 422, "url_not_allowed"),
    ("zTXt bomb", dict(files={"image": ("a.png", png_with_chunk(b"zTXt", b"Comment\x00\x00" + BOMB), "image/png")}),
     422, "invalid_image"),
    ("iTXt bomb", dict(files={"image": ("a.png", png_with_chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + BOMB),
                                        "image/png")}), 422, "invalid_image"),
    ("iCCP bomb", dict(files={"image": ("a.png", png_with_chunk(b"iCCP", b"icc\x00\x00" + BOMB), "image/png")}),
     422, "invalid_image"),
    ("JSON nested 10,000 deep", dict(content="[" * 10_000 + "]" * 10_000,
                                     headers={"Content-Type": "application/json"}), 422, "invalid_input"),
    ("JSON that is not UTF-8", dict(content=b'{"image_url": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
     422, "invalid_input"),
])
def test_the_reported_500s_are_4xx_in_the_error_shape(api, name, request_kwargs, status, code):
    headers = {**h(api), **request_kwargs.pop("headers", {})}
    response = api.post("/v1/videos", headers=headers, **request_kwargs)
    assert response.status_code == status, (name, response.text)
    assert response.json()["error"]["code"] == code
    assert api.service.store.queue_depth() == 0


@pytest.mark.parametrize("path, shape", [("/v1/video/generations", "openai"), ("/fal-ai/stable-video", "fal")])
def test_the_adapters_answer_malformed_json_in_their_own_shape(api, path, shape):
    for body in ("[" * 10_000 + "]" * 10_000, b"\xff\xfe{}"):
        response = api.post(path, headers=h(api, **{"Content-Type": "application/json"}), content=body)
        assert response.status_code == 422, response.text
        if shape == "openai":
            assert response.json()["error"]["type"] == "invalid_request_error"
        else:
            assert response.json()["detail"][0]["type"] == "json_invalid"


def test_no_message_echoes_input_unbounded(api):
    huge = json.dumps({"x" * 10_000_000: 1, "image_url": "data:,"})
    response = api.post("/v1/videos", headers=h(api, **{"Content-Type": "application/json"}), content=huge)
    assert response.status_code in (413, 422)
    assert len(response.content) < 2 * MAX_MESSAGE_CHARS
    assert len(rejection_for(ValueError("boom")).message) < 100  # a bug's 500 never carries its text


def test_an_unexpected_failure_is_a_500_with_an_error_id_logged_once(api, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(api.service, "check_quota", broken)
    answers = [api.post("/v1/videos", headers=h(api), json={"image_url": "data:,", **SMALL}) for _ in range(5)]
    ids = set()
    for answer in answers:
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
        assert "a bug" not in answer.text and "KeyError" not in answer.text
        error_id = answer.headers["X-Error-Id"]
        assert error_id in answer.json()["error"]["message"]
        ids.add(error_id)
    assert len(ids) == 5
    with_traceback = [r for r in caplog.records if r.exc_info and "unhandled error" in r.getMessage()]
    assert len(with_traceback) <= 1  # the flood logs one traceback, then one line per request


class CountingServer:
    """A real HTTP server on loopback that counts the requests it gets (and answers 404)."""

    def __init__(self) -> None:
        self.count = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                counter.count += 1
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/missing.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_tenant_over_its_rate_limit_causes_no_fetch(api):
    server = CountingServer()
    try:
        answers = [api.post("/v1/videos", headers=h(api, "limited"), json={"image_url": server.url, **SMALL})
                   for _ in range(220)]
    finally:
        server.close()
    statuses = [answer.status_code for answer in answers]
    assert statuses[:5] == [422] * 5  # the burst: fetched, and the image is not there
    assert statuses[5:] == [429] * 215
    assert all(answer.headers.get("Retry-After") for answer in answers if answer.status_code == 429)
    assert server.count == statuses.count(422)  # no connection once the bucket was empty


def test_a_completed_jobs_missing_clip_is_410_before_any_redirect(api):
    from test_compat_fal import finish

    created = api.post("/v1/videos", headers=h(api), json={
        "image_url": "data:image/png;base64," + base64.b64encode(PNG).decode(), **SMALL})
    job_id = created.json()["id"]
    finish(api, job_id)
    assert api.get(f"/v1/videos/{job_id}/content", headers=h(api), follow_redirects=False).status_code in (200, 307)
    job = api.service.store.get(job_id, tenant="alice")
    api.service.storage.delete(job.output.key)
    gone = api.get(f"/v1/videos/{job_id}/content", headers=h(api), follow_redirects=False)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "output_gone"
    assert api.service.store.get(job_id, tenant="alice").output.gone_at is not None


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/video/generations", "/fal-ai/stable-video"])
def test_a_lone_surrogate_or_a_huge_integer_is_a_422_not_a_500(api, path):
    for body in ('{"image_url": "https://example.com/\\ud800", "num_frames": 4}',
                 '{"image_url": "data:,", "seed": ' + "1" * 5000 + "}"):
        response = api.post(path, headers=h(api, **{"Content-Type": "application/json"}), content=body.encode())
        assert 400 <= response.status_code < 500, (path, body[:60], response.text[:300])


def test_fal_validation_details_are_bounded_too(api):
    response = api.post("/fal-ai/stable-video", headers=h(api), json={"x" * 200_000: 1, "image_url": "data:,"})
    assert response.status_code == 422 and len(response.content) < 2_000


def test_a_gone_clip_is_410_through_every_api(api):
    from test_compat_fal import finish

    job_id = api.post("/v1/videos", headers=h(api), json={
        "image_url": "data:image/png;base64," + base64.b64encode(PNG).decode(), **SMALL}).json()["id"]
    finish(api, job_id)
    api.service.store.mark_output_gone(job_id)  # as the janitor's sweep marks it
    fal = api.get(f"/fal-ai/stable-video/requests/{job_id}", headers=h(api))
    generations = api.get(f"/v1/video/generations/{job_id}", headers=h(api))
    assert (fal.status_code, generations.status_code) == (410, 410)
    assert generations.json()["error"]["code"] == "output_gone"
