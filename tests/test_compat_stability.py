"""Stability AI's v2beta image-to-video API (``POST /v2beta/image-to-video``, ``GET
/v2beta/image-to-video/result/{id}``) over the one job service.

In process: the FastAPI app over a real SQLite job store and local storage; jobs are moved through
their states with the job store's own API, as the runner does. End to end (``ray``, ``slow``):
``make serve``'s local deployment with the tiny CPU model, driven with httpx exactly as
Stability's documentation drives ``requests``; the MP4 is decoded with ffmpeg.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from fixtures_api import MODEL_FRAMES, make_api
from PIL import Image

from pipelines.params import MAX_SEED
from serve.api.compat.stability import SIZES
from serve.jobstore import JobError
from serve.tenants import add_tenant
from test_api import finish

PATH = "/v2beta/image-to-video"
CLIP = b"\x00\x00\x00\x18ftypisom fake mp4"
SIZE_LIST = "1024x576, 576x1024, 768x768"


def png(width=576, height=1024) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def stability(tmp_path):
    client = make_api(tmp_path, tenants={
        "alice": {}, "bob": {},
        "capped": {"max_num_frames": 4, "max_inference_steps": 3, "max_long_side": 768, "max_queued_jobs": 1},
        "slow": {"rate_limit_per_minute": 1, "burst": 1}})
    yield client
    client.service.store.close()


def auth(client, tenant="alice", **extra):
    return {"authorization": f"Bearer {client.keys[tenant]}", **extra}


def start(client, tenant="alice", image=None, data=None, files=None):
    return client.post(PATH, headers=auth(client, tenant), files=files or {"image": ("image.png", image or png())},
                       data=data)


def started(client, tenant="alice", image=None, **data) -> str:
    response = start(client, tenant, image=image, data=data)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def result(client, generation_id, tenant="alice", accept="video/*"):
    headers = auth(client, tenant) if accept is None else auth(client, tenant, accept=accept)
    return client.get(f"{PATH}/result/{generation_id}", headers=headers)


def assert_stability_error(response, status, name, contains=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"id", "name", "errors"}, body
    assert body["name"] == name and len(body["id"]) == 32
    assert len(body["errors"]) == 1 and contains in body["errors"][0], body
    assert "Traceback" not in response.text



def params_of(client, generation_id, tenant="alice") -> dict:
    return client.service.store.get(generation_id, tenant=tenant).params


@pytest.mark.parametrize("size", SIZES)
def test_start_maps_stabilitys_fields_onto_the_job(stability, size):
    response = start(stability, image=png(*size), data={"seed": 5, "cfg_scale": 2.5, "motion_bucket_id": 40})
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"id"}
    params = params_of(stability, response.json()["id"])
    assert (params["width"], params["height"]) == size  # the image's size is the clip's
    assert params["seed"] == 5 and params["motion_bucket_id"] == 40
    assert (params["min_guidance_scale"], params["max_guidance_scale"]) == (1.0, 2.5)
    assert params["num_frames"] == MODEL_FRAMES and params["num_inference_steps"] == 25
    assert params["output_format"] == "mp4" and params["fps"] == 7


def test_defaults_seed_zero_draws_one_and_a_low_cfg_scale_flattens_the_ramp(stability):
    defaults = params_of(stability, started(stability))
    assert 0 <= defaults["seed"] <= MAX_SEED and defaults["motion_bucket_id"] == 127
    assert (defaults["min_guidance_scale"], defaults["max_guidance_scale"]) == (1.0, 1.8)
    seeds = {params_of(stability, started(stability, seed=0))["seed"] for _ in range(3)}
    assert len(seeds) == 3  # 0 is "random", never the seed 0
    low = params_of(stability, started(stability, cfg_scale=0.5))
    assert (low["min_guidance_scale"], low["max_guidance_scale"]) == (0.5, 0.5)
    bounds = params_of(stability, started(stability, seed=MAX_SEED, cfg_scale=0, motion_bucket_id=255))
    assert (bounds["seed"], bounds["max_guidance_scale"], bounds["motion_bucket_id"]) == (MAX_SEED, 0.0, 255)


@pytest.mark.parametrize("size", [(64, 64), (1024, 768), (577, 1024), (576, 1023)])
def test_any_other_size_is_400_naming_the_sizes(stability, size):
    assert_stability_error(start(stability, image=png(*size)), 400, "bad_request",
                           f"image: {size[0]}x{size[1]} is not a supported size; send an image of exactly {SIZE_LIST}")


@pytest.mark.parametrize("field, value, contains", [
    ("cfg_scale", 10.5, "cfg_scale: Input should be less than or equal to 10"),
    ("cfg_scale", -1, "cfg_scale: Input should be greater than or equal to 0"),
    ("cfg_scale", "much", "cfg_scale: Input should be a valid number"),
    ("motion_bucket_id", 0, "motion_bucket_id: 0 is out of range (allowed: 1 to 255)"),
    ("motion_bucket_id", 256, "motion_bucket_id: 256 is out of range (allowed: 1 to 255)"),
    ("seed", -1, "seed: -1 is out of range (allowed: 0 to 4294967294)"),
    ("seed", MAX_SEED + 1, "seed: 4294967295 is out of range"),
    ("seed", 1.5, "seed: Input should be a valid integer"),
    ("num_frames", 4, "num_frames: unknown parameter"),
    ("prompt", "a cat", "prompt: Stability's image-to-video takes no prompt"),
    ("negative_prompt", "blur", "fal-ai/fast-svd/text-to-video"),
])
def test_invalid_fields_are_400_bad_request_naming_them(stability, field, value, contains):
    assert_stability_error(start(stability, data={field: value}), 400, "bad_request", contains)
    assert stability.service.store.queue_depth("alice") == 0



def test_a_prompt_is_refused_naming_where_text_to_video_is(stability):
    """Stability's image-to-video takes no prompt and v2beta has no text-to-video endpoint: nothing
    maps onto text-to-video here, with or without an image (this deployment has a text-to-image model)."""
    assert stability.service.config.text_to_image_model is not None
    prompt_only = stability.post(PATH, headers=auth(stability), files={"prompt": (None, "a rocket")})
    assert_stability_error(prompt_only, 400, "bad_request", "prompt: Stability's image-to-video takes no prompt")
    assert "POST /v1/videos" in prompt_only.json()["errors"][0]
    with_image = start(stability, data={"prompt": "a rocket", "seed": 3})
    assert_stability_error(with_image, 400, "bad_request", "v2beta API has no text-to-video endpoint")
    assert stability.service.store.queue_depth("alice") == 0


def test_malformed_starts_are_400(stability):
    assert_stability_error(stability.post(PATH, headers=auth(stability), data={"seed": 1}), 400, "bad_request",
                           "multipart/form-data")
    assert_stability_error(stability.post(PATH, headers=auth(stability), files={"other": ("x.png", png())}),
                           400, "bad_request", "image: required")
    assert_stability_error(stability.post(PATH, headers=auth(stability), json={"image": "x"}), 400, "bad_request",
                           "multipart/form-data")
    assert_stability_error(start(stability, files=[("image", ("a.png", png())), ("image", ("b.png", png()))]),
                           400, "bad_request", "multipart upload")
    assert_stability_error(start(stability, files={"image": ("x.png", png()), "seed": ("s.txt", b"1")}),
                           400, "bad_request")
    repeated = start(stability, files=[("image", ("x.png", png())), ("seed", (None, "1")), ("seed", (None, "2"))])
    assert_stability_error(repeated, 400, "bad_request", "seed: given more than once")
    assert_stability_error(start(stability, image=b"not an image at all"), 400, "bad_request", "image")
    assert_stability_error(start(stability, image=b"\x89PNG\r\n\x1a\n" + bytes(300 * 1024)), 413,
                           "payload_too_large", "image is")


def test_keys_are_checked_on_both_routes_in_stabilitys_shape(stability):
    assert_stability_error(stability.post(PATH, files={"image": ("x.png", png())}), 401, "unauthorized")
    wrong = {"authorization": "Bearer sk-wrong"}
    assert_stability_error(stability.post(PATH, headers=wrong, files={"image": ("x.png", png())}), 401, "unauthorized")
    generation_id = started(stability)
    assert_stability_error(stability.get(f"{PATH}/result/{generation_id}", headers=wrong), 401, "unauthorized")


def test_result_in_progress_then_the_mp4_or_json(stability):
    generation_id = started(stability, seed=42)
    pending = result(stability, generation_id)
    assert pending.status_code == 202 and pending.json() == {"id": generation_id, "status": "in-progress"}
    stability.service.store.claim(generation_id, owner="test-runner", lease_s=30)
    assert result(stability, generation_id, accept="application/json").status_code == 202
    stability.service.store.release(generation_id, owner="test-runner")
    finish(stability, generation_id, CLIP)

    video = result(stability, generation_id)
    assert video.status_code == 200 and video.content == CLIP
    assert video.headers["content-type"] == "video/mp4"
    assert (video.headers["finish-reason"], video.headers["seed"]) == ("SUCCESS", "42")
    for accept in (None, "*/*", "video/mp4", "video/*; q=1"):  # Stability's default is video/*
        assert result(stability, generation_id, accept=accept).content == CLIP
    as_json = result(stability, generation_id, accept="application/json")
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    assert as_json.json() == {"video": base64.b64encode(CLIP).decode(), "finish_reason": "SUCCESS", "seed": 42}
    assert "video" in result(stability, generation_id, accept="application/json, video/*").json()
    assert_stability_error(result(stability, generation_id, accept="image/png"), 400, "bad_request",
                           "accept: 'image/png' is not supported")


def test_another_tenants_or_an_unknown_id_is_404(stability):
    generation_id = started(stability)
    finish(stability, generation_id, CLIP)
    for accept in ("video/*", "application/json"):
        assert_stability_error(result(stability, generation_id, tenant="bob", accept=accept), 404, "not_found",
                               "video job not found")
    assert_stability_error(result(stability, "vid_nope"), 404, "not_found")
    assert result(stability, generation_id).content == CLIP


@pytest.mark.parametrize("code, status, name", [("invalid_image", 400, "bad_request"),
                                                ("internal_error", 500, "internal_error"),
                                                ("worker_lost", 500, "internal_error")])
def test_a_failed_generation_is_stabilitys_error(stability, code, status, name):
    generation_id = started(stability)
    store = stability.service.store
    store.claim(generation_id, owner="test-runner", lease_s=30)
    store.fail(generation_id, owner="test-runner", error=JobError(code=code, message="it went wrong"))
    for accept in ("video/*", "application/json"):
        assert_stability_error(result(stability, generation_id, accept=accept), status, name,
                               f"generation {generation_id} failed: it went wrong")


def test_a_cancelled_generation_is_404_naming_it(stability):
    generation_id = started(stability)
    assert stability.post(f"/v1/videos/{generation_id}/cancel", headers=auth(stability)).status_code == 200
    assert_stability_error(result(stability, generation_id), 404, "not_found", "was cancelled; it has no result")


def test_tenant_limits_hold(stability):
    # A size over the tenant's cap is refused (the client chose it) ...
    assert_stability_error(start(stability, "capped", image=png(1024, 576)), 422, "limit_exceeded",
                           "the long side 1024 exceeds this tenant's limit of 768 pixels")
    # ... frames and steps, which a Stability client cannot choose, are fitted to the caps.
    params = params_of(stability, started(stability, "capped", image=png(768, 768)), "capped")
    assert (params["num_frames"], params["num_inference_steps"], params["width"]) == (4, 3, 768)
    full = start(stability, "capped", image=png(768, 768))
    assert_stability_error(full, 429, "rate_limited", "queue full")
    assert full.headers["retry-after"].isdigit()
    assert started(stability, "slow")
    limited = start(stability, "slow")
    assert_stability_error(limited, 429, "rate_limited", "rate limit exceeded")
    assert int(limited.headers["retry-after"]) >= 1



# -- end to end: Stability's documented flow against the local deployment -----------------------

E2E_TENANT = "stability-e2e"
#: The e2e tenant's caps: the clip Stability's API asks for, fitted to them, stays cheap on a CPU.
E2E_FRAMES, E2E_STEPS = 3, 1


@pytest.fixture(scope="module")
def stability_key(local_service):
    """A tenant of its own (caps on frames and steps, one submission a minute), added to the running
    deployment's tenants file, which the service re-reads."""
    key = add_tenant(local_service.data_dir / "tenants.yaml", E2E_TENANT, max_num_frames=E2E_FRAMES,
                     max_inference_steps=E2E_STEPS, rate_limit_per_minute=1, burst=1)
    deadline = time.monotonic() + 30
    while httpx.get(f"{local_service.url}/v1/usage", headers={"authorization": f"Bearer {key}"},
                    timeout=30).status_code == 401:
        assert time.monotonic() < deadline, "the service did not pick up the new tenant"
        time.sleep(0.5)
    return key


