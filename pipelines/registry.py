"""The stage registry: every pipeline stage declared once, and the route a job takes through them.

A :class:`StageSpec` says everything the rest of the project needs to know about a stage: its name
(used in progress, timings, spans, metric labels and usage), its key in the app config's
``stages``, its Serve deployment name, the class that runs it, the model components it needs (a
replica loads only those), the values it reads and writes, its default resources, and its share of
a job's time (for the progress percentage). The in-process :class:`~pipelines.staged.StagedPipeline`,
the Serve application, the config, metering, the API views, the load-test report, the capacity
model and the benchmarks all read this registry; adding a stage is one :func:`register_stage` call
plus one class.

The route is data: stages are kept in order, each reads named values that the source (``image``)
or an earlier stage produced, and the route of one job is the registered stages whose ``when``
accepts its parameters. Registration checks that every route still ends in ``video``.

Two refinements make text-to-video and long clips data too. A stage may take its components from
another model than the video model (``model``: the text-to-image stage loads SDXL, not SVD). And
the stages marked ``per_segment`` run once per segment of a long clip (the conditioning image of
segment k+1 is a frame of segment k's output): :func:`split_route` cuts a route into the stages
before the segments, the segment stages, and the stages after them.

This module imports neither torch nor Ray: stage classes are named by import path and imported
only when a stage is built, so light processes (the load-test report, the config validator) can
read the registry cheaply.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

#: The value every route starts from (the conditioning image) and the one it must end in.
SOURCE_VALUE = "image"
FINAL_VALUE = "video"

#: Config keys of the two deployments that are not pipeline stages.
RESERVED_CONFIG_KEYS = frozenset({"ingress", "runner"})

#: The models a stage can take its components from (``StageSpec.model``).
VIDEO_MODEL = "video"
TEXT_TO_IMAGE_MODEL = "text_to_image"


@dataclass(frozen=True)
class StageResources:
    """What one replica of the stage asks for unless the app config says otherwise."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 1


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage, declared once."""

    name: str
    """Progress stage, ``Job.timings`` key, span name, metric and usage label (``sampling``)."""
    config_key: str
    """Its entry in the app config's ``stages`` (``sampler``)."""
    deployment: str
    """Its Ray Serve deployment name (``Sampler``)."""
    factory: str | Callable[..., Any]
    """The stage class (or ``"module:attr"``), called with the components as keyword arguments."""
    inputs: tuple[str, ...]
    """Values it reads, in call order; each is the source or an earlier stage's output."""
    output: str
    """The value it produces."""
    components: tuple[str, ...] = ()
    """Model components it needs (``unet``, ``vae``, ...); a replica loads only these."""
    model: str = VIDEO_MODEL
    """Which model its components come from: the video model or the text-to-image model."""
    component_loader: str | None = None
    """``"module:function"`` taking a ``ModelSpec`` and returning the stage's keyword arguments,
    for a stage whose components depend on the model (any diffusers text-to-image pipeline);
    None: load ``components`` by name."""
    per_segment: bool = False
    """Runs once per segment of a long clip (encode, sample, decode); the others run once per job."""
    resources: StageResources = field(default_factory=StageResources)
    """Default replica resources."""
    progress_share: float = 1.0
    """Rough share of a job's time spent here, for the progress percentage (relative weights)."""
    reports_steps: bool = False
    """The stage takes ``on_step`` and ``should_cancel`` (a long loop that reports and stops)."""
    describes_model: bool = False
    """Its built stage exposes ``default_num_frames`` (the loaded model's own frame count)."""
    when: Callable[[Any], bool] | None = None
    """Optional stage: runs only for parameters this accepts (None: always)."""
    description: str = ""

    def stage_class(self) -> Callable[..., Any]:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, components: dict[str, Any], **options: Any) -> Any:
        """The stage object, given at least the components it declares (everything its
        ``component_loader`` returned, for a stage that has one); ``options`` are the stage class's
        own keyword arguments (the video encoder's ``h264_codec``)."""
        if self.component_loader is not None:
            return self.stage_class()(**components, **options)
        missing = [name for name in self.components if name not in components]
        if missing:
            raise ValueError(f"stage {self.name!r} needs components {missing}")
        return self.stage_class()(**{name: components[name] for name in self.components}, **options)

    def component_loader_function(self) -> Callable[[Any], dict[str, Any]] | None:
        """The ``component_loader`` callable, imported now (None if the stage has none)."""
        if self.component_loader is None:
            return None
        module, _, attr = self.component_loader.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def multiplexed(self) -> bool:
        """Whether it serves every model of the video zoo (picked per request by model id): a stage
        that loads named components of the video model. The text-to-image stage serves one model."""
        return self.model == VIDEO_MODEL and bool(self.components) and self.component_loader is None

    def runs_for(self, params: Any) -> bool:
        return self.when is None or bool(self.when(params))


