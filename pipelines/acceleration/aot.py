"""The ``aot`` compile engine: ahead-of-time compiled packages (``torch.export`` + AOTInductor).

``torch.compile`` (the ``jit`` engine) traces the network with dynamo in every new process, even
when Inductor's caches are warm; at full size that trace alone is minutes of a replica's start.
Here the network is exported once per call signature seen during warm-up and compiled by
AOTInductor into a package (a shared library plus its kernels) *without* its weights; a replica
with the package in the compile cache loads it and points it at its own parameters (no copy):
no trace, no compile, so a warm start is the weight load plus the packages' load.

A call whose signature (argument structure, tensor shapes, dtypes, devices, contiguity,
non-tensor values) was not warmed up runs the eager network (same numbers, eager speed), and so
does every call for which the network says so (a LoRA adapter active for the request: the
package holds the base network only). No approximation: same operators, Inductor's fusions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import threading
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

from ..locks import SharedExclusiveLock
from .lowvram import forward_slot
from .options import CompileMode, StageAcceleration

logger = logging.getLogger(__name__)

#: A network may carry a callable under this attribute: when it returns True for a call, the call
#: runs eagerly (pipelines.adapters sets it: an active LoRA adapter is not in the package).
RUN_EAGER_ATTR = "_svd_run_eager"
_INDEX = "index.json"


def call_signature(args: tuple, kwargs: dict) -> str:
    """What a package is specific to: the call's structure and every leaf's shape/dtype/device
    (tensors) or value (anything else, which export bakes in)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            layout = "c" if leaf.is_contiguous() else "s" + ",".join(map(str, leaf.stride()))
            parts.append(f"T{tuple(leaf.shape)}:{leaf.dtype}:{leaf.device.type}:{layout}")
        else:
            parts.append(f"V{leaf!r}")
    return "|".join(parts)


def signature_digest(signature: str) -> str:
    return hashlib.sha256(signature.encode()).hexdigest()[:16]


@contextmanager
def record_calls(network: torch.nn.Module) -> Iterator[dict[str, tuple[tuple, dict]]]:
    """Run eagerly while recording the first call of each signature (inputs detached and cloned)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    slot = forward_slot(network)
    installed = network.__dict__.get(slot)  # a dispatch installed earlier, kept after recording
    class_forward = type(network).forward.__get__(network)
    # Another model's requests on a shared network pass here too: they hold the dispatch's shared
    # lock like its eager calls, so an export that follows never swaps parameters under them.
    lock = installed.lock if isinstance(installed, AotDispatch) else None

    def eager(*args, **kwargs):
        with lock.shared() if lock is not None else nullcontext():
            return class_forward(*args, **kwargs)

    def recording_forward(*args, **kwargs):
        run_eager = getattr(network, RUN_EAGER_ATTR, None)
        if run_eager is not None and run_eager():  # a request's LoRA call meanwhile: never dispatched
            return eager(*args, **kwargs)
        signature = call_signature(args, kwargs)
        if signature not in calls:
            example = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            # A clone of a non-dense input (expanded, strided) is dense: a package made from it
            # would misread the real call's memory, so such a call is not recorded (it stays eager).
            if call_signature(*example) == signature:
                calls[signature] = example
        return eager(*args, **kwargs)

    setattr(network, slot, recording_forward)
    try:
        yield calls
    finally:
        _restore(network, slot, installed)


def _restore(network: torch.nn.Module, slot: str, installed: Any) -> None:
    network.__dict__.pop(slot, None)
    if installed is not None:
        setattr(network, slot, installed)


def installed_dispatch(network: torch.nn.Module) -> "AotDispatch | None":
    found = network.__dict__.get(forward_slot(network))
    return found if isinstance(found, AotDispatch) else None


def build_package(network: torch.nn.Module, call: tuple[tuple, dict], options: StageAcceleration) -> bytes:
    """Export ``network`` for one recorded call and compile it to an AOTInductor package (bytes)
    that holds no weights.

    Non-strict export swaps the module's parameters for fake tensors while it traces, so eager
    calls on other threads (another model sharing the network) wait on the dispatch's lock;
    compiled calls run on the real tensors they were given at load and go on."""
    args, kwargs = call
    inductor_configs: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
    if options.compile in (CompileMode.MAX_AUTOTUNE, CompileMode.MAX_AUTOTUNE_NO_CUDAGRAPHS):
        inductor_configs["max_autotune"] = True
    dispatch = installed_dispatch(network)
    slot = forward_slot(network)
    with dispatch.lock.exclusive() if dispatch is not None else nullcontext():
        installed = network.__dict__.pop(slot, None)  # export traces the class's forward, not a dispatch
        try:
            with torch.no_grad():
                exported = torch.export.export(network, args, kwargs, strict=False)
        finally:
            _restore(network, slot, installed)
    with tempfile.TemporaryDirectory(prefix="svd-aoti-") as directory:
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(directory) / "network.pt2"),
                                                        inductor_configs=inductor_configs)
        return Path(path).read_bytes()


def load_package(data: bytes, network: torch.nn.Module) -> Any:
    """A loaded package running on ``network``'s own parameters and buffers (shared, not copied)."""
    with tempfile.TemporaryDirectory(prefix="svd-aoti-") as directory:
        path = Path(directory) / "network.pt2"
        path.write_bytes(data)
        runner = torch._inductor.aoti_load_package(str(path))  # extracts what it needs: the file can go
    tensors = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    names = runner.get_constant_fqns()
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"compiled package expects tensors the network lacks: {', '.join(missing[:5])}")
    constants = {name: tensors[name] for name in names}
    try:
        runner.load_constants(constants, check_full_update=True, user_managed=True)
    except TypeError:  # a torch without user-managed constants: the package keeps a copy of the weights
        logger.warning("this torch copies the weights into each compiled package (no user-managed constants)")
        runner.load_constants(constants, check_full_update=True)
    return runner