@pytest.mark.ray
@pytest.mark.slow
def test_stabilitys_documented_flow_with_httpx(local_service, stability_key, tmp_path):
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from pipelines.video import probe_video

    url = local_service.url
    Image.open(SAMPLE_IMAGE_PATH).convert("RGB").resize((576, 1024)).save(tmp_path / "image.png")
    wrong_size = httpx.post(f"{url}/v2beta/image-to-video", headers={"authorization": f"Bearer {stability_key}"},
                            files={"image": ("image.png", png(1024, 768))}, timeout=30)
    assert_stability_error(wrong_size, 400, "bad_request", SIZE_LIST)

    # As Stability's documentation shows it (with httpx for requests).
    with open(tmp_path / "image.png", "rb") as image:
        response = httpx.post(
            f"{url}/v2beta/image-to-video",
            headers={"authorization": f"Bearer {stability_key}"},
            files={"image": image},
            data={"seed": 0, "cfg_scale": 1.8, "motion_bucket_id": 127},
            timeout=30,
        )
    assert response.status_code == 200, response.text
    generation_id = response.json().get("id")

    deadline = time.monotonic() + 600
    while True:
        response = httpx.get(
            f"{url}/v2beta/image-to-video/result/{generation_id}",
            headers={"accept": "video/*", "authorization": f"Bearer {stability_key}"},
            timeout=30,
        )
        if response.status_code == 202:
            assert response.json() == {"id": generation_id, "status": "in-progress"}
            assert time.monotonic() < deadline, "the generation did not finish"
            time.sleep(1)  # Stability asks for 10 s between polls; the tiny model is quicker
        elif response.status_code == 200:
            (tmp_path / "video.mp4").write_bytes(response.content)
            break
        else:
            raise Exception(str(response.json()))

    assert response.headers["content-type"] == "video/mp4" and response.headers["finish-reason"] == "SUCCESS"
    seed = int(response.headers["seed"])
    assert 0 <= seed <= MAX_SEED
    info = probe_video(tmp_path / "video.mp4")  # ffmpeg decodes every frame
    assert (info.frames, info.width, info.height, info.codec) == (E2E_FRAMES, 576, 1024, "h264")

    as_json = httpx.get(f"{url}/v2beta/image-to-video/result/{generation_id}",
                        headers={"accept": "application/json", "authorization": f"Bearer {stability_key}"}, timeout=30)
    assert as_json.status_code == 200
    assert as_json.json()["finish_reason"] == "SUCCESS" and as_json.json()["seed"] == seed
    assert base64.b64decode(as_json.json()["video"]) == response.content

    # Another tenant's id is Stability's 404.
    other = httpx.get(f"{url}/v2beta/image-to-video/result/{generation_id}",
                      headers={"accept": "video/*", "authorization": f"Bearer {local_service.keys['bob']}"}, timeout=30)
    assert_stability_error(other, 404, "not_found")

    # The tenant's rate limit holds (its one token a minute went to the generation above).
    again = httpx.post(f"{url}/v2beta/image-to-video", headers={"authorization": f"Bearer {stability_key}"},
                       files={"image": ("image.png", png(576, 1024))}, timeout=30)
    assert_stability_error(again, 429, "rate_limited", "rate limit exceeded")
    assert int(again.headers["retry-after"]) >= 1

    # Metered like any job: one completed job with its video seconds.
    deadline = time.monotonic() + 30
    while True:
        usage = httpx.get(f"{url}/v1/usage", headers={"authorization": f"Bearer {stability_key}"}, timeout=30).json()
        if usage["jobs"]["completed"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert usage["jobs"]["completed"] == 1 and usage["video_seconds"] == pytest.approx(E2E_FRAMES / 7, rel=0.01)
