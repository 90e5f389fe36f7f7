"""Admission of text-to-video and long-clip requests on the native API (in process: the FastAPI app
over a real SQLite store and local storage, no Ray): what is accepted, what it stores, and the
422s that name the field."""

from __future__ import annotations

import pytest
from fixtures_api import make_api

from test_api import DATA_URL, SMALL


@pytest.fixture
def api(tmp_path):
    client = make_api(tmp_path)
    yield client
    client.service.store.close()


def h(api, tenant="alice"):
    return {"Authorization": f"Bearer {api.keys[tenant]}"}


def post(api, **body):
    return api.post("/v1/videos", headers=h(api), json=body)


def error(response, status=422) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_a_prompt_alone_is_text_to_video(api):
    response = post(api, prompt="a lighthouse at dusk", negative_prompt="blurry", **SMALL)
    assert response.status_code == 202, response.text
    body = response.json()
    job = api.service.store.get(body["id"], tenant="alice")
    assert job.route[0] == "text_to_image" and job.input_key == ""  # nothing stored as input
    assert job.params["prompt"] == "a lighthouse at dusk" and job.params["negative_prompt"] == "blurry"
    assert (job.params["t2i_guidance_scale"], job.params["t2i_num_inference_steps"]) == (5.0, 30)
    assert body["prompt"] == "a lighthouse at dusk"


def test_a_prompt_beside_an_image_is_only_stored(api):
    response = post(api, prompt="waves", image_url=DATA_URL, **SMALL)
    assert response.status_code == 202, response.text
    job = api.service.store.get(response.json()["id"], tenant="alice")
    assert job.route[0] == "image_encode" and job.params["prompt"] is None and job.prompt == "waves"
    assert "negative_prompt" in error(post(api, prompt="waves", negative_prompt="x", image_url=DATA_URL, **SMALL))


def test_multipart_prompt_alone_is_text_to_video(api):
    fields = {"prompt": "a fox", "num_frames": "4", "width": "64", "height": "64", "num_inference_steps": "2"}
    response = api.post("/v1/videos", headers=h(api), files={k: (None, v) for k, v in fields.items()})
    assert response.status_code == 202, response.text
    assert api.service.store.get(response.json()["id"], tenant="alice").route[0] == "text_to_image"
    refused = api.post("/v1/videos", headers=h(api), files={"num_frames": (None, "4")})
    assert "or a prompt alone" in error(refused)


def test_neither_image_nor_prompt(api):
    assert "image_url: required" in error(post(api, **SMALL))


def test_long_clip_limits(api):
    assert "duration_s: 9 s is over this deployment's maximum of 8 s" in error(post(api, prompt="x", duration_s=9))
    # 8 s at fps 30 over 13 new frames a pass is 18 segments: over max_segments (8).
    message = error(post(api, prompt="x", duration_s=8, fps=30, num_frames=14))
    assert message.startswith("duration_s:") and "max_segments" in message
    assert "use interpolation blend or mci" in error(post(api, prompt="x", duration_s=4, interpolation="none"))
    accepted = post(api, prompt="x", duration_s=8, output_fps=24, **{**SMALL, "num_frames": 14})
    assert accepted.status_code == 202, accepted.text
    view = accepted.json()
    assert view["seconds"] == "8.04" and view["progress_detail"]["segments"] == 4
    assert view["progress_detail"]["segments_done"] == 0 and view["params"]["interpolation"] == "mci"


def test_sizes(api):
    assert post(api, prompt="x", width=1536, height=864, num_frames=4).status_code == 202
    assert "at most 1327104" in error(post(api, prompt="x", width=1536, height=1536))
    assert "multiple of 8" in error(post(api, prompt="x", width=1532, height=864))


def test_a_size_the_text_to_image_model_cannot_make(tmp_path):
    api = make_api(tmp_path)

    async def flux_like():
        return {"model": "black-forest-labs/FLUX.1-schnell", "size_multiple": 16}

    api.service.text_to_image_info = flux_like
    message = error(post(api, prompt="x", width=1016, height=576, num_frames=4))
    assert message == ("width: 1016x576 is not a size black-forest-labs/FLUX.1-schnell can make: both sides must be "
                       "multiples of 16")
    assert post(api, prompt="x", width=1024, height=576, num_frames=4).status_code == 202
    # Image-to-video does not go through the text-to-image model.
    assert post(api, image_url=DATA_URL, width=1016, height=576, num_frames=4).status_code == 202
    api.service.store.close()