class StageRegistry:
    """The ordered, validated set of stages. Thread-safe; registration is idempotent per spec."""

    def __init__(self, specs: Iterable[StageSpec] = ()) -> None:
        self._specs: list[StageSpec] = []
        self._lock = threading.Lock()
        for spec in specs:
            self.register(spec)

    def register(self, spec: StageSpec, *, after: str | None = None, before: str | None = None) -> StageSpec:
        """Add ``spec`` at the end, or right after/before the named stage. Re-registering an equal
        spec is a no-op (modules may be imported twice); a different spec under a taken name,
        config key or deployment name is a ``ValueError``, and so is a spec whose inputs no earlier
        stage produces. That the route ends in ``video`` is checked per job (:meth:`route`)."""
        if after is not None and before is not None:
            raise ValueError("give after or before, not both")
        with self._lock:
            if spec in self._specs:
                return spec
            for other in self._specs:
                for attr in ("name", "config_key", "deployment"):
                    if getattr(other, attr) == getattr(spec, attr):
                        raise ValueError(f"a stage with {attr} {getattr(spec, attr)!r} is already registered")
            if spec.config_key in RESERVED_CONFIG_KEYS:
                raise ValueError(f"config key {spec.config_key!r} is reserved")
            specs = list(self._specs)
            anchor = after or before
            if anchor is None:
                specs.append(spec)
            else:
                index = self._index(anchor)
                specs.insert(index + 1 if after else index, spec)
            _check_chain(specs, require_final=False)
            self._specs = specs
            return spec

    def unregister(self, name: str) -> StageSpec:
        """Remove a stage (a plugin being unloaded); refused if a later stage reads its output."""
        with self._lock:
            specs = list(self._specs)
            spec = specs.pop(self._index(name))
            _check_chain(specs, require_final=False)
            self._specs = specs
            return spec

    def _index(self, name: str) -> int:
        for index, spec in enumerate(self._specs):
            if spec.name == name:
                return index
        raise KeyError(f"no stage named {name!r}; registered: {', '.join(self.names())}")

    def stages(self) -> tuple[StageSpec, ...]:
        return tuple(self._specs)

    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._specs)

    def get(self, name: str) -> StageSpec:
        return self._specs[self._index(name)]

    def route(self, params: Any) -> tuple[StageSpec, ...]:
        """The stages one job with these parameters passes through, in order."""
        route = tuple(spec for spec in self._specs if spec.runs_for(params))
        _check_chain(route)
        return route

    def model_stage(self) -> StageSpec:
        """The stage whose replicas can tell the loaded model's defaults."""
        for spec in self._specs:
            if spec.describes_model:
                return spec
        raise LookupError("no registered stage describes the model")


def _check_chain(specs: Iterable[StageSpec], *, require_final: bool = True) -> None:
    """Every input is available when its stage runs (and the chain ends in the final value)."""
    available = {SOURCE_VALUE}
    for spec in specs:
        missing = [value for value in spec.inputs if value not in available]
        if missing:
            raise ValueError(f"stage {spec.name!r} reads {missing}, which no earlier stage produces")
        available.add(spec.output)
    if require_final and FINAL_VALUE not in available:
        raise ValueError(f"the stages do not produce {FINAL_VALUE!r}")


