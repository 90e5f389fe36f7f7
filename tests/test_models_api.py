"""``GET /v1/models`` and ``GET /v1/models/{id}`` (serve/api/models.py): OpenAI's Models API shape,
read by the pinned ``openai`` SDK, filtered by the tenant's ``allowed_models``.

In process: the FastAPI app over a real SQLite store (no Ray); the SDK talks to it through the
TestClient, which is an ``httpx.Client`` (``OpenAI(http_client=...)``).
"""

from __future__ import annotations

import openai
import pytest
from fixtures_api import MODEL_FRAMES, make_api

from pipelines.params import MAX_PIXELS
from serve.api.models import CREATED
from serve.zoo import ModelEntry

VIDEO_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"  # AppConfig's default model.source
T2I_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # and its default text_to_image_model.source


@pytest.fixture
def api(tmp_path):
    client = make_api(tmp_path, max_duration_s=6, max_segments=3, tenants={
        "alice": {}, "capped": {"max_num_frames": 8, "max_pixels": 512 * 512},
        "video_only": {"allowed_models": ["stabilityai/stable-video-*"]},
        "other": {"allowed_models": ["someone/else-*"]}})
    yield client
    client.service.store.close()


def sdk(api, tenant="alice") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api.keys[tenant], http_client=api, max_retries=0)


def test_the_openai_sdk_lists_and_retrieves_the_models(api):
    models = sdk(api).models.list()
    assert [model.id for model in models] == [VIDEO_MODEL, T2I_MODEL]
    video, t2i = models.data
    for model in (video, t2i):
        assert isinstance(model, openai.types.Model)
        assert (model.object, model.created, model.owned_by) == ("model", CREATED, "stabilityai")
        assert isinstance(model.created, int)
    extra = video.model_extra
    assert extra["kind"] == "image-to-video" and extra["text_to_video"] is True
    assert extra["text_to_image_model"] == T2I_MODEL and extra["default_num_frames"] == MODEL_FRAMES
    assert extra["interpolation"] == ["none", "blend", "mci"]
    assert extra["limits"] == {
        "max_duration_s": 6.0, "max_segments": 3, "max_num_frames": 64, "max_pixels": MAX_PIXELS,
        "max_size": "1536x864", "min_side": 64, "max_long_side": 1536, "size_multiple": 8,
        "max_inference_steps": 150, "max_output_fps": 100, "max_output_fps_interpolated": 60}
    assert extra["default"] is True and extra["visibility"] == "public"
    assert t2i.model_extra == {"kind": "text-to-image", "used_for": "text-to-video first frame", "visibility": "public",
                               "description": "makes text-to-video's first frame"}

    retrieved = sdk(api).models.retrieve(VIDEO_MODEL)  # the SDK sends the "/" as %2F
    assert retrieved.id == VIDEO_MODEL and retrieved.model_extra["limits"] == extra["limits"]
    assert sdk(api).models.retrieve(T2I_MODEL).model_extra["kind"] == "text-to-image"
    # The video model also answers to its last path part, as the `model` request field does.
    assert sdk(api).models.retrieve("stable-video-diffusion-img2vid-xt-1-1").id == VIDEO_MODEL


def test_plain_http_shape_and_native_errors(api):
    headers = {"Authorization": f"Bearer {api.keys['alice']}"}
    body = api.get("/v1/models", headers=headers).json()
    assert body["object"] == "list" and len(body["data"]) == 2
    assert api.get(f"/v1/models/{VIDEO_MODEL}", headers=headers).json()["id"] == VIDEO_MODEL  # unencoded "/"
    missing = api.get("/v1/models/openai/sora-2", headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "model 'openai/sora-2' not found"}}
    unauthenticated = api.get("/v1/models")
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "unauthorized"
    assert api.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=api, max_retries=0).models.list()
    paths = api.get("/openapi.json").json()["paths"]
    assert "/v1/models" in paths and "/v1/models/{model_id}" in paths


def test_a_tenant_sees_only_the_models_it_may_use(api):
    assert list(sdk(api, "other").models.list()) == []
    for model in (VIDEO_MODEL, T2I_MODEL):
        with pytest.raises(openai.NotFoundError) as raised:
            sdk(api, "other").models.retrieve(model)
        assert raised.value.status_code == 404 and raised.value.body["code"] == "not_found"
    # allowed_models matches each model's own source: the text-to-image model is not listed.
    assert [model.id for model in sdk(api, "video_only").models.list()] == [VIDEO_MODEL]
    with pytest.raises(openai.NotFoundError):
        sdk(api, "video_only").models.retrieve(T2I_MODEL)


def test_the_tenants_own_caps_are_shown(api):
    capped = sdk(api, "capped").models.retrieve(VIDEO_MODEL).model_extra
    assert capped["tenant_limits"] == {"max_num_frames": 8, "max_pixels": 512 * 512}
    assert sdk(api).models.retrieve(VIDEO_MODEL).model_extra["tenant_limits"] == {}


def test_without_a_text_to_image_model(tmp_path):
    api = make_api(tmp_path, text_to_image_model=None)
    models = list(sdk(api).models.list())
    assert [model.id for model in models] == [VIDEO_MODEL]
    extra = models[0].model_extra
    assert extra["text_to_video"] is False and "text_to_image_model" not in extra
    assert extra["used_for"] == "image-to-video"
    with pytest.raises(openai.NotFoundError):
        sdk(api).models.retrieve(T2I_MODEL)


def test_the_listing_answers_while_the_model_is_loading(api):
    async def not_ready():
        raise TimeoutError("the model stage did not answer")

    api.service.model_info = not_ready
    video = sdk(api).models.retrieve(VIDEO_MODEL).model_extra
    assert "default_num_frames" not in video and video["kind"] == "image-to-video"


def test_owner_of_a_source():
    def owner(source):
        return ModelEntry(id="m", source=source).owned_by

    assert owner(VIDEO_MODEL) == "stabilityai"
    assert owner("/models/svd-xt") == owner("s3://bucket/svd") == owner("svd") == "svd-serve"
