"""The fal queue protocol adapter (serve/api/compat/fal/).

In process: the FastAPI app over a real SQLite job store and local storage, jobs moved through
their states with the job store's own API (what the runner does), so every route is exercised in
every state: URLs, the input schema, auth, tenant isolation, limits, cancel, result, webhooks;
the same for the text-to-video apps (fal-ai/fast-svd/text-to-video), and the pinned ``fal-client``
against them through the TLS terminator with the app served by uvicorn and a stand-in runner (no Ray).

End to end: the pinned ``fal-client``, exactly as a user runs it (``FAL_KEY``,
``FAL_QUEUE_RUN_HOST``, ``SSL_CERT_FILE``, in its own process since it reads the host at import),
against the local deployment (``svd-serve up``, tiny CPU model) behind a TLS terminator the test
starts (tests/tls_proxy.py): fal's client only builds ``https://`` URLs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fixtures_api import make_api

from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.compat import ADAPTERS
from serve.api.compat.fal import (FAL_APP_ID, FAL_NEGATIVE_PROMPT, FAL_T2V_APP_ID, FAL_T2V_APP_IDS, VIDEO_SIZES,
                                  app_ids, queue_app, webhook_body)
from serve.jobstore import JobError, JobOutput, JobStatus
from serve.storage import Storage
from serve.tenants import rotate_webhook_secret
from serve.webhooks.signing import verify

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}
APP = f"/{FAL_APP_ID}"
HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"  # AppConfig's default model source


@pytest.fixture
def api(tmp_path):
    ended: list[str] = []

    async def on_ended(job_id: str) -> None:
        ended.append(job_id)

    client = make_api(tmp_path, on_ended=on_ended, url_allowlist=["127.0.0.2"], max_upload_bytes=10 * 1024 * 1024,
                      tenants={"alice": {}, "bob": {}, "capped": {"max_num_frames": 8, "max_inference_steps": 10},
                               "one_queued": {"max_queued_jobs": 1}, "slow": {"rate_limit_per_minute": 1, "burst": 1}})
    client.ended = ended
    client.secret = rotate_webhook_secret(client.tenants_file, "alice").webhook_secret
    return client


def h(api, tenant="alice", scheme="Key", **extra):
    return {"Authorization": f"{scheme} {api.keys[tenant]}", **extra}


def submit(api, tenant="alice", path=APP, headers=None, **body):
    return api.post(path, headers=headers or h(api, tenant), json={"image_url": DATA_URL, **SMALL, **body})


def submitted(api, tenant="alice", **body) -> str:
    response = submit(api, tenant, **body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def status(api, request_id, tenant="alice", logs=True):
    return api.get(f"{APP}/requests/{request_id}/status", params={"logs": "1"} if logs else None,
                   headers=h(api, tenant))


def claim(api, request_id):
    return api.service.store.claim(request_id, owner="test-runner", lease_s=30)


FAKE_MP4 = b"\x00\x00\x00\x18ftypisom fake mp4"


def finish(api, request_id, data=FAKE_MP4):
    """Drive a job to completed the way the runner does."""
    store, storage = api.service.store, api.service.storage
    job = claim(api, request_id)
    stored = storage.put(job.output_key, data, content_type="video/mp4")
    store.update_progress(request_id, owner="test-runner", stage="sampling", step=2, total_steps=2,
                          timings={"image_encode": 0.25})
    store.complete(request_id, owner="test-runner", timings={"sampling": 1.5, "decode": 0.25, "video_encode": 0.5},
                   output=JobOutput(key=job.output_key, content_type="video/mp4", file_name=f"{request_id}.mp4",
                                    file_size=stored.size, num_frames=4, fps=25.0, width=64, height=64))


def fail(api, request_id, code="internal_error", message="generation failed inside the service"):
    claim(api, request_id)
    api.service.store.fail(request_id, owner="test-runner", error=JobError(code=code, message=message))


def assert_detail(response, status_code, contains="", error_type=None):
    assert response.status_code == status_code, response.text
    body = response.json()
    assert "detail" in body and "error" not in body, body
    assert contains in json.dumps(body["detail"])
    if error_type is not None:
        assert response.headers["x-fal-error-type"] == error_type
    assert "Traceback" not in response.text


# -- registration and routing ---------------------------------------------------------------------


def test_registered_and_answering_at_fal_and_model_ids(api):
    assert "fal" in ADAPTERS
    assert app_ids(HUB_ID) == [FAL_APP_ID, HUB_ID]
    assert app_ids("/models/tiny") == [FAL_APP_ID] and app_ids("v1/videos") == [FAL_APP_ID]
    for path in (APP, f"/{HUB_ID}"):
        response = submit(api, path=path)
        assert response.status_code == 200, response.text
        assert response.json()["status_url"].startswith(f"http://testserver{path}/requests/")
    # The literal app paths never shadow the native routes (POST /v1/videos is also two segments).
    native = api.post("/v1/videos", headers=h(api), json={"image_url": DATA_URL, **SMALL})
    assert native.status_code == 202 and native.json()["id"].startswith("vid_")
    listed = api.get("/v1/videos", headers=h(api)).json()["data"]
    assert len(listed) == 3  # one service: fal requests are ordinary jobs of the tenant
    assert api.get("/fal-ai/other-app/requests/x/status", headers=h(api)).status_code == 404


def test_submit_answers_absolute_urls_honouring_forwarded_headers(api):
    plain = submit(api).json()
    request_id = plain["request_id"]
    assert plain["status"] == "IN_QUEUE" and plain["queue_position"] == 0
    base = f"http://testserver{APP}/requests/{request_id}"
    assert (plain["response_url"], plain["status_url"], plain["cancel_url"]) == (base, base + "/status",
                                                                               base + "/cancel")
    behind_tls = submit(api, headers=h(api, **{"X-Forwarded-Proto": "https", "Host": "svd.example.com:8443"})).json()
    assert behind_tls["status_url"] == f"https://svd.example.com:8443{APP}/requests/{behind_tls['request_id']}/status"
    forwarded_host = submit(api, headers=h(api, **{"X-Forwarded-Proto": "https, http",
                                                  "X-Forwarded-Host": "api.example.com"})).json()
    assert forwarded_host["response_url"].startswith(f"https://api.example.com{APP}/requests/")
    # Junk in the forwarding headers never makes it into a URL.
    junk = submit(api, headers=h(api, **{"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "a/b c"})).json()
    assert junk["response_url"].startswith("http://testserver/")
    assert status(api, request_id, logs=False).json()["status_url"] == base + "/status"


# -- input schema ---------------------------------------------------------------------------------


def test_input_maps_onto_generation_params(api):
    request_id = submitted(api, seed=42, motion_bucket_id=30, cond_aug=0.5, fps=12)
    params = api.service.store.get(request_id, tenant="alice").params
    assert params["seed"] == 42 and params["motion_bucket_id"] == 30
    assert params["noise_aug_strength"] == 0.5  # cond_aug
    assert params["output_fps"] == 12  # fal's fps: the frame rate of the generated video
    assert params["fps"] == 7  # the conditioning keeps the model's default
    assert params["output_format"] == "mp4" and params["num_frames"] == 4
    defaults = api.service.store.get(api.post(APP, headers=h(api), json={"image_url": DATA_URL}).json()["request_id"],
                                     tenant="alice").params
    assert (defaults["motion_bucket_id"], defaults["noise_aug_strength"], defaults["output_fps"]) == (127, 0.02, 25)
    assert defaults["num_frames"] == 14 and 0 <= defaults["seed"] <= 2**32 - 2
    preset = submitted(api, aspect_ratio="1:1", width=None, height=None)
    claim(api, preset)
    assert status(api, preset).json()["logs"][0]["message"].startswith("Started: 4 frames at 768x768")


@pytest.mark.parametrize("body, field, kind", [
    ({"prompt": "a cat"}, "prompt", "extra_forbidden"),
    ({"output_format": "gif"}, "output_format", "extra_forbidden"),
    ({"noise_aug_strength": 0.1}, "noise_aug_strength", "extra_forbidden"),
    ({"motion_bucket_id": 0}, "motion_bucket_id", "greater_than_equal"),
    ({"motion_bucket_id": 256}, "motion_bucket_id", "less_than_equal"),
    ({"cond_aug": 10.5}, "cond_aug", "less_than_equal"),
    ({"fps": 9}, "fps", "greater_than_equal"),
    ({"fps": 101}, "fps", "less_than_equal"),
    ({"seed": -1}, "seed", "greater_than_equal"),
    ({"num_frames": 65}, "num_frames", "less_than_equal"),
    ({"width": 100, "height": 64}, "width", "multiple_of"),
])
def test_invalid_input_is_422_in_fals_shape_naming_the_field(api, body, field, kind):
    response = submit(api, **body)
    assert_detail(response, 422, error_type="invalid_parameter")
    detail = response.json()["detail"]
    assert {"loc": ["body", field], "type": kind} == {k: detail[0][k] for k in ("loc", "type")}, detail
    assert detail[0]["msg"]
    assert api.service.store.queue_depth("alice") == 0


def test_every_unknown_field_is_named_and_image_url_is_required(api):
    response = api.post(APP, headers=h(api), json={"prompt": "x", "negative_prompt": "y", "fps": 5})
    assert_detail(response, 422)
    locs = {tuple(item["loc"]): item["type"] for item in response.json()["detail"]}
    assert locs == {("body", "image_url"): "missing", ("body", "prompt"): "extra_forbidden",
                    ("body", "negative_prompt"): "extra_forbidden", ("body", "fps"): "greater_than_equal"}


def test_fal_fps_range_is_served_whole_and_cross_field_errors(api):
    # fal's schema allows up to 100 frames per second: the clip's playback rate goes that high too.
    assert submit(api, fps=100).status_code == 200
    assert_detail(submit(api, width=64, height=None), 422, "width and height must be given together")


@pytest.mark.parametrize("raw, contains", [(b"{", "JSON decode error"), (b"[1]", "JSON object"),
                                           (b"", "JSON object")])
def test_malformed_bodies(api, raw, contains):
    response = api.post(APP, headers={**h(api), "Content-Type": "application/json"}, content=raw)
    assert_detail(response, 422, contains)


def test_image_errors_and_ssrf_are_422_with_detail(api):
    assert_detail(submit(api, image_url="data:image/png;base64,!!!"), 422, "not valid base64", "invalid_image")
    assert_detail(submit(api, image_url="http://169.254.169.254/latest/meta-data"), 422, error_type="url_not_allowed")


# -- auth and tenancy -----------------------------------------------------------------------------


def test_key_and_bearer_schemes_and_401_detail(api):
    assert submit(api, headers=h(api, scheme="Key")).status_code == 200
    assert submit(api, headers=h(api, scheme="Bearer")).status_code == 200
    assert_detail(api.post(APP, json={"image_url": DATA_URL}), 401, "Authorization", "unauthorized")
    assert_detail(api.post(APP, headers={"Authorization": "Key nope"}, json={"image_url": DATA_URL}), 401)
    request_id = submitted(api)
    assert_detail(api.get(f"{APP}/requests/{request_id}/status"), 401)


def test_another_tenants_request_is_404_on_every_route(api):
    request_id = submitted(api)
    base = f"{APP}/requests/{request_id}"
    for method, path in [("GET", base + "/status"), ("GET", base), ("GET", base + "/status/stream"),
                         ("PUT", base + "/cancel")]:
        response = api.request(method, path, headers=h(api, "bob"))
        assert_detail(response, 404, "not found", "not_found")
        assert request_id in response.json()["detail"]
    assert api.get(base + "/status", headers=h(api)).json()["status"] == "IN_QUEUE"  # untouched
    assert api.service.store.get(request_id, tenant="alice").status is JobStatus.QUEUED


# -- limits ---------------------------------------------------------------------------------------


def test_tenant_caps_queue_and_rate_limits_hold(api):
    capped = submit(api, "capped", num_frames=12, num_inference_steps=20)
    assert_detail(capped, 422, "num_frames 12 exceeds", "limit_exceeded")
    assert "num_inference_steps" in capped.json()["detail"]
    assert submit(api, "capped", num_frames=8).status_code == 200

    assert submit(api, "one_queued").status_code == 200
    full = submit(api, "one_queued")
    assert_detail(full, 429, "queue full", "queue_full")
    assert int(full.headers["retry-after"]) > 0

    assert submit(api, "slow").status_code == 200
    limited = submit(api, "slow")
    assert_detail(limited, 429, "rate limit", "rate_limited")
    assert int(limited.headers["retry-after"]) > 0


# -- status, logs, result, cancel -----------------------------------------------------------------


def test_status_through_the_lifecycle_with_logs_and_metrics(api):
    first, second = submitted(api, seed=5), submitted(api)
    queued = status(api, second).json()
    assert queued["status"] == "IN_QUEUE" and queued["queue_position"] == 1

    claim(api, first)
    assert status(api, second).json()["queue_position"] == 0
    api.service.store.update_progress(first, owner="test-runner", stage="sampling", step=1, total_steps=2,
                                      timings={"image_encode": 0.25})
    running = status(api, first).json()
    assert running["status"] == "IN_PROGRESS"
    messages = [line["message"] for line in running["logs"]]
    assert messages[0].startswith("Started: 4 frames at 64x64, 2 steps, seed 5")
    assert "image_encode: done in 0.25 s" in messages
    assert "sampling: running" in messages and "sampling: step 1/2" in messages
    assert all(set(line) == {"message", "level", "source", "timestamp"} for line in running["logs"])
    assert status(api, first, logs=False).json()["logs"] is None  # fal's clients read the key either way

    api.service.store.release(first, owner="test-runner")
    finish(api, first)
    done = status(api, first).json()
    assert done["status"] == "COMPLETED" and "error" not in done
    assert done["metrics"] == {"inference_time": 2.5}
    assert done["logs"][-1]["message"].startswith(f"Completed: {first}.mp4 (4 frames")
    assert {"sampling: done in 1.50 s", "video_encode: done in 0.50 s"} <= {line["message"] for line in done["logs"]}


def test_failed_and_cancelled_jobs_are_completed_with_the_error(api):
    failed, bad_input, cancelled = submitted(api), submitted(api), submitted(api)
    fail(api, failed)
    fail(api, bad_input, code="invalid_image", message="the image could not be decoded")
    assert api.put(f"{APP}/requests/{cancelled}/cancel", headers=h(api)).status_code == 202

    body = status(api, failed).json()
    assert (body["status"], body["error_type"]) == ("COMPLETED", "internal_error")
    assert body["error"] == "generation failed inside the service"
    assert body["logs"][-1] == {**body["logs"][-1], "level": "ERROR"}
    body = status(api, cancelled).json()
    assert (body["status"], body["error_type"], body["error"]) == ("COMPLETED", "request_cancelled",
                                                                  "Request was cancelled")

    assert_detail(api.get(f"{APP}/requests/{failed}", headers=h(api)), 500, "inside the service", "internal_error")
    assert_detail(api.get(f"{APP}/requests/{bad_input}", headers=h(api)), 422, "could not be decoded",
                  "invalid_image")
    assert_detail(api.get(f"{APP}/requests/{cancelled}", headers=h(api)), 400, "cancelled", "request_cancelled")


def test_result_of_a_completed_request(api):
    request_id = submitted(api, seed=9)
    assert_detail(api.get(f"{APP}/requests/{request_id}", headers=h(api)), 400, "still in progress")
    finish(api, request_id)
    result = api.get(f"{APP}/requests/{request_id}", headers=h(api, **{"X-Forwarded-Proto": "https"}))
    assert result.status_code == 200
    body = result.json()
    assert body["seed"] == 9
    video = body.pop("video")
    assert body == {"seed": 9}
    assert {k: video[k] for k in ("content_type", "file_name", "file_size")} == {
        "content_type": "video/mp4", "file_name": f"{request_id}.mp4", "file_size": len(FAKE_MP4)}
    assert api.get(video["url"].replace("https://", "http://"), headers=key_for(video["url"], api)).content == FAKE_MP4


def key_for(url: str, api_or_key) -> dict[str, str]:
    """Headers to download a result's video URL: none for a signed URL (fal's URLs need no key;
    storages that sign URLs), our API key for the keyed /v1/videos/{id}/content fallback."""
    if "/v1/videos/" not in url:
        assert "signature=" in url or "Signature=" in url, url
        return {}
    key = api_or_key if isinstance(api_or_key, str) else api_or_key.keys["alice"]
    return {"Authorization": f"Key {key}"}


def test_video_url_needs_no_key_where_storage_signs_urls(api):
    request_id = submitted(api)
    finish(api, request_id)
    url = api.get(f"{APP}/requests/{request_id}", headers=h(api)).json()["video"]["url"]
    if not hasattr(Storage, "signed_url"):
        assert url == f"http://testserver/v1/videos/{request_id}/content"
        pytest.skip("this storage layer signs no URLs: the result links the keyed content route")
    assert url.startswith("http://testserver/files/") and "signature=" in url
    assert api.get(url).content == FAKE_MP4  # no Authorization header


def test_cancel_in_every_state_never_409(api):
    queued, running, done, failed = submitted(api), submitted(api), submitted(api), submitted(api)
    response = api.put(f"{APP}/requests/{queued}/cancel", headers=h(api))
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert api.ended == [queued]  # metered and announced now: no runner will see it
    assert api.service.store.get(queued, tenant="alice").status is JobStatus.CANCELLED
    again = api.put(f"{APP}/requests/{queued}/cancel", headers=h(api))
    assert again.status_code == 202 and api.ended == [queued]

    claim(api, running)
    response = api.put(f"{APP}/requests/{running}/cancel", headers=h(api))
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    job = api.service.store.get(running, tenant="alice")
    assert job.status is JobStatus.IN_PROGRESS and job.cancel_requested  # the runner stops it
    assert api.ended == [queued]

    finish(api, done)
    fail(api, failed)
    for request_id in (done, failed):
        response = api.put(f"{APP}/requests/{request_id}/cancel", headers=h(api))
        assert response.status_code == 400, response.text
        assert response.json()["status"] == "ALREADY_COMPLETED" and response.json()["detail"]
    assert_detail(api.put(f"{APP}/requests/vid_nope/cancel", headers=h(api)), 404)


def test_status_stream_sends_each_change_until_completed(api):
    done = submitted(api)
    finish(api, done)
    with api.stream("GET", f"{APP}/requests/{done}/status/stream", params={"logs": "1"}, headers=h(api)) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert [event["status"] for event in events] == ["COMPLETED"] and events[0]["logs"]

    queued = submitted(api)
    seen = []
    with api.stream("GET", f"{APP}/requests/{queued}/status/stream", headers=h(api)) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            seen.append(json.loads(line[len("data: "):]))
            if len(seen) == 1:
                threading.Timer(0.2, lambda: api.service.store.request_cancel(queued, tenant="alice")).start()
    assert [event["status"] for event in seen] == ["IN_QUEUE", "COMPLETED"]
    assert seen[0]["queue_position"] == 0 and seen[0]["logs"] is None
    assert seen[-1]["error_type"] == "request_cancelled"


# -- webhooks -------------------------------------------------------------------------------------


def test_fal_webhook_is_subscribed_in_fals_format(api):
    response = api.post(APP, params={"fal_webhook": "http://127.0.0.2:9/hook"}, headers=h(api),
                        json={"image_url": DATA_URL, **SMALL})
    assert response.status_code == 200, response.text
    job = api.service.store.get(response.json()["request_id"], tenant="alice")
    assert job.webhook.url == "http://127.0.0.2:9/hook" and job.webhook.format == "fal"
    assert job.webhook.events == []  # fal calls back once, when the request ends
    assert_detail(api.post(APP, params={"fal_webhook": "http://10.1.2.3/hook"}, headers=h(api),
                           json={"image_url": DATA_URL}), 422, error_type="url_not_allowed")


def test_webhook_bodies_in_fals_shape(api):
    done, failed, cancelled = submitted(api, seed=3), submitted(api), submitted(api)
    finish(api, done)
    fail(api, failed, code="invalid_image", message="bad image")
    api.service.store.request_cancel(cancelled, tenant="alice")
    store = api.service.store

    body = json.loads(webhook_body(store.get(done, tenant=None), "video.completed", "evt_1", "https://svd.example"))
    assert body == {"request_id": done, "gateway_request_id": done, "status": "OK", "error": None,
                    "payload": {"seed": 3, "video": {"url": f"https://svd.example/v1/videos/{done}/content",
                                                     "content_type": "video/mp4", "file_name": f"{done}.mp4",
                                                     "file_size": len(FAKE_MP4)}}}
    body = json.loads(webhook_body(store.get(failed, tenant=None), "video.failed", "evt_2", ""))
    assert body == {"request_id": failed, "gateway_request_id": failed, "status": "ERROR", "error": "bad image",
                    "payload": {"detail": "bad image", "error_type": "invalid_image"}}
    body = json.loads(webhook_body(store.get(cancelled, tenant=None), "video.cancelled", "evt_3", ""))
    assert (body["status"], body["payload"]["error_type"]) == ("ERROR", "request_cancelled")


# -- text-to-video: fal-ai/fast-svd/text-to-video ---------------------------------------------------

T2V = f"/{FAL_T2V_APP_ID}"
T2V_QUEUE = f"/{queue_app(FAL_T2V_APP_ID)}"  # fal's queue names requests by owner/alias: fal-ai/fast-svd


def t2v(api, tenant="alice", path=T2V, **body):
    return api.post(path, headers=h(api, tenant), json={"prompt": "a rocket taking off", **body})


def unsigned(result: dict) -> dict:
    """A result with its signed URL's query dropped: asked a second later, the same clip's URL
    carries a later expiry (and so another signature)."""
    video = {**result["video"], "url": result["video"]["url"].split("?", 1)[0]}
    return {**result, "video": video}


def t2v_submitted(api, tenant="alice", **body) -> str:
    response = t2v(api, tenant, **body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def test_text_to_video_apps_admit_a_prompt_with_fals_defaults(api):
    assert queue_app(FAL_T2V_APP_ID) == "fal-ai/fast-svd" and queue_app(FAL_APP_ID) == FAL_APP_ID
    for app_id in FAL_T2V_APP_IDS:
        response = t2v(api, path=f"/{app_id}")
        assert response.status_code == 200, response.text
        answer = response.json()
        base = f"http://testserver/{queue_app(app_id)}/requests/{answer['request_id']}"
        assert (answer["status"], answer["response_url"], answer["status_url"]) == ("IN_QUEUE", base, base + "/status")
        job = api.service.store.get(answer["request_id"], tenant="alice")
        assert job.route[0] == "text_to_image" and not job.input_key  # no image stored
        assert job.prompt == "a rocket taking off" and job.params["prompt"] == "a rocket taking off"
        params = job.params
        # fal's defaults of fast-svd's text-to-video, where ours differ.
        assert params["negative_prompt"] == FAL_NEGATIVE_PROMPT
        assert (params["num_inference_steps"], params["output_fps"], params["fps"]) == (20, 10, 7)
        assert (params["width"], params["height"]) == (1024, 576)  # landscape_16_9
        assert (params["motion_bucket_id"], params["noise_aug_strength"]) == (127, 0.02)
        assert params["output_format"] == "mp4" and params["num_frames"] == 14
    # The native view of the job is the same text-to-video job.
    listed = api.get("/v1/videos", headers=h(api)).json()["data"]
    assert len(listed) == 2 and all(video["prompt"] == "a rocket taking off" for video in listed)


def test_text_to_video_input_maps_onto_generation_params(api):
    request_id = t2v_submitted(api, prompt="a lighthouse", negative_prompt="blurry", seed=7, motion_bucket_id=40,
                               cond_aug=0.1, steps=12, fps=24, deep_cache="none", num_frames=8,
                               t2i_num_inference_steps=4, t2i_guidance_scale=0.0, min_guidance_scale=1.5,
                               max_guidance_scale=2.5)
    params = api.service.store.get(request_id, tenant="alice").params
    assert (params["prompt"], params["negative_prompt"], params["seed"]) == ("a lighthouse", "blurry", 7)
    assert (params["motion_bucket_id"], params["noise_aug_strength"], params["num_inference_steps"]) == (40, 0.1, 12)
    assert (params["output_fps"], params["num_frames"]) == (24, 8)
    assert (params["t2i_num_inference_steps"], params["t2i_guidance_scale"]) == (4, 0.0)
    assert (params["min_guidance_scale"], params["max_guidance_scale"]) == (1.5, 2.5)
    # Long clips and interpolation are ours, accepted by every app.
    long_clip = t2v_submitted(api, duration_s=4, interpolation="blend", fps=24)
    params = api.service.store.get(long_clip, tenant="alice").params
    assert (params["duration_s"], params["interpolation"]) == (4, "blend")
    image_long = submitted(api, duration_s=2, interpolation="mci")
    assert api.service.store.get(image_long, tenant="alice").params["duration_s"] == 2


@pytest.mark.parametrize("video_size, size", [
    *((name, f"{w}x{h}") for name, (w, h) in VIDEO_SIZES.items()),
    ({"width": 640, "height": 360}, "640x360"),
    ({"width": 1024, "height": 1024}, "1024x1024"),  # fal's own square_hd, when asked for by size
    ({"width": 1536, "height": 864}, "1536x864"),
])
def test_fal_video_sizes_map_onto_ours(api, video_size, size):
    params = api.service.store.get(t2v_submitted(api, video_size=video_size), tenant="alice").params
    assert f"{params['width']}x{params['height']}" == size


def test_fal_video_size_names_are_the_svd_presets():
    assert VIDEO_SIZES == {"square_hd": (768, 768), "square": (768, 768), "portrait_4_3": (768, 1024),
                           "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768),
                           "landscape_16_9": (1024, 576)}


@pytest.mark.parametrize("body, loc, kind, contains", [
    ({"deep_cache": "high"}, ["deep_cache"], "unsupported_value", "DeepCache is not implemented"),
    ({"deep_cache": "minimum"}, ["deep_cache"], "unsupported_value", "'minimum' is refused"),
    ({"deep_cache": "medium"}, ["deep_cache"], "unsupported_value", "deep_cache 'none'"),
    ({"deep_cache": "turbo"}, ["deep_cache"], "literal_error", "'high'"),
    ({"video_size": "huge"}, ["video_size"], "literal_error", "landscape_16_9"),
    ({"video_size": {"width": 100, "height": 64}}, ["video_size", "width"], "multiple_of", "multiple of 8"),
    ({"video_size": {"width": 1600, "height": 512}}, ["video_size", "width"], "less_than_equal", "1536"),
    ({"video_size": {"width": 1536, "height": 1024}}, [], "value_error", "at most 1327104"),
    ({"video_size": {"width": 512, "depth": 3}}, ["video_size", "depth"], "extra_forbidden", ""),
    ({"steps": 0}, ["steps"], "greater_than_equal", ""),
    ({"fps": 101}, ["fps"], "less_than_equal", ""),
    ({"cond_aug": 11}, ["cond_aug"], "less_than_equal", ""),
    ({"prompt": ""}, ["prompt"], "string_too_short", ""),
    ({"image_url": DATA_URL}, ["image_url"], "extra_forbidden", "submit to fal-ai/stable-video"),
    ({"num_inference_steps": 5}, ["num_inference_steps"], "extra_forbidden", "as steps"),
    ({"width": 512, "height": 512}, ["width"], "extra_forbidden", "video_size"),
    ({"duration_s": 4, "interpolation": "none"}, [], "value_error", "duration_s retimes"),
])
def test_text_to_video_input_errors_are_422_in_fals_shape(api, body, loc, kind, contains):
    response = t2v(api, **body)
    assert_detail(response, 422, contains, error_type="invalid_parameter")
    detail = response.json()["detail"]
    assert {"loc": ["body", *loc], "type": kind} in [{k: item[k] for k in ("loc", "type")} for item in detail], detail
    assert api.service.store.queue_depth("alice") == 0


def test_prompt_is_required_and_deep_cache_none_is_accepted(api):
    response = api.post(T2V, headers=h(api), json={"deep_cache": "none"})
    assert_detail(response, 422)
    assert response.json()["detail"] == [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]
    assert t2v(api, deep_cache="none").status_code == 200
    assert t2v(api, deep_cache=None).status_code == 200


def test_the_image_app_refuses_a_prompt_naming_the_text_to_video_app(api):
    response = submit(api, prompt="a cat", negative_prompt="blur", t2i_num_inference_steps=4)
    assert_detail(response, 422, FAL_T2V_APP_ID)
    kinds = {tuple(item["loc"]): item["type"] for item in response.json()["detail"]}
    assert kinds == {("body", "prompt"): "extra_forbidden", ("body", "negative_prompt"): "extra_forbidden",
                     ("body", "t2i_num_inference_steps"): "extra_forbidden"}
    assert api.service.store.queue_depth("alice") == 0


def test_text_to_video_unavailable_without_a_text_to_image_model(tmp_path):
    api = make_api(tmp_path, text_to_image_model=None)
    response = t2v(api)
    assert_detail(response, 422, "no text-to-image model", error_type="text_to_video_unavailable")
    assert api.service.store.queue_depth() == 0
    assert submit(api).status_code == 200  # image-to-video is unaffected


def test_text_to_video_requests_follow_the_queue_protocol(api):
    request_id = t2v_submitted(api, seed=5)
    for prefix in (T2V_QUEUE, T2V):  # fal_client's URLs (owner/alias), and the full app id
        path = f"{prefix}/requests/{request_id}"
        queued = api.get(path + "/status", headers=h(api)).json()
        assert queued["status"] == "IN_QUEUE" and queued["status_url"].endswith(f"{T2V_QUEUE}/requests/{request_id}"
                                                                                "/status")
        assert_detail(api.get(path, headers=h(api)), 400, "still in progress")
    claim(api, request_id)
    running = api.get(f"{T2V_QUEUE}/requests/{request_id}/status", params={"logs": 1}, headers=h(api)).json()
    assert running["status"] == "IN_PROGRESS"
    assert running["logs"][0]["message"].startswith("Started: text-to-video: 14 frames at 1024x576, 20 steps, seed 5")
    api.service.store.update_progress(request_id, owner="test-runner", stage="text_to_image", step=3,
                                      total_steps=30)
    logs = api.get(f"{T2V_QUEUE}/requests/{request_id}/status", params={"logs": 1}, headers=h(api)).json()["logs"]
    assert [line["message"] for line in logs[1:]] == ["text_to_image: running", "text_to_image: step 3/30"]
    store, storage = api.service.store, api.service.storage
    job = store.get(request_id, tenant="alice")
    stored = storage.put(job.output_key, FAKE_MP4, content_type="video/mp4")
    store.complete(request_id, owner="test-runner", timings={"text_to_image": 2.0, "sampling": 1.5},
                   output=JobOutput(key=job.output_key, content_type="video/mp4", file_name=f"{request_id}.mp4",
                                    file_size=stored.size, num_frames=14, fps=10.0, width=1024, height=576))
    for prefix in (T2V_QUEUE, T2V):
        result = api.get(f"{prefix}/requests/{request_id}", headers=h(api))
        assert result.status_code == 200, result.text
        assert set(result.json()) == {"video", "seed"} and result.json()["seed"] == 5
        assert result.json()["video"]["file_size"] == len(FAKE_MP4)
    done = api.get(f"{T2V_QUEUE}/requests/{request_id}/status", params={"logs": 1}, headers=h(api)).json()
    assert done["status"] == "COMPLETED" and done["metrics"]["inference_time"] == 3.5
    assert any(line["message"] == "text_to_image: done in 2.00 s" for line in done["logs"])
    cancel = api.put(f"{T2V_QUEUE}/requests/{request_id}/cancel", headers=h(api))
    assert cancel.status_code == 400 and cancel.json()["status"] == "ALREADY_COMPLETED"
    # Another tenant's request is a 404 under the text-to-video app too.
    assert_detail(api.get(f"{T2V_QUEUE}/requests/{request_id}/status", headers=h(api, "bob")), 404)
    # Cancelling a queued text-to-video request.
    queued = t2v_submitted(api)
    assert api.put(f"{T2V}/requests/{queued}/cancel", headers=h(api)).status_code == 202
    assert api.ended == [queued]


def test_text_to_video_tenant_caps_and_idempotency(api):
    assert_detail(t2v(api, "capped", num_frames=9), 422, "num_frames 9 exceeds", error_type="limit_exceeded")
    assert_detail(t2v(api, "capped", steps=11), 422, "num_inference_steps 11", error_type="limit_exceeded")
    headers = h(api, **{"Idempotency-Key": "t2v-1"})
    first = api.post(T2V, headers=headers, json={"prompt": "a boat"})
    again = api.post(T2V, headers=headers, json={"prompt": "a boat"})
    assert first.json()["request_id"] == again.json()["request_id"]
    assert_detail(api.post(T2V, headers=headers, json={"prompt": "a car"}), 409, error_type="idempotency_key_reused")



# -- fal-client against text-to-video, in process (no Ray): uvicorn, the TLS terminator, a stand-in runner


@contextlib.contextmanager
def served_in_process(api, workdir: Path):
    """``api``'s app on a loopback port behind the TLS terminator, with a thread that finishes
    every queued job the way the runner does (``finish``)."""
    from threads import uvicorn_in_thread
    from tls_proxy import TLSProxy

    stop = threading.Event()

    def run_jobs():
        while not stop.wait(0.05):
            for job in api.service.store.queued_heads():
                finish(api, job.id)

    runner = threading.Thread(target=run_jobs, daemon=True)
    runner.start()
    try:
        with uvicorn_in_thread(api.app) as base_url, TLSProxy(base_url, workdir) as proxy:
            yield proxy
    finally:
        stop.set()
        runner.join(5)


def test_fal_client_text_to_video_in_process(tmp_path):
    """fal_client's submit/status/result/cancel and subscribe against fal-ai/fast-svd/text-to-video:
    its app-id-built URLs (fal_client.status / result / cancel use owner/alias, fal-ai/fast-svd)
    reach the requests, and the prompt reaches text-to-video."""
    api = make_api(tmp_path, max_upload_bytes=10 * 1024 * 1024)
    with served_in_process(api, tmp_path / "tls") as proxy:
        out = run_fal_client((api, proxy), "flow", {"prompt": "a rocket", "seed": 11, "steps": 2,
                                                    "video_size": "portrait_16_9"}, tmp_path, app=FAL_T2V_APP_ID)
        subscribed = run_fal_client((api, proxy), "subscribe", {"prompt": "a boat", "deep_cache": "none"}, tmp_path,
                                    app=FAL_T2V_APP_ID)
        refused = run_fal_client((api, proxy), "refused", {"prompt": "a boat", "deep_cache": "high"}, tmp_path,
                                 app=FAL_T2V_APP_ID)
    request_id = out["handle"]["request_id"]
    base = f"https://{proxy.host}/fal-ai/fast-svd/requests/{request_id}"
    assert (out["handle"]["response_url"], out["handle"]["status_url"]) == (base, base + "/status")
    assert out["events"][-1]["type"] == "Completed" and out["status"]["type"] == "Completed"
    assert unsigned(out["result"]) == unsigned(out["result_again"]) and out["result"]["seed"] == 11
    assert out["cancel"]["status_code"] == 400 and out["cancel"]["body"]["status"] == "ALREADY_COMPLETED"
    assert (tmp_path / "flow.mp4").read_bytes() == FAKE_MP4
    job = api.service.store.get(request_id, tenant="alice")
    assert job.route[0] == "text_to_image" and job.params["prompt"] == "a rocket"
    assert (job.params["width"], job.params["height"], job.params["num_inference_steps"]) == (576, 1024, 2)

    assert subscribed["updates"][-1]["type"] == "Completed" and len(subscribed["enqueued"]) == 1
    assert api.service.store.get(subscribed["enqueued"][0], tenant="alice").params["prompt"] == "a boat"
    assert refused["error"]["status_code"] == 422 and refused["error"]["error_type"] == "invalid_parameter"
    assert refused["error"]["body"]["detail"][0]["loc"] == ["body", "deep_cache"]


# -- end to end: fal-client through TLS against the local deployment -------------------------------

#: Runs in its own process: fal_client reads FAL_QUEUE_RUN_HOST when it is imported.
FAL_CLIENT_SCRIPT = r"""
import dataclasses, json, os, sys
import fal_client, httpx

