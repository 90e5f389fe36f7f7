"""OpenAI's Videos API on the native ``/v1/videos``: the official ``openai`` SDK (the version pinned in
pyproject.toml), unmodified, against ``make serve``'s local deployment (tiny CPU model, SQLite,
local storage). ``OpenAI(base_url=URL + "/v1", api_key=KEY)`` is the only setup.

create with an ``input_reference`` image -> ``create_and_poll`` / ``poll`` (paced by the
``openai-poll-after-ms`` header) -> ``download_content`` (the MP4, decoded by ffmpeg with the
requested frame count, and the thumbnail) -> ``list`` (``after``/``limit``/``order``) -> ``delete``;
another tenant's id is the SDK's ``NotFoundError``; the ``limited`` tenant gets ``RateLimitError``
and the SDK waits the ``Retry-After`` it was given; ``GET /v1/usage`` counts the jobs.
"""

from __future__ import annotations

import io
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipelines.sample_image import SAMPLE_IMAGE_PATH

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
#: What the SDK uploads as ``input_reference``: (file name, bytes, content type).
REFERENCE = ("sample.png", PNG, "image/png")
#: Native parameters ride along in the same form with the SDK's ``extra_body``: few steps on CPU.
FAST = {"num_inference_steps": 2}


def sdk(local_service, tenant="alice", **options):
    import openai

    return openai.OpenAI(base_url=f"{local_service.url}/v1", api_key=local_service.keys[tenant], **options)


