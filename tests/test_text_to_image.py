"""The text-to-image stage reproduces diffusers' own pipeline exactly, on the tiny offline SDXL model."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import PIL.Image
import pytest
import torch
from threads import run_concurrently

from pipelines.errors import InvalidInputError, JobCancelledError, ModelLoadError
from pipelines.loader import ModelSpec, load_components
from pipelines.text_to_image import (
    TextToImageStage,
    load_text_to_image,
    text_to_image_components,
    text_to_image_pipeline_class,
)

TOLERANCE = 1e-4


@dataclass(frozen=True)
class T2IParams:
    """The attributes the stage reads (the real request model lives in pipelines/params.py)."""

    prompt: str = "a red fox running through the snow at sunset, cinematic photo"
    negative_prompt: str | None = None
    t2i_guidance_scale: float = 5.0
    t2i_num_inference_steps: int = 4
    seed: int | None = 0
    size: tuple[int, int] = (64, 64)

    def replace(self, **changes) -> T2IParams:
        return dataclasses.replace(self, **changes)


@pytest.fixture(scope="session")
def t2i_pipeline():
    from pipelines.tiny_t2i import build_tiny_text_to_image_pipeline

    pipe = build_tiny_text_to_image_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def t2i_stage(t2i_pipeline):
    components = {name: part for name, part in t2i_pipeline.components.items() if part is not None}
    return TextToImageStage(pipeline_class="StableDiffusionXLPipeline", **components)


def run_reference(pipe, params: T2IParams) -> np.ndarray:
    width, height = params.size
    extra = {} if params.negative_prompt is None else {"negative_prompt": params.negative_prompt}
    return pipe(
        params.prompt,
        guidance_scale=params.t2i_guidance_scale,
        num_inference_steps=params.t2i_num_inference_steps,
        width=width,
        height=height,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="np",
        **extra,
    ).images[0]


CASES = {
    "cfg-negative": T2IParams(seed=1234, negative_prompt="blurry, low quality, watermark", t2i_guidance_scale=6.5),
    "no-cfg-wide": T2IParams(
        prompt="an astronaut floating in space", seed=7, t2i_guidance_scale=1.0, t2i_num_inference_steps=3,
        size=(128, 64),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_stage_matches_diffusers(t2i_pipeline, t2i_stage, case):
    params = CASES[case]
    expected = run_reference(t2i_pipeline, params)
    actual = t2i_stage.generate(params)
    width, height = params.size
    assert actual.shape == expected.shape == (height, width, 3) and actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= TOLERANCE
    # The image must vary with the seed, or the comparison above proves nothing.
    other = t2i_stage.generate(params.replace(seed=params.seed + 1))
    assert np.abs(other - expected).max() > 1e-3


def test_call_returns_the_rgb_uint8_image(t2i_stage):
    params = T2IParams(seed=5, t2i_num_inference_steps=2)
    image = t2i_stage(params)
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == params.size
    expected = (t2i_stage.generate(params) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected)


def test_saved_model_round_trips(t2i_stage, tiny_t2i_model_dir):
    from diffusers import StableDiffusionXLPipeline

    loaded = load_text_to_image(ModelSpec(source=str(tiny_t2i_model_dir), dtype="fp32", device="cpu"))
    assert loaded["pipeline_class"] == "StableDiffusionXLPipeline"
    assert loaded["pipeline_config"] == {"force_zeros_for_empty_prompt": True}
    assert set(loaded) - {"pipeline_class", "pipeline_config"} == {
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae",
    }
    params = T2IParams(seed=11, negative_prompt="ugly", t2i_num_inference_steps=3)
    assert np.abs(TextToImageStage(**loaded).generate(params) - t2i_stage.generate(params)).max() <= 1e-5
    # The directory is an ordinary diffusers model too.
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tiny_t2i_model_dir), StableDiffusionXLPipeline)


def test_tokenizers_round_trip_and_take_any_prompt(t2i_pipeline, t2i_stage, tiny_t2i_model_dir):
    spec = ModelSpec(source=str(tiny_t2i_model_dir), dtype="fp32", device="cpu")
    loaded = load_components(spec, ("tokenizer", "tokenizer_2"))
    prompt = "Ünïcødé 日本語の猫 🦊🎬 — “quotes”, tabs\tand\nnewlines"
    for name in ("tokenizer", "tokenizer_2"):
        original = getattr(t2i_pipeline, name)
        ids = original(prompt).input_ids
        assert ids == loaded[name](prompt).input_ids
        assert original.unk_token_id not in ids[1:-1]  # byte-level: every character has tokens
        assert original.model_max_length == loaded[name].model_max_length == 77
    assert loaded["tokenizer_2"].pad_token == "!"  # as SDXL's second tokenizer
    # Common words are single tokens, so a long prompt really exceeds the 77-token context.
    assert len(t2i_pipeline.tokenizer("a cat over the ocean").input_ids) == 2 + 5
    long_prompt = "a golden dragon flying over ancient mountains, " * 20
    assert len(t2i_pipeline.tokenizer(long_prompt).input_ids) > 77
    for text in (prompt, long_prompt):
        image = t2i_stage.generate(T2IParams(prompt=text, t2i_num_inference_steps=2))
        assert np.isfinite(image).all()


def test_progress_is_reported_after_every_step(t2i_stage):
    seen = []
    t2i_stage.generate(T2IParams(t2i_num_inference_steps=5), on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(step, 5) for step in range(1, 6)]
    assert t2i_stage.total_steps(T2IParams(t2i_num_inference_steps=5)) == 5


@pytest.fixture()
def unet_calls(t2i_stage):
    calls = []
    handle = t2i_stage.components["unet"].register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_cancellation_stops_the_denoising_loop(t2i_stage, unet_calls):
    checks = []

    def cancel_after_two_steps():
        checks.append(1)
        return len(checks) == 3  # the checks: before step 1, after step 1, after step 2

    with pytest.raises(JobCancelledError, match="after text-to-image step 2 of 5"):
        t2i_stage.generate(T2IParams(t2i_num_inference_steps=5), should_cancel=cancel_after_two_steps)
    assert len(unet_calls) == 2  # one (CFG-batched) U-Net call per step: nothing ran after step 2

    with pytest.raises(JobCancelledError, match="before text-to-image step 1 of 5"):
        t2i_stage.generate(T2IParams(t2i_num_inference_steps=5), should_cancel=lambda: True)
    assert len(unet_calls) == 2
    # The stage is still usable after a cancelled run (each run has its own pipeline and scheduler).
    params = T2IParams(seed=21, t2i_num_inference_steps=3)
    assert np.abs(t2i_stage.generate(params) - t2i_stage.generate(params)).max() == 0


def test_concurrent_requests_share_one_stage_safely(t2i_stage):
    a, b = T2IParams(seed=1, t2i_num_inference_steps=4), T2IParams(seed=2, t2i_num_inference_steps=6)
    alone = {"a": t2i_stage.generate(a), "b": t2i_stage.generate(b)}
    together = run_concurrently({name: functools.partial(t2i_stage.generate, params, on_step=lambda *_: None)
                                 for name, params in (("a", a), ("b", b))})
    for name in ("a", "b"):
        assert np.abs(together[name] - alone[name]).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"size": (60, 64)}, InvalidInputError, "multiples of 8"),
        ({"negative_prompt": "blurry", "t2i_guidance_scale": 1.0}, InvalidInputError, "guidance_scale > 1"),
        ({"seed": None}, ValueError, "seed"),
    ],
)
def test_invalid_requests_are_refused_before_any_work(t2i_stage, unet_calls, changes, error, match):
    with pytest.raises(error, match=match):
        t2i_stage.generate(T2IParams(**changes))
    assert unet_calls == []


def test_a_video_model_is_refused(tiny_model_dir):
    # tiny_model_dir is pipelines.tiny.write_tiny_model's StableVideoDiffusionPipeline.
    with pytest.raises(ModelLoadError, match="StableVideoDiffusionPipeline is not a text-to-image pipeline"):
        load_text_to_image(ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu"))


@pytest.mark.parametrize(
    ("class_name", "match"),
    [
        ("StableDiffusionXLImg2ImgPipeline", "not a text-to-image pipeline"),
        ("NoSuchPipeline", "not a pipeline class"),
        ("AutoencoderKL", "not a pipeline class"),
        ("os.system", "not a pipeline class"),
    ],
)
def test_only_text_to_image_pipeline_classes_are_accepted(class_name, match):
    with pytest.raises(ModelLoadError, match=match):
        text_to_image_pipeline_class(class_name)
    for name in ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert text_to_image_pipeline_class(name).__name__ == name


def test_components_skip_optional_and_null_entries():
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    }
    assert text_to_image_components(index) == ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def test_stage_refuses_components_the_pipeline_does_not_take(t2i_pipeline):
    with pytest.raises(ModelLoadError, match="takes no component"):
        TextToImageStage(scheduler=t2i_pipeline.scheduler, transformer=t2i_pipeline.unet)
    with pytest.raises(ModelLoadError, match="Cannot build StableDiffusionXLPipeline"):
        TextToImageStage(scheduler=t2i_pipeline.scheduler, vae=t2i_pipeline.vae)
