"""The models this deployment serves: those its app config declares, then those in the registry.

:class:`ModelCatalog` is what every process asks: the ingress (is ``model`` known, visible and
allowed for this tenant? what are its defaults and limits?), and the stage replicas (where do this
model's weights come from?). Declared models (``model``, ``text_to_image_model`` and ``models`` of
the app config) cannot be removed or changed at run time; the registry's (``svd-serve models
add``) can, and a replica or ingress sees a change within ``ttl_s`` (an unknown id is always looked
up again at once, so a model just added is usable by the next request).

A fine-tune's weights resolve through its ``base`` chain to :class:`Weights`: the whole pipeline
its components come from, the U-Net checkpoint that replaces the pipeline's (the nearest one in the
chain), and its own LoRA adapter.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable

from pipelines.errors import InvalidInputError
from pipelines.loader import ModelSpec

from .entry import MODEL_ID_PATTERN, ModelEntry
from .store import ModelStore

if TYPE_CHECKING:
    from ..config import AppConfig
    from ..tenants import TenantPolicy

#: Longest base chain (a fine-tune of a fine-tune of ...): deeper is a configuration mistake.
MAX_BASE_DEPTH = 4


class UnknownModelError(LookupError):
    """No model by that id that this caller may see (a private model of another tenant included)."""


class ModelNotAllowedError(PermissionError):
    """The model exists and is visible, but the tenant's ``allowed_models`` excludes it."""


class NotAVideoModelError(ValueError):
    """The id names a text-to-image model: it makes first frames, not videos."""


class ModelUnavailableError(InvalidInputError):
    """A job's model was removed, or cannot be loaded, after the job was admitted (not charged)."""

    code = "model_unavailable"


class ModelVersionChangedError(ModelUnavailableError):
    """A stage was asked for a model version (``id@digest``) that is not the one it reads now: the
    weights changed while the job ran. The job starts again on the new version (no attempt counted
    when the registry did change), so a one-pass clip is never made by two versions and its record
    names the one that made it. ``requested``/``current``: the two keys."""

    def __init__(self, message: str, *, requested: str = "", current: str = "") -> None:
        super().__init__(message)
        self.requested, self.current = requested, current

    def __reduce__(self):  # crosses Ray between processes with its keys
        return (_version_changed, (str(self), self.requested, self.current))


def _version_changed(message: str, requested: str, current: str) -> ModelVersionChangedError:
    return ModelVersionChangedError(message, requested=requested, current=current)


