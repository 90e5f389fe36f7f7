"""OpenAI-style synchronous generations (``POST /v1/video/generations``) and the signed file URLs
its answers carry.

In process: the FastAPI app over a real SQLite job store and local storage, with a thread playing
the runner (it finishes queued jobs through the job store's own API, so the store's change notices
wake the waiting request). End to end (``ray``, ``slow``): ``make serve``'s local deployment with
the tiny CPU model, driven with httpx and the openai SDK; the clip is decoded with ffmpeg.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fixtures_api import make_api

from pipelines.params import MAX_SEED
from serve.config import AppConfig
from serve.jobstore import JobError, JobStatus
from test_api import DATA_URL, PNG, finish

PATH = "/v1/video/generations"
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}
CLIP = b"\x00\x00\x00\x18ftypisom fake mp4"


@pytest.fixture
def api(tmp_path):
    client = make_api(tmp_path, storage={"presign_expiry_s": 600}, generations_wait_s=5, tenants={
        "alice": {}, "bob": {}, "capped": {"max_num_frames": 4, "rate_limit_per_minute": 1, "burst": 1}})
    yield client
    client.service.store.close()


def h(api, tenant="alice"):
    return {"Authorization": f"Bearer {api.keys[tenant]}"}


def generate(api, tenant="alice", **body):
    return api.post(PATH, headers=h(api, tenant), json={"image": base64.b64encode(PNG).decode(), **SMALL, **body})


@contextlib.contextmanager
def runner(api, *, after_s=0.3, outcome="complete"):
    """A stand-in for the job runner: ends each job ``after_s`` after it was queued."""
    store, stop, ended = api.service.store, threading.Event(), []

    def run():
        while not stop.wait(0.02):
            for job in store.queued_heads():
                time.sleep(after_s)
                if outcome == "complete":
                    finish(api, job.id, CLIP)
                elif outcome == "cancel":
                    store.request_cancel(job.id, tenant=job.tenant)
                else:
                    store.claim(job.id, owner="test-runner", lease_s=30)
                    store.fail(job.id, owner="test-runner", error=JobError(code=outcome, message=f"{outcome} here"))
                ended.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield ended
    finally:
        stop.set()
        thread.join(5)


def assert_openai_error(response, status, code, param=None, contains=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["param"] == param, body
    assert contains in body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


# ---------------------------------------------------------------------------------- in process
def test_generation_waits_for_the_job_and_answers_a_signed_url(api):
    with runner(api) as ended:
        started = time.monotonic()
        response = generate(api, seed=7, prompt="a calm lake")
        answered = time.monotonic()
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "created", "data"} and len(body["data"]) == 1
    assert set(body["data"][0]) == {"url"}
    assert abs(body["created"] - time.time()) < 30
    # Woken by the store's change notice, not by the slow re-read.
    assert answered - ended[0] < 1.5 and answered - started < 3
    job = api.service.store.get(body["id"], tenant="alice")
    assert job.status is JobStatus.COMPLETED and job.params["seed"] == 7 and job.params["num_frames"] == 4
    assert job.prompt == "a calm lake"

    url = body["data"][0]["url"]
    assert url.startswith("http://testserver/files/alice/")
    download = api.get(url)  # no Authorization header
    assert download.status_code == 200 and download.content == CLIP
    assert download.headers["content-type"] == "video/mp4"
    assert "attachment" in download.headers["content-disposition"]
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert 590 <= expires - time.time() <= 601  # storage.presign_expiry_s


def test_b64_json_carries_the_clip_inline(api):
    with runner(api):
        response = generate(api, response_format="b64_json")
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert base64.b64decode(item["b64_json"]) == CLIP and api.get(item["url"]).content == CLIP


def test_image_url_and_data_urls_are_accepted(api):
    with runner(api, after_s=0.0):
        assert generate(api, image=DATA_URL).status_code == 200
        assert api.post(PATH, headers=h(api), json={"image_url": DATA_URL, **SMALL}).status_code == 200



def text_to_video(api, tenant="alice", **body):
    return api.post(PATH, headers=h(api, tenant), json={**SMALL, **body})


def test_a_prompt_without_an_image_is_text_to_video(api):
    with runner(api):
        response = text_to_video(api, prompt="a lighthouse at dusk", negative_prompt="blurry", seed=9,
                                 t2i_num_inference_steps=4, t2i_guidance_scale=0.0)
    assert response.status_code == 200, response.text
    job = api.service.store.get(response.json()["id"], tenant="alice")
    assert job.status is JobStatus.COMPLETED and not job.input_key  # no image stored
    assert job.route[0] == "text_to_image" and job.prompt == "a lighthouse at dusk"
    params = job.params
    assert (params["prompt"], params["negative_prompt"], params["seed"]) == ("a lighthouse at dusk", "blurry", 9)
    assert (params["t2i_num_inference_steps"], params["t2i_guidance_scale"]) == (4, 0.0)
    assert api.get(response.json()["data"][0]["url"]).content == CLIP


def test_native_long_clip_and_text_to_video_fields_flow_through(api):
    api.service.config.generations_wait_s = 0
    response = text_to_video(api, prompt="waves", duration_s=2, overlap_frames=1, interpolation="blend",
                             output_fps=12)
    assert response.status_code == 202, response.text
    params = api.service.store.get(response.json()["id"], tenant="alice").params
    assert (params["duration_s"], params["overlap_frames"], params["interpolation"]) == (2, 1, "blend")
    assert params["t2i_num_inference_steps"] == 30  # the resolved default of the text-to-image stage
    image = generate(api, duration_s=2, interpolation="mci")
    assert api.service.store.get(image.json()["id"], tenant="alice").params["duration_s"] == 2


def test_a_prompt_with_an_image_is_only_stored(api):
    api.service.config.generations_wait_s = 0
    for image in ({"image": base64.b64encode(PNG).decode()}, {"image_url": DATA_URL}):
        response = text_to_video(api, prompt="a cat", **image)
        assert response.status_code == 202, response.text
        job = api.service.store.get(response.json()["id"], tenant="alice")
        assert job.prompt == "a cat" and job.params.get("prompt") is None
        assert job.route[0] == "image_encode" and job.input_key
    # The text-to-image stage's own fields need text-to-video: a prompt and no image.
    assert_openai_error(generate(api, prompt="a cat", negative_prompt="blurry"), 422, "invalid_parameter",
                        "negative_prompt", "only apply to text-to-video")


@pytest.mark.parametrize("body, param, contains", [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"negative_prompt": "blurry"}, "image", "or a prompt alone for text-to-video"),
    ({"prompt": "x", "duration_s": 30}, "duration_s", "max_duration_s"),
])
def test_text_to_video_input_errors_use_the_openai_shape(api, body, param, contains):
    assert_openai_error(text_to_video(api, **body), 422, "invalid_parameter" if param != "image" else "invalid_input",
                        param, contains)
    assert api.service.store.queue_depth() == 0


def test_text_to_video_unavailable_is_an_openai_error(tmp_path):
    api = make_api(tmp_path, text_to_image_model=None)
    error = assert_openai_error(text_to_video(api, prompt="a lake"), 422, "text_to_video_unavailable", None,
                                "no text-to-image model")
    assert error["type"] == "invalid_request_error"
    assert api.service.store.queue_depth() == 0


def test_past_the_wait_it_answers_202_and_the_location_polls(api):
    api.service.config.generations_wait_s = 0.3
    response = generate(api)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and set(body) == {"id", "created", "status"}
    location = response.headers["location"]
    assert location == f"{PATH}/{body['id']}" and response.headers["retry-after"]
    assert api.get(location, headers=h(api)).status_code == 202
    finish(api, body["id"], CLIP)
    done = api.get(location, headers=h(api), params={"response_format": "b64_json"})
    assert done.status_code == 200 and done.json()["id"] == body["id"]
    assert base64.b64decode(done.json()["data"][0]["b64_json"]) == CLIP
    # The same Idempotency-Key answers the same job (a client retrying after a 202).
    api.service.config.generations_wait_s = 0
    first = api.post(PATH, headers={**h(api), "Idempotency-Key": "k1"}, json={"image_url": DATA_URL, **SMALL})
    again = api.post(PATH, headers={**h(api), "Idempotency-Key": "k1"}, json={"image_url": DATA_URL, **SMALL})
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]


@pytest.mark.parametrize("outcome,status,code", [("invalid_image", 422, "invalid_image"),
                                                 ("internal_error", 500, "internal_error"),
                                                 ("cancel", 409, "cancelled")])
def test_a_job_that_did_not_complete_is_an_openai_error(api, outcome, status, code):
    with runner(api, after_s=0.0, outcome=outcome):
        error = assert_openai_error(generate(api), status, code)
    assert error["type"] == ("server_error" if status == 500 else "invalid_request_error")
    assert "(job " in error["message"] or outcome == "cancel"


@pytest.mark.parametrize("body,param,contains", [
    ({"image_url": DATA_URL}, "image", "not both"),
    ({"image": None}, "image", "or a prompt alone for text-to-video"),
    ({"image": "https://example.com/x.png"}, "image", "as image_url"),
    ({"image": "not base64!"}, "image", "not valid base64"),
    ({"image_url": "file:///etc/passwd", "image": None}, "image_url", ""),
    ({"seed": MAX_SEED + 1}, "seed", "out of range"),
    ({"user": "u1"}, "user", "unknown parameter"),
    ({"size": "1280x720"}, "size", "unknown parameter"),
    ({"n": 2}, "n", ""),
    ({"response_format": "mp4"}, "response_format", ""),
    ({"prompt": "x" * 5000}, "prompt", ""),
    ({"width": 64, "height": None}, "width", "width and height"),
])
def test_bad_input_is_a_422_naming_the_parameter(api, body, param, contains):
    response = generate(api, **body)
    error = assert_openai_error(response, 422, response.json()["error"]["code"], param, contains)
    assert error["type"] == "invalid_request_error"
    assert api.service.store.queue_depth() == 0


def test_non_json_bodies_and_the_model_names(api):
    assert_openai_error(api.post(PATH, headers=h(api), content=b"{"), 422, "invalid_input", None, "not valid JSON")
    assert_openai_error(api.post(PATH, headers=h(api), json=[1]), 422, "invalid_input", None, "JSON object")
    assert_openai_error(api.post(PATH, headers=h(api), data={"a": "b"}), 415, "unsupported_media_type")
    api.service.config.generations_wait_s = 0
    source = api.service.config.model.source
    for model in (source, source.rsplit("/", 1)[-1]):
        assert generate(api, model=model).status_code == 202
    unknown = assert_openai_error(generate(api, model="sora-2"), 404, "model_not_found", "model", "'sora-2' not found")
    assert unknown["type"] == "invalid_request_error"


def test_auth_tenant_isolation_and_limits_use_the_openai_shape(api):
    error = assert_openai_error(api.post(PATH, json={}), 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert_openai_error(api.post(PATH, headers={"Authorization": "Bearer nope"}, json={}), 401, "invalid_api_key")

    api.service.config.generations_wait_s = 0
    job_id = generate(api).json()["id"]
    assert api.get(f"{PATH}/{job_id}", headers=h(api)).status_code == 202
    assert_openai_error(api.get(f"{PATH}/{job_id}", headers=h(api, "bob")), 404, "not_found")
    assert_openai_error(api.get(f"{PATH}/nope", headers=h(api)), 404, "not_found")
    assert_openai_error(api.get(f"{PATH}/{job_id}"), 401, "invalid_api_key")

    assert_openai_error(generate(api, "capped", num_frames=8), 422, "limit_exceeded", "num_frames", "limit of 4")
    assert generate(api, "capped").status_code == 202
    limited = generate(api, "capped")
    error = assert_openai_error(limited, 429, "rate_limit_exceeded", None, "rate limit")
    assert error["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) >= 1


def test_signed_urls_fail_when_tampered_with_expired_or_not_an_output(api):
    with runner(api, after_s=0.0):
        body = generate(api).json()
    url = body["data"][0]["url"]
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    storage = api.service.storage

    def fetch(path=parts.path, **changes):
        return api.get(f"{parts.scheme}://{parts.netloc}{path}?{urlencode({**query, **changes})}")

    assert fetch().status_code == 200
    for changes in ({"signature": query["signature"][:-2] + "AA"}, {"expires": str(int(query["expires"]) + 60)},
                    {"filename": "other.mp4"}, {"content_type": "text/html"}, {"signature": ""},
                    {"expires": "soon"}, {"signature": "é" * 43}):
        response = fetch(**changes)
        assert response.status_code == 403 and response.json()["error"]["code"] == "invalid_signature", changes
    assert api.get(base).status_code == 403  # no signature at all
    assert fetch(path=parts.path.replace("/alice/", "/bob/")).status_code == 403

    key = urlsplit(url).path.removeprefix("/files/")
    expired = storage.signed_url(key, base_url="http://testserver", expires_s=10, now=time.time() - 60)
    response = api.get(expired)
    assert response.status_code == 403 and response.json()["error"]["code"] == "url_expired"

    # Validly signed, but not the output of a completed job: never served.
    job = api.service.store.get(body["id"], tenant="alice")
    for other in (job.input_key, f"alice/{job.id}/other.mp4", ".url-signing-key", "svd-serve/../.url-signing-key"):
        with contextlib.suppress(ValueError):
            response = api.get(storage.signed_url(other, base_url="http://testserver", expires_s=60))
            assert response.status_code in (403, 404) and set(response.json()) == {"error"}, other
    assert api.get("http://testserver/files/..%2F.url-signing-key").status_code in (403, 404)

    # A deleted job's URL stops working.
    api.delete(f"/v1/videos/{body['id']}", headers=h(api))
    assert fetch().status_code == 404


def test_generations_wait_is_bounded_in_the_config():
    assert AppConfig().generations_wait_s == 60
    for bad in (-1, 601):
        with pytest.raises(ValueError):
            AppConfig.model_validate({"generations_wait_s": bad})


# ---------------------------------------------------------------------------------- end to end
def _usage(local_service, tenant):
    response = httpx.get(f"{local_service.url}/v1/usage", headers={"Authorization": f"Bearer {local_service.keys[tenant]}"})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.ray
@pytest.mark.slow
def test_generation_end_to_end_with_httpx(local_service, tiny_model_dir):
    from pipelines.video import decode_video_frames

    auth = {"Authorization": f"Bearer {local_service.keys['alice']}"}
    before = _usage(local_service, "alice")["jobs"]["completed"]
    body = {"model": Path(tiny_model_dir).name, "prompt": "waves", "image": base64.b64encode(PNG).decode(),
            "num_frames": 6, "fps": 6, "width": 64, "height": 64, "seed": 3, "num_inference_steps": 2}
    response = httpx.post(f"{local_service.url}{PATH}", headers=auth, json={**body, "response_format": "b64_json"},
                          timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    item = result["data"][0]
    clip = httpx.get(item["url"], timeout=30)  # no API key
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    assert clip.content == base64.b64decode(item["b64_json"])
    assert len(decode_video_frames(clip.content)) == 6

    tampered = item["url"].replace("signature=", "signature=x")
    assert httpx.get(tampered, timeout=30).status_code == 403
    other = httpx.get(f"{local_service.url}{PATH}/{result['id']}",
                      headers={"Authorization": f"Bearer {local_service.keys['bob']}"}, timeout=30)
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{local_service.url}{PATH}/{result['id']}", headers=auth, timeout=30).status_code == 200

    deadline = time.monotonic() + 30  # usage is recorded when the job ends, just after the answer
    while _usage(local_service, "alice")["jobs"]["completed"] < before + 1:
        assert time.monotonic() < deadline, "the generation was not metered"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_generation_errors_reach_the_openai_sdk(local_service):
    import openai

    def client(tenant):
        return openai.OpenAI(api_key=local_service.keys[tenant], base_url=f"{local_service.url}/v1", max_retries=0)

    body = {"image_url": DATA_URL, "num_frames": 6, "width": 64, "height": 64, "num_inference_steps": 2}
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client("alice").post("/video/generations", body={**body, "image": "abc"}, cast_to=object)
    assert info.value.param == "image" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(api_key="wrong", base_url=f"{local_service.url}/v1", max_retries=0).post(
            "/video/generations", body=body, cast_to=object)
    assert info.value.code == "invalid_api_key"

    limited = client("limited")
    first = limited.post("/video/generations", body=body, cast_to=object)
    assert first["data"][0]["url"]
    with pytest.raises(openai.RateLimitError) as info:
        limited.post("/video/generations", body=body, cast_to=object)
    assert info.value.code == "rate_limit_exceeded" and int(info.value.response.headers["retry-after"]) >= 1
