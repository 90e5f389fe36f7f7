"""Per-request LoRA adapters on one shared SVD U-Net, applied with ``peft``.

diffusers has no ``load_lora_weights`` for ``UNetSpatioTemporalConditionModel``, so PEFT-format adapters
(``adapter_config.json`` + ``adapter_model.safetensors``) are injected with ``inject_adapter_in_model`` and
filled with ``set_peft_model_state_dict``. Weights are never merged and the U-Net is never reloaded: each
targeted layer becomes a peft ``LoraLayer`` wrapping the original module, with one A/B pair per adapter.

Why it is correct when many requests (threads) share the U-Net at once:

* No per-request state lives on the model. peft's "active adapter" is global per layer, so after every
  load it is set to none on all layers: peft's forward then computes exactly ``base_layer(x)`` (bitwise
  the pre-adapter output). The adapter of a call is read from a ``ContextVar`` set by
  :meth:`LoraAdapters.active`, and a forward hook on each ``LoraLayer`` adds ``lora_B(lora_A(x)) * scaling``
  of that adapter only (peft's vanilla-LoRA formula). A context variable is per thread, is copied into
  ``asyncio.to_thread`` workers and is isolated per asyncio task, so a request never sees another's
  choice. (peft's ``adapter_names=`` mixed-batch path would also work, but builds Python index lists as
  long as the batch - ``B*h*w`` rows in temporal attention - and gathers/scatters activations, in every
  layer on every call.)
* Load/unload change the module tree, which a forward in another thread must not see half-done. Every
  U-Net forward holds a shared lock (hooks on the U-Net, installed in ``__init__``); load/unload hold it
  exclusively, so they wait for in-flight forwards (one denoising step, not a whole request) and block
  new ones meanwhile. Files are read before the exclusive section.
* Only vanilla LoRA is accepted: variants (DoRA, aLoRA, ...), trained biases, ``modules_to_save`` and
  inits that rewrite base weights (PiSSA, OLoRA, LoftQ, CorDA) are refused, and the state dict may hold
  nothing but this adapter's ``lora_A``/``lora_B`` tensors, so loading never writes a base weight.
"""

from __future__ import annotations

import contextvars
import copy
import json
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pipelines.acceleration.aot import RUN_EAGER_ATTR
from pipelines.errors import InvalidInputError, ModelLoadError
from pipelines.locks import SharedExclusiveLock

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Config keys passed on to LoraConfig; ignored ones (metadata, training- or init-only); any other key
# (use_dora, modules_to_save, a field of a newer peft, ...) must be unset or false.
_PASSED = ("r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "layers_to_transform",
           "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias", "fan_in_fan_out")
_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "lora_dropout", "init_lora_weights", "runtime_config", "megatron_core",
            "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
            "ensure_weight_tying", "bias"}
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def _adapter_names(layer) -> set[str]:
    names = set()
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        names.update(getattr(getattr(layer, attr, None), "keys", lambda: ())())
    return names