app, scenario, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"queue_url_format": fal_client.client.QUEUE_URL_FORMAT}

def shown(status):
    return {"type": type(status).__name__, **dataclasses.asdict(status)}

def key_headers(url):
    # fal's video URLs need no key; so does ours where storage signs URLs (else the keyed route).
    return {"Authorization": "Key " + os.environ["FAL_KEY"]} if "/v1/videos/" in url else {}

def http_error(error):
    return {"status_code": error.status_code, "message": str(error), "error_type": error.error_type,
            "body": error.response.json()}

if scenario == "flow":
    handle = fal_client.submit(app, arguments=args, webhook_url=os.environ.get("WEBHOOK_URL"))
    out["handle"] = {k: getattr(handle, k) for k in ("request_id", "response_url", "status_url", "cancel_url")}
    out["events"] = [shown(s) for s in handle.iter_events(with_logs=True, interval=0.1)]
    out["status"] = shown(fal_client.status(app, handle.request_id, with_logs=True))
    out["result"] = handle.get()
    out["result_again"] = fal_client.result(app, handle.request_id)
    try:
        fal_client.cancel(app, handle.request_id)
        out["cancel"] = "accepted"
    except fal_client.FalClientHTTPError as error:
        out["cancel"] = http_error(error)
    # Download the clip as a fal user would, with their key (redirects to storage are followed).
    video = httpx.get(out["result"]["video"]["url"], headers=key_headers(out["result"]["video"]["url"]),
                      follow_redirects=True)
    video.raise_for_status()
    open(os.environ["VIDEO_PATH"], "wb").write(video.content)
