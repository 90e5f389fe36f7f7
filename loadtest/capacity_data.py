"""The capacity planner's service times: ``loadtest/capacity_figures.yaml``, its schema and its lookup.

The file stores one figure per (model, GPU kind, variant, stage) where one exists, each labelled

* ``measured``: run by this project; ``source`` names the doc and section (or issue) and ``date`` when;
* ``published``: someone else's figure; ``source`` says whose and where it is quoted.

A figure the file lacks is *derived*, never guessed, by the two rules the file itself states, and
labelled ``derived`` with the stored figure it starts from and every rule applied:

1. **Model rule** (``derive_from``): a model of the same architecture at another default shape
   takes its base model's figure times a per-stage factor (SVD's 14 frames: the ratio of exact
   U-Net FLOPs per step, 89.6 / 159.9 TFLOP).
2. **GPU rule**: a stage's seconds on GPU B = seconds on GPU A x peak(A) / peak(B), by dense
   bf16 TFLOP/s. The anchor GPU is the one with a measured figure if any (else published),
   nearest in peak. Coarse: stages bound by memory bandwidth do not follow it.

Models listed as ``same_figures_as`` another (SVD-XT 1.1 and SVD-XT: one architecture, one shape;
a stage's time does not depend on the weights' values) share their figures, the model's own first.
CPU stages (video encode) have figures per model and CPU, not per GPU kind or variant; the GPU rule
never applies to them.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

FIGURES_FILE = Path(__file__).resolve().parent / "capacity_figures.yaml"

Label = Literal["measured", "published"]
#: A date as written in the file: YAML reads an unquoted 2026-11-28 as a date, kept as its ISO text.
DateText = Annotated[str | None, BeforeValidator(lambda v: v.isoformat() if isinstance(v, dt.date) else v)]
Variant = Literal["eager", "compiled", "tensorrt"]
VARIANTS: tuple[str, ...] = ("eager", "compiled", "tensorrt")
#: Words in a derived figure's rules that say which rule made it (the plan then states that rule).
GPU_RULE_MARK = "dense bf16 TFLOP/s"
MODEL_RULE_MARK = "(model rule:"
SHARED = "same architecture and default shape"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuKind(_Strict):
    """One GPU kind the planner knows, with the peak the GPU rule scales by."""

    name: str = Field(description="The GPU's full name, as printed in the plan.")
    dense_bf16_tflops: float = Field(gt=0, description="Dense (no sparsity) bf16 peak, TFLOP/s: the GPU rule's ratio.")
    source: str = Field(min_length=1, description="Where the peak figure comes from.")
    note: str | None = Field(default=None, description="A caveat printed with plans on this GPU (memory, form factor).")


class DeriveRule(_Strict):
    """How a model's figures follow from another model's: one factor per stage."""

    model: str = Field(description="The model whose figures are scaled (it must have figures of its own).")
    factors: dict[str, float] = Field(description="Seconds multiplier per stage; a stage not listed is not derived.")
    rule: str = Field(min_length=1,
                      description="What the factors are and where they come from (printed with the plan).")

    @model_validator(mode="after")
    def _positive(self) -> "DeriveRule":
        bad = [stage for stage, factor in self.factors.items() if not factor > 0]
        if bad:
            raise ValueError(f"derive_from factors must be above 0: {', '.join(bad)}")
        return self


class ModelEntry(_Strict):
    """A model at its default clip shape (the shape its figures are for)."""

    description: str = Field(description="What the model is, printed in the plan's header.")
    aliases: list[str] = Field(default_factory=list, description="Other names that select it (Hub repo ids).")
    frames: int = Field(ge=1, description="Frames per clip at the default shape.")
    height: int = Field(ge=8, description="Clip height in pixels.")
    width: int = Field(ge=8, description="Clip width in pixels.")
    steps: int = Field(ge=1, description="Sampling steps.")
    same_figures_as: str | None = Field(
        default=None, description="A model of the same architecture and default shape whose figures this one shares.")
    derive_from: DeriveRule | None = Field(default=None, description="The model rule for figures this model lacks.")

    @model_validator(mode="after")
    def _one_relation(self) -> "ModelEntry":
        if self.same_figures_as and self.derive_from:
            raise ValueError("a model is either same_figures_as another or derive_from one, not both")
        return self


class GpuFigure(_Strict):
    """Seconds one replica spends on one clip in a GPU stage."""

    model: str = Field(description="A key of `models`.")
    gpu: str = Field(description="A key of `gpus`.")
    variant: Variant = Field(description="eager PyTorch, torch.compile'd, or TensorRT.")
    stage: str = Field(description="A GPU stage of `stages`.")
    seconds: float = Field(gt=0, description="Seconds per clip on one replica.")
    label: Label = Field(description="measured (by this project) or published (by others).")
    source: str = Field(min_length=1, description="The doc and section, issue, or publication the figure comes from.")
    date: DateText = Field(default=None, description="When it was measured (required for measured figures).")
    note: str | None = Field(default=None, description="What the figure includes or leaves out.")

    @model_validator(mode="after")
    def _dated(self) -> "GpuFigure":
        if self.label == "measured" and not self.date:
            raise ValueError(f"{self.model}/{self.gpu}/{self.variant}/{self.stage}: a measured figure needs its date")
        return self


class CpuFigure(_Strict):
    """Seconds one replica spends on one clip in a CPU stage, on the CPU named."""

    model: str = Field(description="A key of `models`.")
    stage: str = Field(description="A CPU stage of `stages`.")
    seconds: float = Field(gt=0, description="Seconds per clip on one replica.")
    label: Label = Field(description="measured (by this project) or published (by others).")
    cpu: str = Field(min_length=1, description="The processor and cores it ran on.")
    source: str = Field(min_length=1, description="The doc and section (and command) the figure comes from.")
    date: DateText = Field(default=None, description="When it was measured (required for measured figures).")
    note: str | None = Field(default=None, description="What the figure includes or leaves out.")

    @model_validator(mode="after")
    def _dated(self) -> "CpuFigure":
        if self.label == "measured" and not self.date:
            raise ValueError(f"{self.model}/{self.stage}: a measured figure needs its date")
        return self


@dataclass(frozen=True)
class StageFigure:
    """The figure the planner uses for one stage, with where it came from."""

    stage: str
    seconds: float
    label: str
    """measured, published or derived."""
    source: str
    """The stored figure's source (for derived: the anchor's), or the load-test report."""
    date: str | None = None
    anchor: str | None = None
    """The stored figure it is (for derived: starts from): model, GPU and variant, or model on CPU."""
    anchor_label: str | None = None
    """That stored figure's label (measured or published)."""
    rules: tuple[str, ...] = field(default=())
    """Every rule applied to the stored figure, in order (also: a figure shared by architecture)."""
    note: str | None = None


