"""The text-to-image stage: a prompt becomes the first frame of a text-to-video job.

Unlike the SVD stages (pipelines/stages.py), which re-implement diffusers' loop so that the model
can be split across processes, this stage wraps the diffusers pipeline class itself: the image
model is one unit (text encoders, denoiser, VAE) and wrapping lets it be *any* diffusers
text-to-image pipeline (SDXL, SDXL-Turbo, SD 3.5, FLUX.1-schnell, ...) with exact parity with that
class by construction. The class is the one model_index.json names in ``_class_name``; it is built
from only the components it needs, the optional ones (image encoder, feature extractor, safety
checker) passed as None.

The seed seeds a CPU ``torch.Generator``, so an image depends only on the model, the parameters
and the seed, not on the device it was generated on; a seed reproduces diffusers' own output for
that generator. A fresh pipeline object (and scheduler) is made for every call from the shared
sub-models: diffusers pipelines and schedulers keep per-run state on ``self``, and making one is
cheap (well under a millisecond), so concurrent requests on one stage never share it.

What crosses the boundary to the video stages: one RGB ``PIL.Image`` at the video's size, e.g.
1024x576 uint8 (~1.7 MB), which the image encode stage takes as the conditioning image.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedTokenizerBase

from .errors import InvalidInputError, JobCancelledError, ModelLoadError
from .loader import DEFAULT_TEXT_TO_IMAGE_MODEL_ID, ModelSpec, load_components, resolve_model_dir
from .loader.layout import _index_components, _read_model_index
from .loader.spec import _one_line

# The same callback types as pipelines.stages (not imported: that module pulls in the SVD stages).
ProgressCallback = Callable[[int, int], None]
"""Called after every denoising step with (steps_done, total_steps)."""

CancelCheck = Callable[[], bool]
"""Called before the first step and after every step; returning True stops the job with JobCancelledError."""

DEFAULT_TEXT_TO_IMAGE_MODEL = DEFAULT_TEXT_TO_IMAGE_MODEL_ID

#: Components a text-to-image run never uses (IP-Adapter inputs, the SD 1.x safety checker).
OPTIONAL_COMPONENTS = ("image_encoder", "feature_extractor", "safety_checker")

# What the stage passes to every pipeline; a pipeline whose __call__ lacks one cannot be served.
_REQUIRED_CALL_ARGUMENTS = (
    "prompt", "height", "width", "num_inference_steps", "generator", "output_type", "callback_on_step_end",
)


def text_to_image_components(model_index: dict) -> tuple[str, ...]:
    """The component names to load: the model_index.json entries that are present and not optional."""
    return tuple(name for name in _index_components(model_index) if name not in OPTIONAL_COMPONENTS)


def text_to_image_pipeline_class(class_name: str) -> type:
    """The diffusers text-to-image pipeline class called ``class_name``; ModelLoadError if it is not one."""
    import diffusers

    cls = None
    if isinstance(class_name, str) and class_name.isidentifier():
        try:
            cls = getattr(diffusers, class_name, None)
        except Exception:  # noqa: BLE001 - a lazy import that fails means "not available here"
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ModelLoadError(f"{class_name!r} is not a pipeline class of diffusers {diffusers.__version__}")
    if not _is_text_to_image(cls):
        raise ModelLoadError(f"{class_name} is not a text-to-image pipeline (not in AutoPipelineForText2Image)")
    missing = [name for name in _REQUIRED_CALL_ARGUMENTS if name not in _call_parameters(cls)]
    if missing:
        raise ModelLoadError(f"{class_name} cannot be served: its __call__ has no {', '.join(missing)} argument")
    return cls


def _is_text_to_image(cls: type) -> bool:
    try:
        from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
    except ImportError:  # pragma: no cover - present in every diffusers this project supports
        return "prompt" in _call_parameters(cls)
    # The mapping is what AutoPipelineForText2Image accepts; a prompt argument alone would also
    # admit image-to-image and inpainting pipelines (their image argument defaults to None).
    return any(candidate.__name__ == cls.__name__ for candidate in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values())


def _call_parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(cls.__call__).parameters


def load_text_to_image(spec: ModelSpec) -> dict[str, Any]:
    """Load a text-to-image model: its components, ``"pipeline_class"`` and ``"pipeline_config"``.

    ``pipeline_config`` holds the pipeline's own settings stored in model_index.json that its
    constructor takes (SDXL's ``force_zeros_for_empty_prompt``), as ``from_pretrained`` passes
    them. The result is meant for ``TextToImageStage(**load_text_to_image(spec))``.
    """
    # 1. model_index.json alone first (a Hub or S3 source downloads only that file), to learn the
    # pipeline class and the components; refuse a model that is not text-to-image before any weights.
    index = _read_model_index(resolve_model_dir(spec, components=()))
    class_name = index.get("_class_name")
    if not class_name:
        raise ModelLoadError(f"{spec.source}: model_index.json has no _class_name")
    cls = text_to_image_pipeline_class(class_name)
    names = text_to_image_components(index)
    if not names:
        raise ModelLoadError(f"{spec.source}: model_index.json lists no components")
    # 2. The components themselves: load_components resolves the source again, restricted to them.
    loaded = load_components(spec, names)
    config = pipeline_settings(cls, index, components=_index_slots(index))
    return {**loaded, "pipeline_class": class_name, "pipeline_config": config}


def pipeline_settings(cls: type, config: Mapping[str, Any], *, components) -> dict[str, Any]:
    """The pipeline's own settings in a model_index.json or a pipeline's ``config`` (SDXL's
    ``force_zeros_for_empty_prompt``) that its constructor takes, as ``from_pretrained`` passes them."""
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in config.items()
            if not key.startswith("_") and key not in components and key in accepted}


def _index_slots(index: dict) -> set[str]:
    """Names of model_index.json's component slots, null ones included (``[null, null]``)."""
    return {key for key, value in index.items() if isinstance(value, list) and len(value) == 2}


class TextToImageStage:
    """A prompt -> one RGB image, with any diffusers text-to-image pipeline.

    Inputs: params with ``prompt``, ``negative_prompt`` (None: none), ``t2i_guidance_scale``,
    ``t2i_num_inference_steps``, ``seed`` and ``size`` (width, height). Output: a PIL image.
    """

    def __init__(
        self,
        *,
        pipeline_class: str = "StableDiffusionXLPipeline",
        pipeline_config: Mapping[str, Any] | None = None,
        **components: Any,
    ) -> None:
        self.pipeline_cls = text_to_image_pipeline_class(pipeline_class)
        init_parameters = inspect.signature(self.pipeline_cls.__init__).parameters
        unknown = sorted(set(components) - set(init_parameters))
        if unknown:
            raise ModelLoadError(f"{pipeline_class} takes no component(s) {unknown}")
        if "scheduler" not in components:
            raise ModelLoadError(f"{pipeline_class} needs a scheduler component")
        # Optional components are passed as None: text-to-image never uses them.
        absent = {name: None for name in OPTIONAL_COMPONENTS if name in init_parameters and name not in components}
        self.components = {**components, **absent}
        self.pipeline_config = dict(pipeline_config or {})
        if "requires_safety_checker" in init_parameters:
            # The safety checker is skipped on purpose; saying so stops SD 1.x warning at every build.
            self.pipeline_config["requires_safety_checker"] = False
        self._local = threading.local()
        # An fp16 VAE with force_upcast (SDXL base's) is cast to fp32 and back *inside* diffusers'
        # __call__, on the shared module: calls that overlap would see each other's dtype, so such
        # a model runs one call at a time (any other runs concurrently).
        vae = components.get("vae")
        upcasts = vae is not None and getattr(vae, "dtype", None) == torch.float16 \
            and bool(getattr(vae.config, "force_upcast", False))
        self._one_at_a_time = threading.Lock() if upcasts else contextlib.nullcontext()
        self.scheduler_class = type(components["scheduler"])
        self.scheduler_config = components["scheduler"].config
        self._call_parameters = _call_parameters(self.pipeline_cls)
        # Build one now so that a missing or mismatched component fails at load, not at the first job.
        pipeline = self.new_pipeline()
        self.vae_scale_factor = int(getattr(pipeline, "vae_scale_factor", 8))
        self.size_multiple = self._size_multiple(pipeline)

    def new_pipeline(self):
        """A pipeline object over the shared sub-models with its own scheduler (per-run state) and
        this thread's own tokenizers."""
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        parts = {**self.components, **self._thread_tokenizers(), "scheduler": scheduler}
        try:
            pipeline = self.pipeline_cls(**parts, **self.pipeline_config)
        except TypeError as err:  # a required component is missing
            raise ModelLoadError(f"Cannot build {self.pipeline_cls.__name__}: {_one_line(err)}") from err
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _thread_tokenizers(self) -> dict[str, Any]:
        """Copies of the tokenizers for the calling thread, made once per thread. A fast (Rust)
        tokenizer keeps its padding and truncation settings on itself and diffusers changes them
        between calls (``padding="max_length"``, then ``"longest"`` for the truncation warning), so
        two requests sharing one tokenizer can get each other's padding (77 tokens against 14)."""
        mine = getattr(self._local, "tokenizers", None)
        if mine is None:
            mine = {name: copy.deepcopy(part) for name, part in self.components.items()
                    if isinstance(part, PreTrainedTokenizerBase)}
            self._local.tokenizers = mine
        return mine

    def _size_multiple(self, pipeline) -> int:
        # Latent size = image / vae_scale_factor; a transformer denoiser then cuts the latent into
        # patch_size patches (SD3: 2), and Flux-style pipelines pack 2x2 latents into one token.
        transformer = getattr(pipeline, "transformer", None)
        patch_size = int(getattr(getattr(transformer, "config", None), "patch_size", 1) or 1)
        packing = 2 if hasattr(pipeline, "_pack_latents") else 1
        return self.vae_scale_factor * patch_size * packing

    @property
    def accepts_negative_prompt(self) -> bool:
        """Whether this pipeline uses a negative prompt (at guidance > 1): SDXL and SD 3.5 do;
        FLUX-style pipelines (true CFG only) do not."""
        return "negative_prompt" in self._call_parameters and "true_cfg_scale" not in self._call_parameters

    def total_steps(self, params) -> int:
        """The number of denoising steps :meth:`generate` reports through ``on_step``."""
        return int(params.t2i_num_inference_steps)

    def _call_kwargs(self, params) -> dict[str, Any]:
        """The pipeline arguments for ``params``; refuses what this pipeline would ignore."""
        name = self.pipeline_cls.__name__
        kwargs: dict[str, Any] = {"prompt": params.prompt}
        if "guidance_scale" in self._call_parameters:
            kwargs["guidance_scale"] = float(params.t2i_guidance_scale)
        if params.negative_prompt is not None:
            if "negative_prompt" not in self._call_parameters:
                raise InvalidInputError(f"negative_prompt is not supported by {name}")
            if "true_cfg_scale" in self._call_parameters:
                # Flux-style: the negative prompt acts only through true_cfg_scale, which is not exposed.
                raise InvalidInputError(f"negative_prompt is not supported by {name} (it needs true CFG)")
            if params.t2i_guidance_scale <= 1:
                # Classifier-free guidance (the only user of the negative prompt) is off at guidance <= 1.
                raise InvalidInputError(
                    f"negative_prompt needs t2i_guidance_scale > 1, got {params.t2i_guidance_scale}"
                )
            kwargs["negative_prompt"] = params.negative_prompt
        return kwargs

    def generate(
        self, params, *, on_step: ProgressCallback | None = None, should_cancel: CancelCheck | None = None
    ) -> np.ndarray:
        """The image as float32 [H, W, 3] in [0, 1], exactly diffusers' ``output_type="np"``."""
        # 1. Validate everything before any work.
        if params.seed is None:
            raise ValueError("params.seed must be set before text-to-image generation")
        width, height = params.size
        if width % self.size_multiple or height % self.size_multiple:
            raise InvalidInputError(
                f"width and height must be multiples of {self.size_multiple} for "
                f"{self.pipeline_cls.__name__}, got {width}x{height}"
            )
        kwargs = self._call_kwargs(params)
        total = self.total_steps(params)
        if should_cancel is not None and should_cancel():
            raise JobCancelledError(f"cancelled before text-to-image step 1 of {total}")

        # 2. Progress and cancellation after every step; the exception leaves the pipeline's loop
        # at once (the per-call pipeline object is then dropped, so no state is left behind).
        def on_step_end(pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
            done = step_index + 1
            if on_step is not None:
                on_step(done, total)
            if should_cancel is not None and should_cancel():
                raise JobCancelledError(f"cancelled after text-to-image step {done} of {total}")
            return callback_kwargs

        # 3. The pipeline itself, seeded with a CPU generator (device-independent noise).
        generator = torch.Generator("cpu").manual_seed(int(params.seed))
        with self._one_at_a_time:
            output = self._run(kwargs, height=height, width=width, steps=int(params.t2i_num_inference_steps),
                               generator=generator, on_step_end=on_step_end)
        return np.asarray(output.images[0], dtype=np.float32)

    def _run(self, kwargs: dict[str, Any], *, height: int, width: int, steps: int, generator, on_step_end):
        return self.new_pipeline()(
            **kwargs,
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=generator,
            output_type="np",
            callback_on_step_end=on_step_end,
        )

    def __call__(
        self, params, *, on_step: ProgressCallback | None = None, should_cancel: CancelCheck | None = None
    ) -> PIL.Image.Image:
        """The image as an RGB uint8 ``PIL.Image`` at ``params.size``."""
        image = self.generate(params, on_step=on_step, should_cancel=should_cancel)
        return PIL.Image.fromarray((image * 255).round().astype(np.uint8)).convert("RGB")
