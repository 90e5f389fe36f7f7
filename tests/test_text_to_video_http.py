"""Text-to-video and long clips over HTTP, on ``make serve``'s local deployment (real Ray Serve,
the tiny SVD and tiny SDXL-shaped models on CPU), the clips decoded by ffmpeg.

The cancel-in-segment-two and kill-the-Sampler-in-segment-two tests run on the multi-node cluster
of tests/test_serve_cluster.py (Redis job store, S3 storage).
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.params import GenerationParams
from pipelines.segments import output_frame_count, plan_segments
from pipelines.video import decode_video_frames, probe_video

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "t2i_num_inference_steps": 2}
TERMINAL = {"completed", "failed", "cancelled"}


def auth(service, tenant="alice") -> dict:
    return {"Authorization": f"Bearer {service.keys[tenant]}"}


def wait_terminal(client: httpx.Client, service, job_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/videos/{job_id}", headers=auth(service)).json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end in {timeout_s}s")


def content(client: httpx.Client, service, job_id: str, variant: str = "video") -> bytes:
    response = client.get(f"/v1/videos/{job_id}/content", params={"variant": variant}, headers=auth(service),
                          follow_redirects=True)
    assert response.status_code == 200, response.text
    return response.content


@pytest.fixture(scope="module")
def client(local_service):
    with httpx.Client(base_url=local_service.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def text_to_image(tiny_t2i_model_dir):
    """The text-to-image stage in this process, loaded from the directory the service loads."""
    from pipelines.loader import ModelSpec
    from pipelines.text_to_image import TextToImageStage, load_text_to_image

    return TextToImageStage(**load_text_to_image(ModelSpec(source=str(tiny_t2i_model_dir), dtype="fp32",
                                                           device="cpu")))


def test_a_prompt_alone_makes_a_clip_that_opens_on_the_text_to_image_frame(local_service, client, text_to_image):
    response = client.post("/v1/videos", headers=auth(local_service),
                           json={"prompt": "a lighthouse at dusk", "seed": 31, "num_frames": 6, **SMALL})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["prompt"] == "a lighthouse at dusk" and created["params"]["prompt"] == "a lighthouse at dusk"
    assert created["params"]["t2i_guidance_scale"] == 5.0  # resolved defaults are shown back
    done = wait_terminal(client, local_service, created["id"])
    assert done["status"] == "completed", done
    assert {"text_to_image", "image_encode", "sampling", "decode", "video_encode"} <= set(done["timings"])

    clip = decode_video_frames(content(client, local_service, created["id"]))
    assert clip.shape == (6, 64, 64, 3)
    params = GenerationParams.model_validate(done["params"])
    expected = (text_to_image.generate(params) * 255).round().astype(np.uint8)
    other = (text_to_image.generate(params.model_copy(update={"seed": 32})) * 255).round().astype(np.uint8)
    first = clip[0].astype(np.int16)
    same, different = (float(np.abs(first - image.astype(np.int16)).mean()) for image in (expected, other))
    # Within H.264's loss of the frame it opens on (noise-like random-weight frames lose ~10
    # levels to 4:2:0 chroma), and far from another seed's frame.
    assert same < 0.6 * different, (same, different)
    # The poster is a JPEG of that frame itself.
    poster = np.asarray(Image.open(io.BytesIO(content(client, local_service, created["id"], "thumbnail")))
                        .convert("RGB"), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(expected).save(buffer, format="JPEG", quality=90)
    reference = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.int16)
    assert np.abs(poster - reference).mean() < 1.0


def test_an_eight_second_clip_at_24_fps(local_service, client):
    # The tiny model makes 14 frames a pass: 8 s at fps 7 is round(56 / 13) = 4 segments, 14 + 3 x 13
    # = 53 generated frames, retimed (mci) to 8 x 24 + 1 = 193 frames at 24 fps.
    plan = plan_segments(duration_s=8, fps=7, frames_per_segment=14)
    assert (plan.num_segments, plan.total_frames) == (4, 53)
    response = client.post("/v1/videos", headers=auth(local_service),
                           json={"prompt": "waves", "duration_s": 8, "output_fps": 24, "seed": 5, **SMALL})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["seconds"] == "8.04" and created["progress_detail"]["segments"] == 4
    done = wait_terminal(client, local_service, created["id"])
    assert done["status"] == "completed", done
    assert done["progress_detail"]["segments_done"] == 4
    assert done["progress_detail"]["step"] == done["progress_detail"]["total_steps"] == 4 * 2

    data = content(client, local_service, created["id"])
    frames = decode_video_frames(data)
    expected = output_frame_count(generated_frames=53, duration_s=8, output_fps=24)
    assert expected == 193 and len(frames) == expected
    info = probe_video(data)
    assert round(info.fps) == 24 and info.frames == expected
    assert abs(info.frames / info.fps - 8.0) <= 1 / 24  # 8 s within one frame
    # The segments' stored frames are gone once the clip is made.
    leftovers = list((local_service.data_dir / "outputs").rglob(f"{created['id']}/segment-*"))
    assert leftovers == []


def test_long_clip_limits_are_422(local_service, client):
    too_long = client.post("/v1/videos", headers=auth(local_service), json={"prompt": "x", "duration_s": 9, **SMALL})
    assert too_long.status_code == 422
    assert "duration_s: 9 s is over this deployment's maximum of 8 s" in too_long.json()["error"]["message"]
    both = client.post("/v1/videos", headers=auth(local_service),
                       json={"prompt": "x", "negative_prompt": "y", "image_url": "data:image/png;base64,AAAA"})
    assert both.status_code == 422 and "negative_prompt" in both.json()["error"]["message"]


def test_other_work_runs_between_the_segments_of_a_long_clip(local_service, client):
    # One Sampler replica taking one request at a time: a short job submitted while segment 1 of a
    # long clip samples can only finish before the clip's segment 2 does if it ran in between.
    long = client.post("/v1/videos", headers=auth(local_service),
                       json={"prompt": "x", "duration_s": 1.5, "num_frames": 6, "num_inference_steps": 100,
                             "width": 64, "height": 64, "t2i_num_inference_steps": 2})
    assert long.status_code == 202, long.text
    long_id = long.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        detail = client.get(f"/v1/videos/{long_id}", headers=auth(local_service)).json()["progress_detail"]
        if detail["stage"] == "sampling" and 0 < detail["step"] < 40:  # early in segment 1
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the long clip never started sampling its first segment")
    short = client.post("/v1/videos", headers=auth(local_service, "bob"),
                        json={"prompt": "y", "num_frames": 6, "num_inference_steps": 2, "width": 64, "height": 64,
                              "t2i_num_inference_steps": 2})
    assert short.status_code == 202, short.text
    short_id = short.json()["id"]
    while True:
        quick = client.get(f"/v1/videos/{short_id}", headers=auth(local_service, "bob")).json()
        if quick["status"] in TERMINAL:
            break
        time.sleep(0.05)
    clip = client.get(f"/v1/videos/{long_id}", headers=auth(local_service)).json()
    assert quick["status"] == "completed", quick
    assert clip["status"] == "in_progress" and clip["progress_detail"]["step"] < 200, clip["progress_detail"]
    assert wait_terminal(client, local_service, long_id)["status"] == "completed"
