"""Text-to-video and long clips in one process (StagedPipeline): the first frame is the
text-to-image frame, segments meet at a shared seam frame, steps count across segments, a cancel
stops inside a later segment, and the frame count follows the documented rule."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import PIL.Image
import pytest

from pipelines.errors import JobCancelledError
from pipelines.params import GenerationParams
from pipelines.sample_image import draw_sample_image
from pipelines.segments import output_frame_count, plan_segments
from pipelines.staged import StagedPipeline
from pipelines.video import decode_video_frames, probe_video

#: Tiny and quick: 64x64, 6 frames a pass, 2 steps.
SMALL = {"width": 64, "height": 64, "num_frames": 6, "num_inference_steps": 2, "seed": 11}
T2I = {"t2i_num_inference_steps": 2, "t2i_guidance_scale": 3.0}


@pytest.fixture(scope="module")
def tiny_t2i():
    from pipelines.tiny_t2i import build_tiny_text_to_image_pipeline

    return build_tiny_text_to_image_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline, tiny_t2i):
    return StagedPipeline(tiny_pipeline, text_to_image=tiny_t2i)


@contextlib.contextmanager
def recording_decodes(pipeline):
    """Every decode stage output of the calls made inside, as uint8 frames."""
    decoded, original = [], type(pipeline.decode).__call__

    def recording(stage, sampled, params):
        frames = original(stage, sampled, params)
        decoded.append(frames.frames.copy())
        return frames

    type(pipeline.decode).__call__ = recording
    try:
        yield decoded
    finally:
        type(pipeline.decode).__call__ = original


def codec_loss(clip: np.ndarray, frames: np.ndarray) -> float:
    """Mean absolute difference H.264 left on these frames (random-weight frames are noise-like,
    so 4:2:0 chroma costs several grey levels)."""
    return float(np.abs(clip.astype(np.int16) - frames.astype(np.int16)).mean())


def test_text_to_video_opens_on_the_text_to_image_frame(pipeline, tiny_t2i):
    params = GenerationParams(prompt="a lighthouse at dusk", **SMALL, **T2I)
    with recording_decodes(pipeline) as decoded:
        result = pipeline(None, params)
    assert list(result.timings) == ["text_to_image", "image_encode", "sampling", "decode", "video_encode"]
    # The stage's frame is what diffusers' own SDXL pipeline makes for that seed ...
    expected = pipeline.text_to_image.generate(result.params)
    first_frame = np.asarray(result.first_frame)
    assert np.array_equal(first_frame, (expected * 255).round().astype(np.uint8))
    # ... the clip's frames open on it exactly before encoding, and after within the codec's loss.
    assert np.array_equal(decoded[0][0], first_frame)
    clip = decode_video_frames(result.video.data)
    assert codec_loss(clip[0], first_frame) <= 1.5 * codec_loss(clip[1:], decoded[0][1:])
    # The poster is a JPEG of that frame itself (not of the lossy clip).
    poster = np.asarray(PIL.Image.open(io.BytesIO(result.video.poster)).convert("RGB"))
    buffer = io.BytesIO()
    result.first_frame.save(buffer, format="JPEG", quality=90)
    assert np.array_equal(poster, np.asarray(PIL.Image.open(buffer).convert("RGB")))
    # One seed drives both stages: the same request makes the same clip, another seed another.
    again = pipeline(None, params)
    assert again.video.data == result.video.data
    other = pipeline(None, params.model_copy(update={"seed": 12}))
    assert np.abs(np.asarray(other.first_frame, np.int16) - np.asarray(result.first_frame, np.int16)).mean() > 5


def test_an_image_and_a_prompt_are_one_or_the_other(pipeline):
    with pytest.raises(ValueError, match="exactly one"):
        pipeline(draw_sample_image(), GenerationParams(prompt="x", **SMALL))
    with pytest.raises(ValueError, match="exactly one"):
        pipeline(None, GenerationParams(**SMALL))


def test_text_to_video_needs_the_text_to_image_model(tiny_pipeline):
    with pytest.raises(ValueError, match="text_to_image"):
        StagedPipeline(tiny_pipeline)(None, GenerationParams(prompt="x", **SMALL))


def test_long_clip_frame_count_and_seams(pipeline):
    # 6 frames a pass at fps 7 over 3 s: round(21 / 5) = 4 segments, 6 + 3 x 5 = 21 frames, retimed
    # to 3 s at 12 fps: 3 x 12 + 1 = 37 frames.
    params = GenerationParams(duration_s=3, output_fps=12, **SMALL)
    plan = plan_segments(duration_s=3, fps=7, frames_per_segment=6)
    assert (plan.num_segments, plan.total_frames) == (4, 21)
    steps = []
    result = pipeline(draw_sample_image(), params, on_step=lambda done, total: steps.append((done, total)))
    assert result.num_segments == 4 and result.params.interpolation == "mci"
    assert result.video.num_frames == output_frame_count(generated_frames=21, duration_s=3, output_fps=12) == 37
    info = probe_video(result.video.data)
    assert (info.frames, round(info.fps)) == (37, 12)
    # Steps count across the segments, in order, to 4 x 2.
    assert steps == [(done, 8) for done in range(1, 9)]


def test_segments_share_their_seam_frame(pipeline):
    # 2 s at fps 5 with 6-frame passes: round(10 / 5) = 2 segments, 6 + 5 = 11 frames over 2 s, i.e.
    # 5 fps: with output_fps 5 the generated frames pass through retiming unchanged.
    params = GenerationParams(duration_s=2, fps=5, output_fps=5, interpolation="blend", **SMALL)
    with recording_decodes(pipeline) as decoded:
        result = pipeline(draw_sample_image(), params)
    first, second = decoded
    # Segment 2 opens exactly on segment 1's last frame (the image it was conditioned on) ...
    assert np.array_equal(second[0], first[-1])
    # ... which the clip holds once: 6 + 5 frames, not 12, in order.
    assert result.video.num_frames == 11
    clip = decode_video_frames(result.video.data)
    generated = np.concatenate([first, second[1:]])
    loss = codec_loss(clip, generated)
    assert loss < 0.8 * codec_loss(clip, np.concatenate([first, second[:-1]]))  # an off-by-one seam is worse


def test_cancel_stops_inside_the_second_segment(pipeline):
    params = GenerationParams(duration_s=2, fps=5, **SMALL)  # 2 segments x 2 steps
    steps = []

    def cancel_in_segment_two() -> bool:
        return len(steps) >= 3  # segment 2's first step is done

    with pytest.raises(JobCancelledError):
        pipeline(draw_sample_image(), params, on_step=lambda d, t: steps.append(d), should_cancel=cancel_in_segment_two)
    assert steps == [1, 2, 3]


def test_segments_draw_different_noise(pipeline):
    # Two segments conditioned on the same image would still differ: segment k draws from seed + k.
    params = GenerationParams(**SMALL).resolved(6)
    image = draw_sample_image()
    encoded = [pipeline.image_encode(image, params.for_segment(k)) for k in (0, 1)]
    assert not np.allclose(encoded[0].image_latents.numpy(), encoded[1].image_latents.numpy())


def test_automatic_decode_chunk_size():
    from pipelines.stages import auto_decode_chunk_size

    # About 1.2 GB of activations per 1024x576 fp16 frame; 80% of the budget is used.
    assert auto_decode_chunk_size(free_bytes=40 * 10**9, height=576, width=1024) == 26
    assert auto_decode_chunk_size(free_bytes=10**9, height=576, width=1024) == 1  # at least one frame
    assert auto_decode_chunk_size(free_bytes=10**12, height=576, width=1024) == 64  # at most 64
    assert auto_decode_chunk_size(free_bytes=40 * 10**9, height=864, width=1536) == 11


def test_a_cpu_decode_uses_the_default_chunk_unless_given(pipeline):
    from pipelines.stages import DEFAULT_DECODE_CHUNK

    params = GenerationParams(**SMALL).resolved(6)
    assert pipeline.decode.chunk_size(params, height=64, width=64) == DEFAULT_DECODE_CHUNK
    given = GenerationParams(**SMALL, decode_chunk_size=3).resolved(6)
    assert pipeline.decode.chunk_size(given, height=64, width=64) == 3


def test_a_two_frame_clip_needs_no_segment_plan(pipeline):
    result = pipeline(draw_sample_image(), GenerationParams(**{**SMALL, "num_frames": 2}))
    assert result.video.num_frames == 2 and result.num_segments == 1