@dataclass(frozen=True)
class Weights:
    """Where one image-to-video model's components come from."""

    pipeline: ModelSpec
    """The whole pipeline: the VAE, image encoder, scheduler, and U-Net unless ``unet`` is set."""
    unet: str | None = None
    """A fine-tuned U-Net checkpoint replacing the pipeline's."""
    lora: str | None = None
    """A LoRA adapter applied per request on the U-Net."""
    lora_scale: float = 1.0

    @property
    def digest(self) -> str:
        """A short hash of where the weights come from: a changed entry is another version."""
        text = "|".join(str(part) for part in (self.pipeline.model_dump_json(), self.unet, self.lora, self.lora_scale))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_id_for(source: str) -> str:
    """The id a declared model gets from its source: a Hub repo id as is, else the directory's name."""
    if re.fullmatch(MODEL_ID_PATTERN, source) and not source.startswith((".", "~")):
        return source
    name = PurePosixPath(source.rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"
    return name[:128]


class ModelCatalog:
    def __init__(self, config: "AppConfig", store: ModelStore | None, *, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.store, self.ttl_s, self._clock = config, store, ttl_s, clock
        self._declared = declared_entries(config)
        self._stored: dict[str, ModelEntry] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    # -- lookups ----------------------------------------------------------------------------------

    @property
    def default_id(self) -> str:
        """The model a request without ``model`` gets."""
        return self.config.resolved_model_id()

    @property
    def text_to_image_id(self) -> str | None:
        spec = self.config.text_to_image_model
        return None if spec is None else model_id_for(spec.source)

    def declared_ids(self) -> frozenset[str]:
        return frozenset(self._declared)

    def entries(self, *, fresh: bool = False) -> dict[str, ModelEntry]:
        """Every model by id: declared ones over registered ones of the same id."""
        return {**self._stored_entries(fresh=fresh), **self._declared}

    def get(self, model_id: str, *, fresh: bool = False) -> ModelEntry | None:
        """The model ``model_id`` names (its id; the default model also answers to its source and the
        source's last path part, as before the registry), re-reading the registry on a miss (and
        first, with ``fresh``)."""
        for fresh in ((True,) if fresh else (False, True)):
            entries = self.entries(fresh=fresh)
            entry = entries.get(model_id) or entries.get(self._alias(model_id) or "")
            if entry is not None:
                return entry
            if self.store is None:
                break
        return None

    def resolve(self, model_id: str | None, policy: "TenantPolicy", tenant: str) -> ModelEntry:
        """The image-to-video model a request of ``tenant`` asks for (None: the default), or
        UnknownModelError (unknown, another tenant's, or not a video model) / ModelNotAllowedError."""
        entry = self.get(model_id) if model_id is not None else self.entries()[self.default_id]
        if entry is None or not entry.visible_to(tenant):
            raise UnknownModelError(f"model {str(model_id)[:200]!r} not found")
        if entry.kind != "image-to-video":
            raise NotAVideoModelError(f"{entry.id!r} is a {entry.kind} model (it makes text-to-video's first frame); "
                                      "name an image-to-video model, or omit model")
        if not allows(policy, entry):
            raise ModelNotAllowedError(f"this tenant may not use model {entry.id!r} "
                                       f"(allowed_models: {', '.join(policy.allowed_models)})")
        return entry

    def visible(self, policy: "TenantPolicy", tenant: str) -> list[ModelEntry]:
        """The models this tenant may see and use, the default first."""
        entries = self.entries(fresh=True)
        ordered = [entries[self.default_id]] + [e for key, e in sorted(entries.items()) if key != self.default_id]
        return [entry for entry in ordered if entry.visible_to(tenant) and allows(policy, entry)]

    def weights(self, entry: ModelEntry) -> Weights:
        """Where ``entry``'s components come from, through its base chain. A base must be visible
        to whoever may see the fine-tune: public, or private to the fine-tune's own tenant (so no
        one builds on another tenant's private weights)."""
        chain, seen = [entry], {entry.id}
        while chain[-1].base is not None:
            base = self.get(chain[-1].base)
            if base is None or base.kind != "image-to-video":
                raise UnknownModelError(f"model {chain[-1].id!r}: its base {chain[-1].base!r} is not registered")
            if base.visibility == "private" and base.tenant != entry.tenant:
                raise UnknownModelError(f"model {chain[-1].id!r}: its base {chain[-1].base!r} is not registered")
            if base.id in seen or len(chain) > MAX_BASE_DEPTH:
                raise ValueError(f"model {entry.id!r}: its base chain loops or is deeper than {MAX_BASE_DEPTH}")
            seen.add(base.id)
            chain.append(base)
        root = chain[-1]
        unet = next((link.unet for link in chain if link.unet is not None), None)
        if any(link.lora for link in chain[1:]):
            raise ValueError(f"model {entry.id!r}: its base has a LoRA adapter; a LoRA applies to a base "
                             "without one (register the adapter on that base instead)")
        return Weights(pipeline=self.spec_for(root), unet=unet, lora=entry.lora, lora_scale=entry.lora_scale)

    def version_key(self, model_id: str, *, fresh: bool = True) -> str:
        """``id@digest``: the key a model's weights are loaded and routed under, so a changed entry
        is loaded afresh (the old version ages out of the replicas' LRU) and never mixed with it.
        ``fresh`` reads the registry now (once per job: it runs with the newest weights); without
        it the catalog's cache answers (per request on the admission path)."""
        entry = self.get(model_id, fresh=fresh)
        if entry is None:
            raise ModelUnavailableError(f"model {model_id!r} is no longer registered")
        try:
            return f"{entry.id}@{self.weights(entry).digest}"
        except (LookupError, ValueError) as error:
            raise ModelUnavailableError(f"model {entry.id!r} cannot be loaded: {error}") from None

    def spec_for(self, entry: ModelEntry) -> ModelSpec:
        """The loader's spec of a whole-pipeline entry: the app's model settings (device, cache,
        S3 endpoint), with the entry's source, revision, dtype and variant."""
        base = self.config.text_to_image_model if entry.kind == "text-to-image" else self.config.model
        base = base or self.config.model
        update = {"source": entry.source, "revision": entry.revision}
        update.update({name: getattr(entry, name) for name in ("dtype", "variant") if getattr(entry, name)})
        return base.model_copy(update=update)

    # -- inside -----------------------------------------------------------------------------------

    def _alias(self, name: str) -> str | None:
        source = self.config.model.source.rstrip("/")
        return self.default_id if name.rstrip("/") in (source, source.rsplit("/", 1)[-1]) else None

    def _stored_entries(self, *, fresh: bool) -> dict[str, ModelEntry]:
        if self.store is None:
            return {}
        with self._lock:
            now = self._clock()
            if fresh or now - self._read_at >= self.ttl_s:
                self._stored = {entry.id: entry for entry in self.store.list()}
                self._read_at = now
            return self._stored


def allows(policy: "TenantPolicy", entry: ModelEntry) -> bool:
    """``allowed_models`` matches the model's id or its source."""
    return policy.allows_model(entry.id) or (entry.source is not None and policy.allows_model(entry.source))


def declared_entries(config: "AppConfig") -> dict[str, ModelEntry]:
    """The app config's models: the default video model, the text-to-image model, then ``models``."""
    video = config.model
    entries = {config.resolved_model_id(): ModelEntry(
        id=config.resolved_model_id(), source=video.source, revision=video.revision, created=0,
        description="this deployment's default model")}
    if config.text_to_image_model is not None:
        t2i = config.text_to_image_model
        entries.setdefault(model_id_for(t2i.source), ModelEntry(
            id=model_id_for(t2i.source), kind="text-to-image", source=t2i.source, revision=t2i.revision, created=0,
            description="makes text-to-video's first frame"))
    for entry in config.models:
        entries[entry.id] = entry
    return entries