def split_route(route: Iterable[StageSpec]) -> tuple[tuple[StageSpec, ...], tuple[StageSpec, ...],
                                                     tuple[StageSpec, ...]]:
    """``(before, per_segment, after)``: the stages run once before the segments, the contiguous
    run of per-segment stages, and those run once after them. A route without per-segment stages
    is all ``before``."""
    route = tuple(route)
    marked = [index for index, spec in enumerate(route) if spec.per_segment]
    if not marked:
        return route, (), ()
    first, last = marked[0], marked[-1]
    if last - first + 1 != len(marked):
        raise ValueError("the per-segment stages of a route must be contiguous")
    return route[:first], route[first:last + 1], route[last + 1:]


def progress_spans(route: Iterable[StageSpec], *, end: float = 99.0) -> dict[str, tuple[float, float]]:
    """``{stage: (low, high)}`` percent bands over ``[0, end]``, in proportion to each stage's share."""
    route = tuple(route)
    total = sum(spec.progress_share for spec in route) or 1.0
    spans, low = {}, 0.0
    for spec in route:
        high = low + end * spec.progress_share / total
        spans[spec.name] = (low, high)
        low = high
    return spans


# -- the built-in stages: text-to-image, then SVD image-to-video as four stages ------------------

TEXT_TO_IMAGE = StageSpec(
    name="text_to_image", config_key="text_to_image", deployment="TextToImage",
    factory="pipelines.text_to_image:TextToImageStage", inputs=(), output="image",
    model=TEXT_TO_IMAGE_MODEL, component_loader="pipelines.text_to_image:load_text_to_image",
    resources=StageResources(max_ongoing_requests=1), progress_share=10, reports_steps=True,
    when=lambda params: getattr(params, "text_to_video", False),
    description="Text-to-video's first frame: a diffusers text-to-image pipeline (SDXL by default) at the "
    "clip's size. Runs only for a prompt without an image.",
)
IMAGE_ENCODE = StageSpec(
    name="image_encode", config_key="image_encoder", deployment="ImageEncoder",
    factory="pipelines.stages:ImageEncodeStage", inputs=("image",), output="encoded",
    components=("image_encoder", "feature_extractor", "vae"),
    resources=StageResources(max_ongoing_requests=4), progress_share=3, per_segment=True,
    description="CLIP image embedding + VAE latent of the conditioning image.",
)
SAMPLING = StageSpec(
    name="sampling", config_key="sampler", deployment="Sampler",
    factory="pipelines.stages:SamplingStage", inputs=("encoded",), output="latents",
    components=("unet", "scheduler"), resources=StageResources(max_ongoing_requests=1),
    progress_share=85, reports_steps=True, describes_model=True, per_segment=True,
    description="U-Net Euler sampling: the expensive stage. One job at a time per replica by default.",
)
DECODE = StageSpec(
    name="decode", config_key="decoder", deployment="Decoder",
    factory="pipelines.stages:DecodeStage", inputs=("latents",), output="frames",
    components=("vae",), resources=StageResources(max_ongoing_requests=2), progress_share=8, per_segment=True,
    description="VAE temporal decoder: latents in, uint8 frames out.",
)
VIDEO_ENCODE = StageSpec(
    name="video_encode", config_key="video_encoder", deployment="VideoEncoder",
    factory="pipelines.stages:VideoEncodeStage", inputs=("frames",), output="video",
    resources=StageResources(max_ongoing_requests=4), progress_share=3,
    description="Segments joined, frames retimed (interpolation), ffmpeg MP4/WebM/GIF encode (CPU).",
)

#: The registry every process reads. Extra stages join it through :func:`register_stage`.
STAGES = StageRegistry((TEXT_TO_IMAGE, IMAGE_ENCODE, SAMPLING, DECODE, VIDEO_ENCODE))


def register_stage(spec: StageSpec, *, after: str | None = None, before: str | None = None) -> StageSpec:
    """Add a stage to :data:`STAGES` (see :meth:`StageRegistry.register`)."""
    return STAGES.register(spec, after=after, before=before)


def import_stage_modules(modules: Iterable[str]) -> None:
    """Import modules that register extra stages (the app config's ``stage_modules``): every
    process that validates the config runs this first, so all of them see one registry."""
    for module in modules:
        importlib.import_module(module)