def pack(packages: dict[str, bytes]) -> bytes:
    """One archive: an index of signatures and a package per signature."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        index = {signature: signature_digest(signature) + ".pt2" for signature in packages}
        archive.writestr(_INDEX, json.dumps(index, indent=1, sort_keys=True))
        for signature, data in packages.items():
            archive.writestr(index[signature], data)
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, bytes]:
    """``pack``'s inverse; ``ValueError`` for anything that is not a whole archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            index = json.loads(archive.read(_INDEX))
            return {signature: archive.read(member) for signature, member in index.items()}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"not a compiled-package archive ({error})") from None


class AotDispatch:
    """Installed as the network's ``forward``: a call with a warmed-up signature runs its package,
    any other runs the eager ``forward``. Counts both (``replica_info`` and the benchmark show them)."""

    def __init__(self, network: torch.nn.Module, runners: dict[str, Any]) -> None:
        self.eager: Callable[..., Any] = type(network).forward.__get__(network)
        self.network = network
        self.runners = runners
        self.compiled_calls = 0
        self.eager_calls = 0
        self._count = threading.Lock()
        self.lock = SharedExclusiveLock()  # eager calls share it; an export of the network holds it alone

    def __deepcopy__(self, memo):
        # A copy of the network has its own parameters, which the packages do not run on: it runs
        # eagerly. (deepcopy registers the network's copy in memo before copying its attributes.)
        return AotDispatch(memo.get(id(self.network), self.network), {})

    def __call__(self, *args, **kwargs):
        run_eager = getattr(self.network, RUN_EAGER_ATTR, None)
        runner = None if run_eager is not None and run_eager() else self.runners.get(call_signature(args, kwargs))
        with self._count:
            if runner is None:
                self.eager_calls += 1
            else:
                self.compiled_calls += 1
        if runner is not None:
            return runner(*args, **kwargs)
        with self.lock.shared():
            return self.eager(*args, **kwargs)


def install(network: torch.nn.Module, runners: dict[str, Any]) -> AotDispatch:
    """Put a dispatch on ``network`` (under a low-VRAM split wrapper when there is one)."""
    dispatch = AotDispatch(network, runners)
    setattr(network, forward_slot(network), dispatch)
    return dispatch


def uninstall(network: torch.nn.Module) -> None:
    if installed_dispatch(network) is not None:
        del network.__dict__[forward_slot(network)]


def dispatches(stage_object: Any) -> list[AotDispatch]:
    """The dispatches on a stage's networks (``replica_info`` shows their call counts)."""
    from .lowvram import stage_modules

    found = []
    for module in stage_modules(stage_object):
        found += [d for m in module.modules() if (d := installed_dispatch(m)) is not None]
    return found