def test_text_to_video_off(tmp_path):
    api = make_api(tmp_path, text_to_image_model=None)
    response = post(api, prompt="x", **SMALL)
    assert response.status_code == 422 and response.json()["error"]["code"] == "text_to_video_unavailable"
    api.service.store.close()


def test_a_tenant_not_allowed_the_text_to_image_model(tmp_path):
    video_model = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
    api = make_api(tmp_path, tenants={"alice": {"allowed_models": [video_model]}})
    response = post(api, prompt="x", **SMALL)
    assert response.status_code == 403 and response.json()["error"]["code"] == "model_not_allowed"
    assert "text-to-image model" in response.json()["error"]["message"]
    assert post(api, image_url=DATA_URL, **SMALL).status_code == 202  # image-to-video stays allowed
    api.service.store.close()


def test_deployment_defaults_fill_what_a_request_leaves_out(tmp_path):
    api = make_api(tmp_path, default_params={"width": 256, "height": 128, "num_inference_steps": 8,
                                             "t2i_num_inference_steps": 4, "num_frames": 6})
    params = post(api, prompt="x").json()["params"]
    assert (params["width"], params["height"], params["num_inference_steps"]) == (256, 128, 8)
    assert (params["t2i_num_inference_steps"], params["num_frames"]) == (4, 6)
    # A request's own values win, and a size or length it gives replaces that group's defaults.
    params = post(api, prompt="x", aspect_ratio="1:1", num_inference_steps=3).json()["params"]
    assert (params["aspect_ratio"], params["width"], params["num_inference_steps"]) == ("1:1", None, 3)
    params = post(api, prompt="x", duration_s=2).json()["params"]
    assert params["num_frames"] == 14  # the model's own (make_api's model stage), not the default 6
    params = post(api, image_url=DATA_URL).json()["params"]
    assert (params["width"], params["t2i_num_inference_steps"]) == (256, None)  # text-to-video fields: no
    api.service.store.close()


def test_bad_deployment_defaults_are_refused():
    from pydantic import ValidationError

    from serve.config import AppConfig

    with pytest.raises(ValidationError, match="default_params: width: 100 is out of range"):
        AppConfig.model_validate({"default_params": {"width": 100, "height": 64}})
    with pytest.raises(ValidationError, match="seed cannot have a deployment default"):
        AppConfig.model_validate({"default_params": {"seed": 1}})


def test_a_tenants_caps_count_every_segment_and_the_first_frames_steps(tmp_path):
    api = make_api(tmp_path, tenants={"alice": {"max_num_frames": 20, "max_inference_steps": 10}})
    # 4 s at fps 7 over 13 new frames a pass: 2 segments, 27 frames in all.
    response = post(api, prompt="x", duration_s=4, num_inference_steps=2, t2i_num_inference_steps=4)
    assert response.status_code == 422 and response.json()["error"]["code"] == "limit_exceeded"
    assert "the clip's 2 segments generate 27 frames, which exceeds this tenant's limit of 20" in \
        response.json()["error"]["message"]
    message = error(post(api, prompt="x", num_frames=4, num_inference_steps=2, t2i_num_inference_steps=30))
    assert message == "t2i_num_inference_steps 30 exceeds this tenant's limit of 10"
    assert post(api, prompt="x", num_frames=14, num_inference_steps=2, t2i_num_inference_steps=4).status_code == 202
    api.service.store.close()


def test_openai_seconds_with_long_clips(api):
    message = error(post(api, prompt="x", seconds="4", duration_s=4))
    assert message == "seconds: give seconds, or num_frames or duration_s, not both"
    # Retimed frames span the clip: seconds is its length (duration_s), not a frame count.
    params = post(api, prompt="x", seconds="4", output_fps=24, interpolation="blend").json()["params"]
    assert (params["duration_s"], params["num_frames"]) == (4.0, 14)
    # Played as generated (the default): frames = seconds x fps, as before.
    assert post(api, prompt="x", seconds="2").json()["params"]["num_frames"] == 14