elif scenario == "subscribe":
    updates, enqueued = [], []
    out["result"] = fal_client.subscribe(app, arguments=args, with_logs=True, interval=0.1,
                                         on_enqueue=enqueued.append, on_queue_update=lambda s: updates.append(shown(s)))
    out["enqueued"], out["updates"] = enqueued, updates
    video = httpx.get(out["result"]["video"]["url"], headers=key_headers(out["result"]["video"]["url"]))
    video.raise_for_status()
    open(os.environ["VIDEO_PATH"], "wb").write(video.content)
elif scenario == "refused":
    try:
        fal_client.submit(app, arguments=args)
        out["error"] = None
    except fal_client.FalClientHTTPError as error:
        out["error"] = http_error(error)
elif scenario == "cancel":
    handle = fal_client.submit(app, arguments=args)
    out["request_id"] = handle.request_id
    handle.cancel()
    out["events"] = [shown(s) for s in handle.iter_events(with_logs=True, interval=0.1)]
    try:
        handle.get()
    except fal_client.FalClientHTTPError as error:
        out["result_error"] = http_error(error)
print("RESULT " + json.dumps(out))
"""


class WebhookReceiver:
    """Records POSTs on 127.0.0.1 (the local deployment's url_allowlist) and answers 200."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"headers": dict(self.headers.items()), "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fal-hook"

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fal_deployment(local_service, tmp_path_factory):
    from tls_proxy import TLSProxy

    with TLSProxy(local_service.url, tmp_path_factory.mktemp("tls")) as proxy:
        yield local_service, proxy


def run_fal_client(deployment, scenario: str, arguments: dict, tmp_path: Path, tenant="alice", app=FAL_APP_ID,
                   **env) -> dict:
    service, proxy = deployment
    environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    environment.update(FAL_KEY=service.keys[tenant], FAL_QUEUE_RUN_HOST=proxy.host, SSL_CERT_FILE=str(proxy.ca_file),
                       NO_PROXY="127.0.0.1,localhost", VIDEO_PATH=str(tmp_path / f"{scenario}.mp4"), **env)
    done = subprocess.run([sys.executable, "-c", FAL_CLIENT_SCRIPT, app, scenario, json.dumps(arguments)],
                          env=environment, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"fal-client failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def usage_completed(deployment, tenant: str) -> int:
    service, proxy = deployment
    response = httpx.get(f"{proxy.url}/v1/usage", headers={"Authorization": f"Key {service.keys[tenant]}"},
                         verify=str(proxy.ca_file))
    response.raise_for_status()
    return response.json()["jobs"]["completed"]


@pytest.mark.ray
@pytest.mark.slow
def test_fal_client_submit_status_result_cancel_through_tls(fal_deployment, tmp_path):
    from pipelines.video import probe_video

    service, proxy = fal_deployment
    before = usage_completed(fal_deployment, "alice")
    receiver = WebhookReceiver()
    try:
        out = run_fal_client(fal_deployment, "flow", {"image_url": DATA_URL, "seed": 11, "fps": 12, **SMALL,
                                                      "num_frames": 6}, tmp_path, WEBHOOK_URL=receiver.url)
        hooks = receiver.wait_for(1)
    finally:
        receiver.close()
    assert out["queue_url_format"] == f"https://{proxy.host}/"
    handle = out["handle"]
    request_id = handle["request_id"]
    base = f"https://{proxy.host}/{FAL_APP_ID}/requests/{request_id}"  # https: built behind the terminator
    assert (handle["response_url"], handle["status_url"], handle["cancel_url"]) == (base, base + "/status",
                                                                                  base + "/cancel")
    kinds = [event["type"] for event in out["events"]]
    assert kinds[-1] == "Completed" and set(kinds) <= {"Queued", "InProgress", "Completed"}
    final = out["events"][-1]
    assert final["error"] is None and final["metrics"]["inference_time"] > 0
    messages = [line["message"] for line in final["logs"]]
    assert messages[0].startswith("Started: 6 frames at 64x64, 2 steps, seed 11")
    assert any(message.startswith("sampling: done in") for message in messages)
    assert messages[-1].startswith(f"Completed: {request_id}.mp4 (6 frames")
    assert out["status"]["type"] == "Completed" and out["status"]["logs"] == final["logs"]

    result = out["result"]
    assert unsigned(result) == unsigned(out["result_again"]) and result["seed"] == 11
    assert result["video"]["content_type"] == "video/mp4" and result["video"]["file_name"] == f"{request_id}.mp4"
    assert result["video"]["url"].startswith(f"https://{proxy.host}/")  # downloaded through the terminator
    clip = (tmp_path / "flow.mp4").read_bytes()
    assert len(clip) == result["video"]["file_size"]
    info = probe_video(clip)  # ffmpeg decodes every frame
    assert (info.frames, info.width, info.height, info.codec) == (6, 64, 64, "h264")
    assert info.fps == pytest.approx(12)  # fal's fps is the clip's frame rate

    # Cancelling a finished request: 400 ALREADY_COMPLETED, raised at once (a 409 would be retried).
    assert out["cancel"]["status_code"] == 400 and out["cancel"]["body"]["status"] == "ALREADY_COMPLETED"

    # The webhook: fal's body, signed like ours with the tenant's secret.
    assert len(hooks) == 1
    hook = hooks[0]
    assert verify(service.webhook_secrets["alice"], hook["headers"], hook["body"])
    body = json.loads(hook["body"])
    assert (body["request_id"], body["status"], body["payload"]["seed"]) == (request_id, "OK", 11)
    assert body["payload"]["video"]["file_size"] == len(clip)

    # Metered like any job.
    deadline = time.monotonic() + 30
    while usage_completed(fal_deployment, "alice") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert usage_completed(fal_deployment, "alice") >= before + 1  # (another module's late job may land too)

    # Tenant isolation through the adapter: bob's key sees a 404, in fal's error shape.
    with httpx.Client(verify=str(proxy.ca_file), headers={"Authorization": f"Key {service.keys['bob']}"}) as bob:
        for response in (bob.get(base + "/status"), bob.get(base), bob.put(base + "/cancel")):
            assert response.status_code == 404 and request_id in response.json()["detail"]


@pytest.mark.ray
@pytest.mark.slow
def test_fal_client_subscribe_through_tls(fal_deployment, tmp_path):
    from pipelines.video import probe_video

    out = run_fal_client(fal_deployment, "subscribe", {"image_url": DATA_URL, **SMALL, "num_frames": 5}, tmp_path)
    assert len(out["enqueued"]) == 1 and out["enqueued"][0].startswith("vid_")
    assert out["updates"] and out["updates"][-1]["type"] == "Completed"
    info = probe_video((tmp_path / "subscribe.mp4").read_bytes())
    assert (info.frames, info.width, info.height) == (5, 64, 64)
    assert info.fps == pytest.approx(25)  # fal's default frame rate
    assert 0 <= out["result"]["seed"] <= 2**32 - 2


@pytest.mark.ray
@pytest.mark.slow
def test_fal_client_cancel_through_tls(fal_deployment, tmp_path):
    # Long enough that the cancel lands while it is queued or sampling, never after it completed.
    out = run_fal_client(fal_deployment, "cancel", {"image_url": DATA_URL, "num_frames": 14, "width": 256,
                                                    "height": 256, "num_inference_steps": 150}, tmp_path)
    final = out["events"][-1]
    assert final["type"] == "Completed"
    assert (final["error"], final["error_type"]) == ("Request was cancelled", "request_cancelled")
    assert out["result_error"]["status_code"] == 400
    assert out["result_error"]["body"] == {"detail": "Request was cancelled", "error_type": "request_cancelled"}
    assert out["result_error"]["message"] == "Request was cancelled"


def test_fals_default_negative_prompt_is_dropped_where_the_model_cannot_use_it(api):
    # SDXL-Turbo-style guidance 0: a negative prompt would be refused by the stage, and the client never sent one.
    params = api.service.store.get(t2v_submitted(api, t2i_guidance_scale=0.0), tenant="alice").params
    assert params["negative_prompt"] is None

    async def flux_like():
        return {"model": "black-forest-labs/FLUX.1-schnell", "size_multiple": 16, "negative_prompt": False}

    api.service.text_to_image_info = flux_like
    assert api.service.store.get(t2v_submitted(api), tenant="alice").params["negative_prompt"] is None
    # One the client gives is kept (and refused by such a model, rather than silently dropped).
    kept = api.service.store.get(t2v_submitted(api, negative_prompt="blurry"), tenant="alice").params
    assert kept["negative_prompt"] == "blurry"