class CapacityFigures(_Strict):
    """The whole data file (see the module docstring for the derivation rules)."""

    stages: dict[str, Literal["gpu", "cpu"]] = Field(
        description="The stages a clip passes through (image-to-video), in pipeline order, and where each runs.")
    gpus: dict[str, GpuKind] = Field(description="GPU kinds by the name `--gpu` takes.")
    models: dict[str, ModelEntry] = Field(description="Models by the name `--model` takes.")
    figures: list[GpuFigure] = Field(default_factory=list, description="Stored GPU-stage figures.")
    cpu_figures: list[CpuFigure] = Field(default_factory=list, description="Stored CPU-stage figures.")

    @model_validator(mode="after")
    def _consistent(self) -> "CapacityFigures":
        from .stages import stage_names

        unknown_stages = sorted(set(self.stages) - set(stage_names()))
        if unknown_stages:
            raise ValueError(f"stages not registered in pipelines.registry: {', '.join(unknown_stages)}")
        names: dict[str, str] = {}
        for name, entry in self.models.items():
            for alias in (name, *entry.aliases):
                if alias in names:
                    raise ValueError(f"model name {alias!r} is used twice ({names[alias]} and {name})")
                names[alias] = name
            if entry.same_figures_as:
                target = self.models.get(entry.same_figures_as)
                if target is None or target.same_figures_as or entry.same_figures_as == name:
                    raise ValueError(f"{name}: same_figures_as must name another model that is not itself an alias")
            if entry.derive_from:
                base = self.models.get(entry.derive_from.model)
                if base is None or base.derive_from or entry.derive_from.model == name:
                    raise ValueError(f"{name}: derive_from must name another model that does not derive its own")
                stray = sorted(set(entry.derive_from.factors) - set(self.stages))
                if stray:
                    raise ValueError(f"{name}: derive_from factors for unknown stages: {', '.join(stray)}")
        seen: set[tuple[str, ...]] = set()
        for f in self.figures:
            where = f"figure {f.model}/{f.gpu}/{f.variant}/{f.stage}"
            if f.model not in self.models or f.gpu not in self.gpus or self.stages.get(f.stage) != "gpu":
                raise ValueError(f"{where}: unknown model or GPU, or not a GPU stage")
            if (f.model, f.gpu, f.variant, f.stage) in seen:
                raise ValueError(f"{where}: given twice")
            seen.add((f.model, f.gpu, f.variant, f.stage))
        for c in self.cpu_figures:
            if c.model not in self.models or self.stages.get(c.stage) != "cpu":
                raise ValueError(f"cpu figure {c.model}/{c.stage}: unknown model or not a CPU stage")
        return self

    # -- names -------------------------------------------------------------------------------------

    def model_name(self, name: str) -> str:
        """The model key for a name or alias; a ValueError listing the known ones otherwise."""
        for key, entry in self.models.items():
            if name == key or name in entry.aliases:
                return key
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(self.models))})")

    def gpu_name(self, name: str) -> str:
        """The GPU key (case-insensitive); a ValueError listing the known ones otherwise."""
        key = name.strip().lower()
        if key not in self.gpus:
            raise ValueError(f"unknown GPU {name!r} (known: {', '.join(sorted(self.gpus))})")
        return key

    def model(self, name: str) -> tuple[str, ModelEntry]:
        """The model key and entry for a name or alias."""
        key = self.model_name(name)
        return key, self.models[key]

    # -- lookup --------------------------------------------------------------------------------------

    def plan_figures(self, *, model: str, gpu: str, variant: str) -> list[StageFigure]:
        """One figure per stage of ``stages``, in order; a ValueError naming any stage with none."""
        model, gpu = self.model_name(model), self.gpu_name(gpu)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        out = []
        for stage, where in self.stages.items():
            found = self._gpu_figure(model, gpu, variant, stage) if where == "gpu" else self._cpu_figure(model, stage)
            if found is None:
                scope = f"{variant} on any GPU" if where == "gpu" else "on any CPU"
                raise ValueError(f"no figure for {stage} of {model} ({scope}) in the figures file")
            out.append(found)
        return out

    def _group(self, model: str) -> list[str]:
        """Models sharing figures with ``model``, itself first."""
        root = self.models[model].same_figures_as or model
        others = [m for m, e in self.models.items() if m != model and (m == root or e.same_figures_as == root)]
        return [model, *others]

    def _stored(self, model: str, gpu: str, variant: str, stage: str) -> StageFigure | None:
        """A stored figure of the model's group on that GPU: its own first, then measured before published."""
        group = self._group(model)
        hits = [f for f in self.figures if f.model in group and (f.gpu, f.variant, f.stage) == (gpu, variant, stage)]
        if not hits:
            return None
        best = min(hits, key=lambda f: (group.index(f.model), f.label != "measured"))
        rules = () if best.model == model else (f"{best.model}'s figure serves {model} ({SHARED})",)
        return StageFigure(stage=stage, seconds=best.seconds, label=best.label, source=best.source, date=best.date,
                           anchor=f"{best.model} on {gpu} ({variant})", anchor_label=best.label, rules=rules,
                           note=best.note)

    def _gpu_scaled(self, model: str, gpu: str, variant: str, stage: str) -> StageFigure | None:
        """The GPU rule from the best anchor GPU: measured first, then the nearest peak."""
        target = self.gpus[gpu].dense_bf16_tflops
        anchors = [(other, hit) for other in self.gpus if other != gpu
                   if (hit := self._stored(model, other, variant, stage)) is not None]
        if not anchors:
            return None
        other, hit = min(anchors, key=lambda a: (a[1].label != "measured",
                                                  abs(math.log(self.gpus[a[0]].dense_bf16_tflops / target)), a[0]))
        peak = self.gpus[other].dense_bf16_tflops
        rule = f"x {peak:g}/{target:g} {GPU_RULE_MARK} ({other} -> {gpu})"
        return StageFigure(stage=stage, seconds=hit.seconds * peak / target, label="derived", source=hit.source,
                           date=hit.date, anchor=hit.anchor, anchor_label=hit.anchor_label, rules=(*hit.rules, rule),
                           note=hit.note)

    def _model_scaled(self, model: str, found: StageFigure | None) -> StageFigure | None:
        rule = self.models[model].derive_from
        if found is None or rule is None or found.stage not in rule.factors:
            return None
        factor = rule.factors[found.stage]
        return StageFigure(stage=found.stage, seconds=found.seconds * factor, label="derived", source=found.source,
                           date=found.date, anchor=found.anchor, anchor_label=found.anchor_label,
                           rules=(*found.rules, f"x {factor:g} {MODEL_RULE_MARK} {model} from {rule.model})"),
                           note=found.note)

    def _gpu_figure(self, model: str, gpu: str, variant: str, stage: str) -> StageFigure | None:
        base = self.models[model].derive_from.model if self.models[model].derive_from else None
        found = self._stored(model, gpu, variant, stage)
        if found is None and base:
            found = self._model_scaled(model, self._stored(base, gpu, variant, stage))
        if found is None:
            found = self._gpu_scaled(model, gpu, variant, stage)
        if found is None and base:
            found = self._model_scaled(model, self._gpu_scaled(base, gpu, variant, stage))
        return found

    def _cpu_figure(self, model: str, stage: str) -> StageFigure | None:
        for candidate in self._group(model):
            hits = [c for c in self.cpu_figures if (c.model, c.stage) == (candidate, stage)]
            if hits:
                best = min(hits, key=lambda c: c.label != "measured")
                rules = () if candidate == model else (f"{candidate}'s figure serves {model} ({SHARED})",)
                return StageFigure(stage=stage, seconds=best.seconds, label=best.label,
                                   source=f"{best.source} ({best.cpu})", date=best.date,
                                   anchor=f"{candidate} on CPU", anchor_label=best.label, rules=rules,
                                   note=best.note)
        base = self.models[model].derive_from
        return self._model_scaled(model, self._cpu_figure(base.model, stage)) if base else None


def parse_figures(text: str, *, where: str = "figures") -> CapacityFigures:
    """Validate a figures document; a ValueError with one line per problem otherwise."""
    from pipelines.params import describe_validation_error

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not YAML ({' '.join(str(error).split())})") from None
    try:
        return CapacityFigures.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{where}: {describe_validation_error(error)}") from None


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> CapacityFigures:
    return parse_figures(Path(path).read_text(encoding="utf-8"), where=path)


def load_figures(path: str | Path | None = None) -> CapacityFigures:
    """The figures file (default: the one shipped beside this module)."""
    target = Path(path) if path else FIGURES_FILE
    return _load(str(target), target.stat().st_mtime_ns)