def _read_adapter(directory: Path):
    """The validated ``LoraConfig`` and state dict (keys without adapter name) of a PEFT adapter."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelLoadError(f"LoRA adapter directory {directory} does not exist")
    for file in (path, directory / WEIGHTS_FILE):
        if not file.is_file():
            raise ModelLoadError(f"LoRA adapter {directory} has no {file.name} (expected PEFT format)")
    try:
        raw = json.loads(path.read_text())
        state = load_file(directory / WEIGHTS_FILE, device="cpu")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read LoRA adapter {directory}: {error}") from None
    except Exception as error:  # safetensors raises its own error types
        raise ModelLoadError(f"cannot read {directory / WEIGHTS_FILE}: {error}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise ModelLoadError(f"{path} is not a LoRA adapter config (peft_type must be 'LORA')")
    refused = sorted(k for k, v in raw.items() if k not in _PASSED and k not in _IGNORED and v)
    refused += ["bias"] if raw.get("bias", "none") != "none" else []
    if refused:
        raise ModelLoadError(f"{path} uses {', '.join(refused)}, not supported for per-request LoRA")
    if raw.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ModelLoadError(f"{path}: init_lora_weights={raw['init_lora_weights']!r} changes the base "
                             "weights; convert the adapter to plain LoRA first")
    if not raw.get("target_modules"):
        raise ModelLoadError(f"{path} has no target_modules")
    kwargs = {k: raw[k] for k in _PASSED if raw.get(k) is not None}
    try:
        config = LoraConfig(**kwargs, lora_dropout=0.0, init_lora_weights=True, inference_mode=True)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a valid LoRA config: {error}") from None
    return config, {k.removeprefix("base_model.model."): v for k, v in state.items()}


def _check_targets(unet: torch.nn.Module, config) -> None:
    names = [n for n, _ in unet.named_modules() if n]
    targets = config.target_modules
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
    if missing:
        raise ModelLoadError(f"LoRA target modules {missing} do not exist in the U-Net")


class LoraAdapters:
    """The LoRA adapters attached to one U-Net; create it before the U-Net serves requests."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self._loaded: dict[str, tuple[Path, float]] = {}
        self._hooked: dict[torch.nn.Module, object] = {}
        self._load_lock = threading.Lock()
        self._rw = SharedExclusiveLock()
        self._depth = threading.local()
        self._active: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"lora{id(self)}", default=None)
        self._requires_grad = {p: p.requires_grad for p in unet.parameters()}
        unet.register_forward_pre_hook(self._enter_forward, prepend=True)
        unet.register_forward_hook(self._leave_forward, always_call=True)
        # An ahead-of-time compiled U-Net (pipelines.acceleration.aot) holds the base weights only:
        # a call with an adapter active must run the eager modules, where the adapter's hooks are.
        setattr(unet, RUN_EAGER_ATTR, self.adapter_active)

    def __deepcopy__(self, memo):  # deep copies of the U-Net share its hooks (see _base_copy)
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._loaded))

    def load(self, name: str, directory: str | Path, *, scale: float = 1.0) -> float:
        """Load the PEFT adapter in ``directory`` as ``name`` (once); return the seconds it took."""
        start = time.perf_counter()
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidInputError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if hasattr(torch.nn.ModuleDict(), name):  # peft keeps adapters in ModuleDicts: no "half", "to", ...
            raise InvalidInputError(f"adapter name {name!r} is reserved, choose another one")
        directory = Path(directory).expanduser().resolve()
        with self._load_lock:
            if name in self._loaded:
                if self._loaded[name] != (directory, float(scale)):
                    old_dir, old_scale = self._loaded[name]
                    raise InvalidInputError(f"adapter {name!r} is already loaded from {old_dir} with scale "
                                            f"{old_scale}; unload it first or use another name")
                return time.perf_counter() - start
            config, state = _read_adapter(directory)
            _check_targets(self.unet, config)
            with self._rw.exclusive():
                try:
                    self._inject(name, config, state, float(scale), directory)
                except Exception as error:
                    self._remove(name)
                    if isinstance(error, ModelLoadError):
                        raise
                    message = (str(error).strip() or type(error).__name__).splitlines()[0]
                    raise ModelLoadError(f"LoRA adapter {directory} does not fit the U-Net: {message}") from None
            self._loaded[name] = (directory, float(scale))
        return time.perf_counter() - start

    def unload(self, name: str) -> bool:
        """Remove adapter ``name``; the U-Net then behaves as before it was loaded. False if absent."""
        with self._load_lock:
            if name not in self._loaded:
                return False
            with self._rw.exclusive():
                self._remove(name)
            del self._loaded[name]
            return True

    def adapter_active(self) -> bool:
        """Whether the calling thread/context has an adapter active (see :meth:`active`)."""
        return self._active.get() is not None

    @contextmanager
    def active(self, name: str | None):
        """Use adapter ``name`` (None: the base model) for U-Net calls made in this thread/context."""
        if name is not None and name not in self._loaded:
            raise ValueError(f"LoRA adapter {name!r} is not loaded (loaded: {list(self.names) or 'none'})")
        token = self._active.set(name)
        try:
            yield
        finally:
            self._active.reset(token)

    # -- internals (the mutating ones run under the exclusive lock) --------------------------

    def _inject(self, name: str, config, state: dict, scale: float, directory: Path) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora.layer import Linear, _ConvNd

        previous = dict(getattr(self.unet, "peft_config", {}))
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config  # else peft warns about "multiple adapters" on every load
        try:
            inject_adapter_in_model(config, self.unet, adapter_name=name)
        finally:
            self.unet.peft_config = {**previous, name: config}
        expected: dict[str, torch.Size] = {}
        for module_name, layer in _lora_layers(self.unet):
            layer.set_adapter([])  # peft's global active adapter: none (the hooks choose per call)
            if name not in layer.lora_A:
                continue
            if name in getattr(layer, "lora_variant", {}) or not isinstance(layer, (Linear, _ConvNd)):
                raise ModelLoadError(f"LoRA adapter {directory}: layer {module_name} is not plain LoRA")
            for part in ("lora_A", "lora_B"):
                for key, value in getattr(layer, part)[name].state_dict().items():
                    expected[f"{module_name}.{part}.{key}"] = value.shape
            if layer not in self._hooked:
                self._hooked[layer] = layer.register_forward_hook(self._apply_adapter, with_kwargs=True)
        unused, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        wrong = [k for k, shape in expected.items() if k in state and state[k].shape != shape]
        problem = (f"{len(unused)} unused keys, e.g. {unused[0]}" if unused else
                   f"{len(missing)} missing keys, e.g. {missing[0]}" if missing else
                   f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, needs {list(expected[wrong[0]])}" if wrong
                   else None)
        if problem:
            raise ModelLoadError(f"LoRA adapter {directory} does not match the U-Net: {problem}")
        set_peft_model_state_dict(self.unet, state, adapter_name=name)  # keys checked above: only this adapter's
        for _, layer in _lora_layers(self.unet):
            if name in layer.lora_A:
                weight = layer.get_base_layer().weight
                layer.lora_A[name].to(weight.device, weight.dtype).requires_grad_(False)
                layer.lora_B[name].to(weight.device, weight.dtype).requires_grad_(False)
                layer.scaling[name] *= scale
        self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:  # peft freezes the base model on injection
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)

    def _remove(self, name: str) -> None:
        for module_name, layer in _lora_layers(self.unet):
            if name in _adapter_names(layer):
                layer.delete_adapter(name)
            layer.set_adapter([])
            if not _adapter_names(layer):  # unwrap: the original module is back
                parent_name, _, child = module_name.rpartition(".")
                setattr(self.unet.get_submodule(parent_name), child, layer.get_base_layer())
                if layer in self._hooked:
                    self._hooked.pop(layer).remove()
        configs = getattr(self.unet, "peft_config", None)
        if configs is not None:
            configs.pop(name, None)
            if not configs:
                del self.unet.peft_config
        self._restore_requires_grad()

    def _enter_forward(self, module, args) -> None:
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            self._rw.acquire_shared()
        self._depth.value = depth + 1
        name = self._active.get()
        if name is not None and name not in self._loaded:
            raise ModelLoadError(f"LoRA adapter {name!r} was unloaded while a request was using it")

    def _leave_forward(self, module, args, output) -> None:
        depth = getattr(self._depth, "value", 0)
        if depth > 0:
            self._depth.value = depth - 1
            if depth == 1:
                self._rw.release_shared()

    def _apply_adapter(self, layer, args, kwargs, output):
        name = self._active.get()
        if name is None or name not in layer.lora_A:
            return None
        x = args[0] if args else kwargs["x"]
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        delta = lora_b(lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[name]
        return output + delta.to(output.dtype)


def _base_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``unet`` without any LoRA layers or adapter hooks."""
    clone = copy.deepcopy(unet)
    for module_name, layer in _lora_layers(clone):
        parent_name, _, child = module_name.rpartition(".")
        setattr(clone.get_submodule(parent_name), child, layer.get_base_layer())
    for module in clone.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), LoraAdapters)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
    if hasattr(clone, "peft_config"):
        del clone.peft_config
    clone.__dict__.pop(RUN_EAGER_ATTR, None)
    return clone


def write_tiny_lora(unet, directory, *, seed: int = 0, rank: int = 4,
                    target_modules=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """Save a random-weight LoRA for ``unet`` (left untouched) in PEFT format; return the directory."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    clone = _base_copy(unet)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=False)
    inject_adapter_in_model(config, clone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ||delta W|| about a third of a default-initialised base weight
        for _, layer in sorted(_lora_layers(clone), key=lambda item: item[0]):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=generator) / a[0].numel() ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3 / b.shape[1] ** 0.5)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(clone).items()}
    save_file(state, path / WEIGHTS_FILE)
    config.save_pretrained(path)
    return path


def reference_with_adapter(unet, directory, scale: float = 1.0) -> torch.nn.Module:
    """A deep copy of (base) ``unet`` with the adapter merged into its weights, via plain peft."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraModel

    clone = _base_copy(unet)
    config = LoraConfig.from_pretrained(str(directory))
    tuner = LoraModel(clone, config, "default")
    set_peft_model_state_dict(clone, _read_adapter(Path(directory))[1], adapter_name="default")
    for _, layer in _lora_layers(clone):
        layer.scaling["default"] *= scale
    return tuner.merge_and_unload()