def usage(local_service, tenant):
    response = httpx.get(f"{local_service.url}/v1/usage", timeout=30,
                         headers={"Authorization": f"Bearer {local_service.keys[tenant]}"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_usage(local_service, tenant, completed, timeout_s=60):
    deadline = time.monotonic() + timeout_s  # usage is recorded as the job ends, just after it shows
    while (seen := usage(local_service, tenant)["jobs"]["completed"]) < completed:
        assert time.monotonic() < deadline, f"usage shows {seen} completed jobs, expected {completed}"
        time.sleep(0.5)


def test_openai_sdk_create_poll_download_list_delete(local_service, tiny_model_dir, tmp_path):
    from PIL import Image

    from pipelines.video import decode_video_frames

    client = sdk(local_service)
    completed_before = usage(local_service, "alice")["jobs"]["completed"]
    waits: list[float] = []
    sleep = client.videos._sleep
    client.videos._sleep = lambda seconds: (waits.append(seconds), sleep(seconds))  # observe the poll pacing

    model = Path(tiny_model_dir).name
    # 256x128: a size SVD takes as it is (OpenAI's sizes map to 1024x576 presets, too slow on CPU;
    # test_openai_sizes_map_to_the_presets checks those without generating).
    video = client.videos.create_and_poll(prompt="a lighthouse at dusk", input_reference=REFERENCE, model=model,
                                          seconds="4", size="256x128", extra_body=FAST)
    assert video.status == "completed", video
    assert video.object == "video" and video.progress == 100 and video.error is None
    assert video.prompt == "a lighthouse at dusk" and video.model == model  # the id: the directory's name
    assert video.seconds == "4" and video.size == "256x128"  # 4 s x 7 fps = 28 frames
    assert isinstance(video.created_at, int) and video.created_at <= video.completed_at <= video.expires_at
    assert waits and set(waits) <= {0.5, 1.0}  # openai-poll-after-ms: 1000 queued, 500 running

    clip = client.videos.download_content(video.id)  # variant=video
    path = tmp_path / "clip.mp4"
    clip.write_to_file(path)
    frames = decode_video_frames(path)
    assert frames.shape == (28, 128, 256, 3)
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    image = np.asarray(Image.open(io.BytesIO(thumbnail.content)).convert("RGB"))
    assert thumbnail.response.headers["content-type"] == "image/jpeg" and image.shape == (128, 256, 3)
    assert np.abs(image.astype(int) - frames[0].astype(int)).mean() < 8  # the first frame (JPEG-compressed)

    second = client.videos.create(prompt="waves", input_reference=REFERENCE, seconds="2", size="256x128",
                                  extra_body=FAST)
    assert second.status in ("queued", "in_progress")
    second = client.videos.poll(second.id)
    assert second.status == "completed" and second.seconds == "2" and second.size == "256x128"
    assert decode_video_frames(client.videos.download_content(second.id).content).shape == (14, 128, 256, 3)

    page = client.videos.list(limit=1)
    assert [v.id for v in page.data] == [second.id] and page.has_more is True
    assert page.first_id == page.last_id == second.id
    newest_first = [v.id for v in client.videos.list(limit=1)]  # the SDK pages on after=last_id
    assert newest_first.index(second.id) < newest_first.index(video.id)
    oldest_first = [v.id for v in client.videos.list(limit=2, order="asc")]
    assert oldest_first == newest_first[::-1]
    assert [v.id for v in client.videos.list(after=video.id, order="asc", limit=5).data][:1] == [second.id]

    wait_for_usage(local_service, "alice", completed_before + 2)
    for job in (video, second):
        deleted = client.videos.delete(job.id)
        assert (deleted.id, deleted.object, deleted.deleted) == (job.id, "video.deleted", True)
    import openai

    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert usage(local_service, "alice")["jobs"]["completed"] >= completed_before + 2  # deleting keeps the usage


@pytest.mark.parametrize("size, generated", [("720x1280", "576x1024"), ("1280x720", "1024x576"),
                                             ("1024x1792", "576x1024"), ("1792x1024", "1024x576")])
def test_openai_sizes_map_to_the_presets(local_service, size, generated):
    client = sdk(local_service, "bob")
    video = client.videos.create(prompt="x", input_reference=REFERENCE, size=size, seconds="8", extra_body=FAST)
    cancelled = httpx.post(f"{local_service.url}/v1/videos/{video.id}/cancel", timeout=30,
                           headers={"Authorization": f"Bearer {local_service.keys['bob']}"}).json()
    assert video.size == generated and video.seconds == "8" and cancelled["params"]["num_frames"] == 56
    if cancelled["status"] == "cancelled":  # it may have started; then it stops within a step
        assert client.videos.retrieve(video.id).error.code == "cancelled"


def test_another_tenants_id_is_the_sdks_not_found(local_service):
    import openai

    alice, bob = sdk(local_service, max_retries=0), sdk(local_service, "bob", max_retries=0)
    video = alice.videos.create(prompt="mine", input_reference=REFERENCE, size="256x128", seconds="1",
                                extra_body=FAST)
    for call in (lambda: bob.videos.retrieve(video.id), lambda: bob.videos.delete(video.id),
                 lambda: bob.videos.download_content(video.id),
                 lambda: bob.videos.download_content(video.id, variant="thumbnail"),
                 lambda: bob.videos.list(after=video.id)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.code == "not_found"
    assert video.id not in [v.id for v in bob.videos.list()]
    done = alice.videos.poll(video.id)
    assert done.status == "completed"
    assert alice.videos.delete(video.id).deleted is True


def test_rejections_are_the_sdks_errors_naming_the_field(local_service):
    import openai

    client = sdk(local_service, max_retries=0)
    cases = [({"size": "1004x1000"}, "size: '1004x1000' cannot be mapped"),
             ({"seconds": "0.1"}, "at least 2 frames")]
    for arguments, message in cases:
        with pytest.raises(openai.UnprocessableEntityError) as info:
            client.videos.create(prompt="x", input_reference=REFERENCE, **arguments)
        assert info.value.code == "invalid_parameter" and message in str(info.value.body["message"])
    with pytest.raises(openai.NotFoundError) as info:  # as OpenAI answers an unknown model
        client.videos.create(prompt="x", input_reference=REFERENCE, model="sora-2")
    assert info.value.code == "model_not_found" and "'sora-2' not found" in info.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as info:  # a prompt alone is text-to-video, here too long
        client.videos.create(prompt="a prompt alone", extra_body={"duration_s": 9})
    assert "duration_s: 9 s is over this deployment's maximum of 8 s" in info.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        sdk(local_service, max_retries=0).with_options(api_key="svd_wrong").videos.list()


def test_the_limited_tenant_gets_rate_limit_error_and_the_sdk_honours_retry_after(local_service, monkeypatch):
    import openai
    import openai._base_client as base_client

    slept: list[float] = []  # the SDK's retry sleep, recorded instead of waited
    monkeypatch.setattr(base_client, "time", types.SimpleNamespace(sleep=slept.append, time=time.time))
    client = sdk(local_service, "limited", max_retries=1)
    refused: list[str | None] = []  # Retry-After of each answer the SDK considered retrying
    should_retry = client._should_retry
    client._should_retry = lambda response: (refused.append(response.headers.get("retry-after")),
                                             should_retry(response))[1]
    error = None
    for _ in range(2):  # the tenant's one token (burst 1, 1 a minute) may be spent by an earlier test
        try:
            client.videos.create(prompt="x", input_reference=REFERENCE, size="256x128", seconds="1", extra_body=FAST)
        except openai.RateLimitError as raised:
            error = raised
            break
    assert error is not None, "the limited tenant was never refused"
    assert error.code in ("rate_limited", "queue_full") and int(error.response.headers["retry-after"]) >= 1
    # The first refusal said when to come back; the SDK waited exactly that, retried once, and
    # raised the second refusal.
    assert len(refused) == 1 and refused[0] is not None and int(refused[0]) >= 1
    assert slept == [float(refused[0])]
