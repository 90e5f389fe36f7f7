"""Per-request LoRA adapters on the shared tiny SVD U-Net (pipelines/adapters.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.adapters import LoraAdapters, reference_with_adapter, write_tiny_lora
from pipelines.errors import InvalidInputError, ModelLoadError
from pipelines.tiny import build_tiny_pipeline

CONV_TARGETS = ("to_q", "to_v", "proj_in", "conv1")  # Linear, Conv2d and Conv3d layers


@pytest.fixture(scope="module")
def base_unet():
    return build_tiny_pipeline(seed=0).unet


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, base_unet):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": write_tiny_lora(base_unet, root / "a", seed=1),
        "b": write_tiny_lora(base_unet, root / "b", seed=2, rank=2, target_modules=CONV_TARGETS),
        "c": write_tiny_lora(base_unet, root / "c", seed=3, rank=8),
    }


def make_inputs(seed: int, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, 8, generator=generator)
    embeddings = torch.randn(batch, 1, 32, generator=generator)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(batch, 1)
    return sample, embeddings, time_ids


def forward(unet, seed: int = 0, timestep: float = 10.0):
    sample, embeddings, time_ids = make_inputs(seed)
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=embeddings, added_time_ids=time_ids, return_dict=False)[0]


def lora_layer_count(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


@pytest.mark.parametrize("name", ["a", "b"])
def test_adapter_output_equals_merged_reference(unet, base_unet, lora_dirs, name):
    adapters = LoraAdapters(unet)
    adapters.load(name, lora_dirs[name])
    with adapters.active(name):
        out = forward(unet)
    expected = forward(reference_with_adapter(base_unet, lora_dirs[name]))
    assert (out - expected).abs().max().item() < 1e-5
    assert (out - forward(base_unet)).abs().max().item() > 1e-2


def test_base_output_is_bitwise_unchanged_while_adapters_are_loaded(unet, lora_dirs):
    before = forward(unet)
    requires_grad = {p: p.requires_grad for p in unet.parameters()}
    adapters = LoraAdapters(unet)
    adapters.load("a", lora_dirs["a"])
    adapters.load("b", lora_dirs["b"])
    assert torch.equal(forward(unet), before)
    with adapters.active(None):
        assert torch.equal(forward(unet), before)
    with adapters.active("a"):
        with adapters.active(None):  # nested: the innermost choice wins, then is restored
            assert torch.equal(forward(unet), before)
        assert not torch.equal(forward(unet), before)
    assert all(p.requires_grad == requires_grad.get(p, False) for p in unet.parameters())


def test_concurrent_requests_each_get_their_own_adapter(unet, base_unet, lora_dirs):
    adapters = LoraAdapters(unet)
    adapters.load("a", lora_dirs["a"])
    adapters.load("b", lora_dirs["b"])
    references = {None: base_unet, **{n: reference_with_adapter(base_unet, lora_dirs[n]) for n in "ab"}}
    plan = [None, "a", "b", None, "a", "b"]
    steps = 4
    barrier = threading.Barrier(len(plan))
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def request(index: int, name: str | None) -> None:
        try:
            outputs = []
            with adapters.active(name):
                for step in range(steps):
                    barrier.wait()  # every thread starts each forward together, so they interleave
                    outputs.append(forward(unet, seed=index * 10 + step, timestep=float(step + 1)))
            results[index] = outputs
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    def loader() -> None:  # a new adapter arrives while the requests are mid-sampling
        barrier_started.wait()
        adapters.load("c", lora_dirs["c"])

    barrier_started = threading.Event()
    threads = [threading.Thread(target=request, args=(i, n)) for i, n in enumerate(plan)]
    threads.append(threading.Thread(target=loader))
    for thread in threads:
        thread.start()
    barrier_started.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert "c" in adapters.names
    for index, name in enumerate(plan):
        for step, out in enumerate(results[index]):
            expected = forward(references[name], seed=index * 10 + step, timestep=float(step + 1))
            assert (out - expected).abs().max().item() < 1e-5, (index, name, step)
            if name is None:
                assert torch.equal(out, expected)


def test_load_waits_for_forwards_in_flight_and_blocks_new_ones(unet, base_unet, lora_dirs):
    adapters = LoraAdapters(unet)
    inside, release = threading.Event(), threading.Event()

    def pause(module, args):  # holds the first request in the middle of its U-Net forward
        if threading.current_thread().name == "request":
            inside.set()
            release.wait(10)

    unet.mid_block.register_forward_pre_hook(pause)
    results = {}
    request = threading.Thread(target=lambda: results.update(first=forward(unet)), name="request")
    request.start()
    assert inside.wait(10)
    loader = threading.Thread(target=adapters.load, args=("a", lora_dirs["a"]))
    loader.start()
    loader.join(0.5)
    assert loader.is_alive() and adapters.names == ()  # waits for the forward in flight
    second = threading.Thread(target=lambda: results.update(second=forward(unet)))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # a new forward waits for the pending load (no starvation of loads)
    release.set()
    for thread in (request, loader, second):
        thread.join(10)
    assert adapters.names == ("a",)
    assert torch.equal(results["first"], forward(base_unet))
    assert torch.equal(results["second"], forward(base_unet))


def test_active_context_follows_asyncio_to_thread(unet, base_unet, lora_dirs):
    adapters = LoraAdapters(unet)
    adapters.load("a", lora_dirs["a"])

    async def main():
        with adapters.active("a"):
            with_adapter = await asyncio.to_thread(forward, unet)
        return with_adapter, await asyncio.to_thread(forward, unet)

    with_adapter, without = asyncio.run(main())
    assert (with_adapter - forward(reference_with_adapter(base_unet, lora_dirs["a"]))).abs().max() < 1e-5
    assert torch.equal(without, forward(base_unet))


def test_scale(unet, base_unet, lora_dirs):
    adapters = LoraAdapters(unet)
    adapters.load("full", lora_dirs["a"])
    adapters.load("halfway", lora_dirs["a"], scale=0.5)
    with adapters.active("full"):
        full = forward(unet)
    with adapters.active("halfway"):
        half = forward(unet)
    assert (full - half).abs().max().item() > 1e-3
    expected = forward(reference_with_adapter(base_unet, lora_dirs["a"], scale=0.5))
    assert (half - expected).abs().max().item() < 1e-5


def test_unload_restores_the_base_model_and_loading_twice_is_a_no_op(unet, lora_dirs):
    before = forward(unet)
    modules_before = dict(unet.named_modules())
    adapters = LoraAdapters(unet)
    adapters.load("a", lora_dirs["a"])
    layers = lora_layer_count(unet)
    weight = next(m for m in unet.modules() if hasattr(m, "lora_A")).lora_A["a"].weight
    assert adapters.load("a", lora_dirs["a"]) < 0.05
    assert lora_layer_count(unet) == layers
    assert next(m for m in unet.modules() if hasattr(m, "lora_A")).lora_A["a"].weight is weight
    with pytest.raises(InvalidInputError, match="already loaded"):
        adapters.load("a", lora_dirs["a"], scale=0.5)
    adapters.load("b", lora_dirs["b"])
    assert adapters.names == ("a", "b")

    assert adapters.unload("a") is True
    assert adapters.names == ("b",)
    assert torch.equal(forward(unet), before)
    with pytest.raises(ValueError, match=r"'a' is not loaded \(loaded: \['b'\]\)"):
        adapters.active("a").__enter__()
    assert adapters.unload("b") is True
    assert adapters.unload("b") is False
    assert torch.equal(forward(unet), before)
    assert lora_layer_count(unet) == 0
    assert dict(unet.named_modules()).keys() == modules_before.keys()
    assert all(unet.get_submodule(k) is m for k, m in modules_before.items())
    assert not hasattr(unet, "peft_config")


def test_unloading_an_adapter_in_use_fails_that_request_loudly(unet, lora_dirs):
    adapters = LoraAdapters(unet)
    adapters.load("a", lora_dirs["a"])
    with adapters.active("a"):
        forward(unet)
        adapters.unload("a")
        with pytest.raises(ModelLoadError, match="unloaded while a request was using it"):
            forward(unet)
    forward(unet)  # the shared lock was released despite the error


def test_write_tiny_lora_leaves_the_unet_untouched(base_unet, tmp_path):
    state = {k: v.clone() for k, v in base_unet.state_dict().items()}
    path = write_tiny_lora(base_unet, tmp_path / "x", seed=5)
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert lora_layer_count(base_unet) == 0 and not hasattr(base_unet, "peft_config")
    assert all(torch.equal(v, state[k]) for k, v in base_unet.state_dict().items())
    weights = load_file(path / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for v in weights.values())


def _edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def _broken(kind: str, base_unet, path):
    if kind == "no-directory":
        return path / "missing"
    write_tiny_lora(base_unet, path, seed=7)
    weights_path = path / "adapter_model.safetensors"
    if kind == "no-weights":
        weights_path.unlink()
    elif kind == "bad-json":
        (path / "adapter_config.json").write_text("{not json")
    elif kind == "absent-target":
        _edit_config(path, target_modules=["to_q", "to_zz"])
    elif kind == "dora":
        _edit_config(path, use_dora=True)
    elif kind == "trained-bias":
        _edit_config(path, bias="all")
    elif kind == "pissa":
        _edit_config(path, init_lora_weights="pissa")
    elif kind == "rank-mismatch":
        _edit_config(path, r=8, lora_alpha=8)
    elif kind in ("unused-key", "missing-key"):
        weights = load_file(weights_path)
        if kind == "unused-key":
            weights["conv_in.weight"] = torch.zeros(32, 8, 3, 3)  # would overwrite a base weight
        else:
            weights.pop(sorted(weights)[0])
        save_file(weights, weights_path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no-directory", "does not exist"),
        ("no-weights", "has no adapter_model.safetensors"),
        ("bad-json", "cannot read LoRA adapter"),
        ("absent-target", r"target modules \['to_zz'\] do not exist"),
        ("dora", "uses use_dora"),
        ("trained-bias", "uses bias"),
        ("pissa", "changes the base weights"),
        ("rank-mismatch", "has shape"),
        ("unused-key", "unused keys, e.g. conv_in.weight"),
        ("missing-key", "missing"),
    ],
)
def test_bad_adapters_raise_model_load_error_and_leave_the_unet_intact(unet, base_unet, lora_dirs, tmp_path, kind, message):
    adapters = LoraAdapters(unet)
    adapters.load("good", lora_dirs["b"])
    layers = lora_layer_count(unet)
    base_before = forward(unet)
    with adapters.active("good"):
        good_before = forward(unet)
    with pytest.raises(ModelLoadError, match=message) as caught:
        adapters.load("bad", _broken(kind, base_unet, tmp_path / "adapter"))
    assert "\n" not in str(caught.value)
    assert adapters.names == ("good",)
    assert lora_layer_count(unet) == layers
    assert set(unet.peft_config) == {"good"}
    assert torch.equal(forward(unet), base_before)
    with adapters.active("good"):
        assert torch.equal(forward(unet), good_before)
    assert torch.equal(unet.conv_in.weight, base_unet.conv_in.weight)


@pytest.mark.parametrize("name", ["../x", "", "a.b", "half", "to"])
def test_invalid_adapter_name(unet, lora_dirs, name):
    with pytest.raises(InvalidInputError, match="adapter name"):
        LoraAdapters(unet).load(name, lora_dirs["a"])
