"""GenerationParams: defaults, ranges, presets, aliases and one-line error messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.params import ASPECT_PRESETS, MAX_SEED, GenerationParams, OutputFormat, describe_validation_error


def error_text(**values) -> str:
    with pytest.raises(ValidationError) as info:
        GenerationParams(**values)
    text = describe_validation_error(info.value)
    assert "\n" not in text
    return text


def test_defaults_match_diffusers():
    params = GenerationParams()
    assert (params.num_inference_steps, params.fps, params.motion_bucket_id) == (25, 7, 127)
    assert params.noise_aug_strength == 0.02
    assert (params.min_guidance_scale, params.max_guidance_scale) == (1.0, 3.0)
    assert params.size == (1024, 576)
    assert params.output_format is OutputFormat.mp4
    assert params.resolved_output_fps == 7


def test_seed_is_drawn_when_absent_and_kept_when_given():
    drawn = {GenerationParams().with_seed().seed for _ in range(20)}
    assert all(0 <= seed <= MAX_SEED for seed in drawn) and len(drawn) > 1
    assert GenerationParams(seed=5).with_seed().seed == 5
    assert GenerationParams(seed=MAX_SEED).seed == MAX_SEED


def test_resolved_fills_every_default():
    resolved = GenerationParams(aspect_ratio="9:16").resolved(default_num_frames=25)
    assert resolved.num_frames == 25 and resolved.seed is not None and resolved.size == (576, 1024)
    explicit = GenerationParams(width=512, height=256, num_frames=8).resolved(default_num_frames=25)
    assert (explicit.width, explicit.height, explicit.num_frames) == (512, 256, 8)


@pytest.mark.parametrize("preset", list(ASPECT_PRESETS))
def test_aspect_presets(preset):
    width, height = GenerationParams(aspect_ratio=preset).size
    assert width % 64 == 0 and height % 64 == 0 and max(width, height) <= 1536
    assert (width, height) == ASPECT_PRESETS[preset]


def test_cond_aug_alias_and_output_fps():
    params = GenerationParams(cond_aug=0.5, fps=6, output_fps=24)
    assert params.noise_aug_strength == 0.5
    assert GenerationParams(noise_aug_strength=0.3).noise_aug_strength == 0.3
    assert (params.fps, params.resolved_output_fps) == (6, 24)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"motion_bucket_id": 300}, "motion_bucket_id: 300 is out of range (allowed: 1 to 255)"),
        ({"motion_bucket_id": 0}, "motion_bucket_id: 0 is out of range (allowed: 1 to 255)"),
        ({"seed": -1}, "seed: -1 is out of range (allowed: 0 to 4294967294)"),
        ({"seed": 2**32 - 1}, "seed: 4294967295 is out of range (allowed: 0 to 4294967294)"),
        ({"cond_aug": 11}, "cond_aug: 11 is out of range (allowed: 0.0 to 10.0)"),
        ({"width": 1004, "height": 576}, "width: 1004 is out of range (allowed: 64 to 1536, a multiple of 8)"),
        ({"width": 2048, "height": 576}, "width: 2048 is out of range (allowed: 64 to 1536, a multiple of 8)"),
        ({"num_inference_steps": 0}, "num_inference_steps: 0 is out of range (allowed: 1 to 150)"),
        ({"fps": 0}, "fps: 0 is out of range (allowed: 1 to 60)"),
    ],
)
def test_out_of_range_names_field_and_range(values, expected):
    assert error_text(**values) == expected


def test_cross_field_errors():
    assert "min_guidance_scale (4.0) must not exceed max_guidance_scale (3.0)" in error_text(min_guidance_scale=4.0)
    assert "width and height must be given together" in error_text(width=512)
    assert "either aspect_ratio or width and height" in error_text(aspect_ratio="1:1", width=512, height=512)


def test_unknown_parameter_and_bad_choice():
    assert error_text(num_frame=14) == "num_frame: unknown parameter"
    assert error_text(output_format="avi").startswith("output_format:")
    assert error_text(aspect_ratio="2:1").startswith("aspect_ratio:")


def test_serialises_with_resolved_seed_for_clients():
    dumped = GenerationParams(seed=9, cond_aug=0.1).model_dump(mode="json")
    assert dumped["seed"] == 9 and dumped["noise_aug_strength"] == 0.1 and dumped["output_format"] == "mp4"
    assert GenerationParams.model_validate(dumped) == GenerationParams(seed=9, cond_aug=0.1)


def test_large_sizes_up_to_1536x864():
    assert GenerationParams(width=1536, height=864).size == (1536, 864)
    assert GenerationParams(width=864, height=1536).size == (864, 1536)
    assert GenerationParams(width=1000, height=560).size == (1000, 560)  # multiples of 8
    assert "at most 1327104" in error_text(width=1536, height=1536)


def test_text_to_video_fields_need_a_prompt():
    text = error_text(negative_prompt="blurry", t2i_num_inference_steps=4)
    assert text == "negative_prompt, t2i_num_inference_steps only apply to text-to-video: give a prompt (and no image)"
    resolved = GenerationParams(prompt="a lighthouse").resolved(default_num_frames=25)
    assert resolved.text_to_video and resolved.keeps_conditioning_frame
    assert (resolved.t2i_guidance_scale, resolved.t2i_num_inference_steps) == (5.0, 30)
    assert GenerationParams(prompt="x", t2i_guidance_scale=0.0).resolved(14).t2i_guidance_scale == 0.0
    assert not GenerationParams().resolved(14).text_to_video
    assert error_text(prompt="").startswith("prompt:")


def test_long_clip_and_interpolation_rules():
    params = GenerationParams(duration_s=8, output_fps=24)
    assert params.resolved_interpolation == "mci" and params.interpolates
    assert GenerationParams(output_fps=24).resolved_interpolation == "none"
    assert GenerationParams(output_fps=24, interpolation="blend").interpolates
    assert "use interpolation blend or mci" in error_text(duration_s=8, interpolation="none")
    assert "overlap_frames only applies to long clips" in error_text(overlap_frames=2)
    assert "output_fps: at most 60 with interpolation mci" in error_text(duration_s=4, output_fps=90)
    assert GenerationParams(output_fps=90).resolved_output_fps == 90  # playback rate only: no cap at 60
    assert error_text(duration_s=0).startswith("duration_s:")
    resolved = params.resolved(default_num_frames=25)
    assert resolved.interpolation == "mci"
    assert GenerationParams.model_validate(resolved.model_dump(mode="json")) == resolved


def test_segments_draw_their_own_noise():
    params = GenerationParams(seed=7, duration_s=8).resolved(25)
    assert params.for_segment(0) is params
    assert [params.for_segment(i).seed for i in range(3)] == [7, 8, 9]
    assert GenerationParams(seed=MAX_SEED).for_segment(1).seed == 0
