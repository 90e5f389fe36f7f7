"""Model zoo sharing: content fingerprints, the weak shared-component cache and U-Net checkpoints.

Several models served on one replica must load identical sub-models once. These tests pin down
that identity is judged by content (config + weights), never by path, that the cache never keeps a
module alive by itself, and that a fine-tuned U-Net loads exactly (local and S3, file and folder).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time

import pytest
import torch

from pipelines.errors import ModelLoadError
from pipelines.loader import PIPELINE_COMPONENTS, ModelSpec, load_components
from pipelines.loader import fingerprint as fp_module
from pipelines.loader import unet_checkpoint as ckpt_module
from pipelines.loader.fingerprint import component_fingerprint, file_fingerprint
from pipelines.loader.shared import SharedComponents, load_components_shared
from pipelines.loader.unet_checkpoint import load_unet_checkpoint, write_unet_checkpoint
from pipelines.tiny import write_tiny_model

WEIGHTED = ("vae", "image_encoder", "unet")


def _spec(path, **kwargs) -> ModelSpec:
    return ModelSpec(source=str(path), device="cpu", **{"dtype": "fp32", **kwargs})


@pytest.fixture(scope="module")
def model_a(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model-a"), seed=0)


@pytest.fixture(scope="module")
def model_a_again(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model-a-again"), seed=0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model-b"), seed=1)


@pytest.fixture(scope="module")
def model_a_with_b_unet(tmp_path_factory, model_a, model_b):
    """A fine-tune of A: A's directory with only the unet/ folder taken from B."""
    path = tmp_path_factory.mktemp("model-ab") / "model"
    shutil.copytree(model_a, path)
    shutil.rmtree(path / "unet")
    shutil.copytree(model_b / "unet", path / "unet")
    return path


@pytest.fixture(scope="module")
def unet_b(model_b):
    return load_components(_spec(model_b), ["unet"])["unet"]


def _assert_same_state(left, right) -> None:
    a, b = left.state_dict(), right.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprints_are_of_content_not_path(model_a, model_a_again, model_b):
    for name in PIPELINE_COMPONENTS:
        same = component_fingerprint(model_a, name, spec=_spec(model_a))
        assert same == component_fingerprint(model_a_again, name, spec=_spec(model_a_again))
        other = component_fingerprint(model_b, name, spec=_spec(model_b))
        # Different seeds change every weight; the scheduler and processor hash their config only.
        assert (same != other) == (name in WEIGHTED), name


def test_config_edits_count_but_formatting_does_not(model_a, tmp_path, monkeypatch):
    model = shutil.copytree(model_a, tmp_path / "model")
    before = component_fingerprint(model, "vae")
    config_path = model / "vae" / "config.json"
    config = json.loads(config_path.read_text())

    # Other whitespace and key order, another library version: the same component.
    reordered = dict(reversed(list(config.items())), _diffusers_version="0.0.1", _name_or_path="/elsewhere")
    config_path.write_text(json.dumps(reordered, indent=7))
    assert component_fingerprint(model, "vae") == before

    config_path.write_text(json.dumps({**config, "scaling_factor": config["scaling_factor"] + 0.5}))
    assert component_fingerprint(model, "vae") != before

    # Weight digests are cached by (path, size, mtime_ns): later calls read no weights again.
    monkeypatch.setattr(fp_module, "_sha256_file", lambda path: pytest.fail(f"re-hashed {path}"))
    component_fingerprint(model, "vae")


def test_fingerprint_hashes_the_weight_set_the_loader_picks(model_a, tmp_path):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(model_a, tmp_path / "model")
    folder = model / "vae"
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")

    full = component_fingerprint(model, "vae", spec=_spec(model, variant="none"))
    half = component_fingerprint(model, "vae", spec=_spec(model, variant="fp16"))
    assert full != half
    assert component_fingerprint(model, "vae", spec=_spec(model)) == full  # fp32 on CPU: the full set
    assert component_fingerprint(model, "vae", spec=_spec(model, dtype="bf16")) == half
    assert component_fingerprint(model, "vae", variant_files=["diffusion_pytorch_model.fp16.safetensors"]) == half
    assert component_fingerprint(model_a, "vae") == full  # spec=None: all weight files, here just one
    with pytest.raises(ModelLoadError, match="no fp16 weight files"):
        component_fingerprint(model_a, "vae", spec=_spec(model_a, variant="fp16"))


# --- the shared cache -----------------------------------------------------------------------


def test_models_share_identical_components(model_a, model_a_with_b_unet):
    cache = SharedComponents()
    comps_a, fps_a = load_components_shared(_spec(model_a), PIPELINE_COMPONENTS, cache=cache)
    assert cache.loads == 3 and cache.hits == 0  # vae, image_encoder, unet; the rest is never shared
    comps_b, fps_b = load_components_shared(_spec(model_a_with_b_unet), PIPELINE_COMPONENTS, cache=cache)

    assert comps_b["vae"] is comps_a["vae"] and comps_b["image_encoder"] is comps_a["image_encoder"]
    assert comps_b["unet"] is not comps_a["unet"] and fps_b["unet"] != fps_a["unet"]
    assert comps_b["scheduler"] is not comps_a["scheduler"]  # stateful: always a fresh one
    assert {n for n in fps_a if fps_a[n] == fps_b[n]} == {"vae", "image_encoder", "scheduler", "feature_extractor"}
    assert cache.loads == 4 and cache.hits == 2
    assert not comps_a["vae"].training and not any(p.requires_grad for p in comps_a["vae"].parameters())

    # Another dtype is another module, even with the same fingerprint.
    comps_bf16, fps_bf16 = load_components_shared(_spec(model_a, dtype="bf16"), ["vae"], cache=cache)
    assert comps_bf16["vae"] is not comps_a["vae"] and fps_bf16["vae"] == fps_a["vae"]
    assert next(comps_bf16["vae"].parameters()).dtype == torch.bfloat16


def test_cache_holds_weak_references(model_a):
    cache = SharedComponents()
    vae = load_components_shared(_spec(model_a), ["vae"], cache=cache)[0]["vae"]
    assert load_components_shared(_spec(model_a), ["vae"], cache=cache)[0]["vae"] is vae
    assert (cache.loads, cache.hits, cache.alive()) == (1, 1, 1)
    del vae
    gc.collect()
    assert cache.alive() == 0
    load_components_shared(_spec(model_a), ["vae"], cache=cache)
    assert (cache.loads, cache.hits) == (2, 1)


class _Thing:
    pass


def test_concurrent_callers_of_one_key_load_once():
    cache = SharedComponents()
    calls = []

    def slow_loader():
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return _Thing()

    results = [None] * 8
    barrier = threading.Barrier(len(results))

    def worker(i):
        barrier.wait()
        results[i] = cache.get_or_load(("vae", "abc", "cpu", "fp32"), slow_loader)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(calls) == 1 and all(r is results[0] for r in results)
    assert (cache.loads, cache.hits) == (1, 7)


def test_different_keys_load_in_parallel_and_failures_are_not_cached():
    cache = SharedComponents()
    both_loading = threading.Barrier(2, timeout=5)  # breaks (and fails the test) if loads serialize

    def loader():
        both_loading.wait()
        return _Thing()

    threads = [threading.Thread(target=cache.get_or_load, args=(key, loader)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert cache.loads == 2 and not both_loading.broken

    with pytest.raises(RuntimeError):
        cache.get_or_load("c", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert isinstance(cache.get_or_load("c", _Thing), _Thing)
    assert cache.get_or_load("n", lambda: 42) == 42  # not weakly referenceable: returned, not cached
    assert cache.get_or_load("n", lambda: 43) == 43


# --- U-Net checkpoints ----------------------------------------------------------------------


def _unet_forward(unet):
    torch.manual_seed(0)
    sample = torch.randn(1, 2, 8, 8, 8)
    hidden = torch.randn(1, 1, 32)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        return unet(sample, torch.tensor([10.0]), hidden, time_ids).sample


def test_single_file_unet_checkpoint_loads_exactly(model_a, model_b, unet_b, tmp_path):
    path = write_unet_checkpoint(unet_b, tmp_path / "fine-tune.safetensors")
    unet, fingerprint = load_unet_checkpoint(str(path), base_dir=model_a, spec=_spec(model_a))
    _assert_same_state(unet, unet_b)
    assert torch.equal(_unet_forward(unet), _unet_forward(unet_b))
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert not any(p.is_meta for p in unet.parameters())
    assert fingerprint != component_fingerprint(model_a, "unet", spec=_spec(model_a))
    assert file_fingerprint(path) == file_fingerprint(str(path))


def test_folder_unet_checkpoint_matches_the_loader(model_a, model_b):
    for dtype in ("fp32", "bf16"):
        spec = _spec(model_a, dtype=dtype)
        unet, fingerprint = load_unet_checkpoint(str(model_b / "unet"), base_dir=model_a, spec=spec)
        _assert_same_state(unet, load_components(_spec(model_b, dtype=dtype), ["unet"])["unet"])
        # A copy of B's unet folder is B's unet: same fingerprint, so it is shared with model B.
        assert fingerprint == component_fingerprint(model_b, "unet", spec=spec)


def test_unet_override_shares_with_the_model_it_came_from(model_a, model_b, unet_b, tmp_path):
    cache = SharedComponents()
    comps, fps = load_components_shared(
        _spec(model_a), ["vae", "unet"], cache=cache, unet_override=str(model_b / "unet")
    )
    _assert_same_state(comps["unet"], unet_b)
    comps_b, fps_b = load_components_shared(_spec(model_b), ["unet"], cache=cache)
    assert comps_b["unet"] is comps["unet"] and fps_b["unet"] == fps["unet"]

    path = write_unet_checkpoint(unet_b, tmp_path / "ft.safetensors")
    comps_f, fps_f = load_components_shared(_spec(model_a), ["unet"], cache=cache, unet_override=str(path))
    _assert_same_state(comps_f["unet"], unet_b)
    assert fps_f["unet"] != component_fingerprint(model_a, "unet", spec=_spec(model_a))


def test_mismatched_checkpoints_fail_with_one_line(model_a, unet_b, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in unet_b.state_dict().items()}
    first = sorted(state)[0]
    cases = {
        "missing": ({k: v for k, v in state.items() if k != first}, rf"1 key missing \(e\.g\. '{first}'\)"),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, r"1 unexpected key \(e\.g\. 'extra\.weight'\)"),
        "shape": ({**state, first: torch.zeros(3, 3)}, r"1 key with the wrong shape \(e\.g\. '.*': \[3, 3\] in"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(ModelLoadError, match=pattern) as info:
            load_unet_checkpoint(str(path), base_dir=model_a, spec=_spec(model_a))
        assert "\n" not in str(info.value) and "does not match the U-Net config" in str(info.value)

    pickle = tmp_path / "unet.ckpt"
    pickle.write_bytes(b"not loaded")
    for source, pattern in [(pickle, "not a .safetensors"), (tmp_path / "nope", "does not exist")]:
        with pytest.raises(ModelLoadError, match=pattern):
            load_unet_checkpoint(str(source), base_dir=model_a, spec=_spec(model_a))


def test_unet_checkpoint_from_s3(s3_bucket, moto_s3_endpoint, model_a, model_b, unet_b, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    client.upload_file(str(write_unet_checkpoint(unet_b, tmp_path / "b.safetensors")), bucket, "ft/b.safetensors")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        client.upload_file(str(model_b / "unet" / name), bucket, f"ft/b-unet/{name}")
    downloads = []
    real_download = ckpt_module._download_s3_object
    monkeypatch.setattr(
        ckpt_module, "_download_s3_object", lambda *a, **k: downloads.append(a[2]["key"]) or real_download(*a, **k)
    )
    spec = _spec(model_a, cache_dir=str(tmp_path / "cache"), s3_endpoint_url=moto_s3_endpoint)

    unet, fingerprint = load_unet_checkpoint(f"s3://{bucket}/ft/b.safetensors", base_dir=model_a, spec=spec)
    _assert_same_state(unet, unet_b)
    assert (tmp_path / "cache" / "s3-unet" / bucket / "ft" / "b.safetensors").is_file()
    assert downloads == ["ft/b.safetensors"]
    assert load_unet_checkpoint(f"s3://{bucket}/ft/b.safetensors", base_dir=model_a, spec=spec)[1] == fingerprint
    assert downloads == ["ft/b.safetensors"]  # same size and ETag: the cached copy is used

    unet_a = load_components(_spec(model_a), ["unet"])["unet"]
    client.upload_file(str(write_unet_checkpoint(unet_a, tmp_path / "a.safetensors")), bucket, "ft/b.safetensors")
    unet, changed = load_unet_checkpoint(f"s3://{bucket}/ft/b.safetensors", base_dir=model_a, spec=spec)
    _assert_same_state(unet, unet_a)
    assert changed != fingerprint and len(downloads) == 2

    unet, fingerprint = load_unet_checkpoint(f"s3://{bucket}/ft/b-unet", base_dir=model_a, spec=spec)
    _assert_same_state(unet, unet_b)
    assert fingerprint == component_fingerprint(model_b, "unet", spec=spec)
    assert sorted(downloads[2:]) == ["ft/b-unet/config.json", "ft/b-unet/diffusion_pytorch_model.safetensors"]

    with pytest.raises(ModelLoadError, match="No U-Net checkpoint at s3://.*/ft/missing.safetensors"):
        load_unet_checkpoint(f"s3://{bucket}/ft/missing.safetensors", base_dir=model_a, spec=spec)
    with pytest.raises(ModelLoadError, match="No objects under"):
        load_unet_checkpoint(f"s3://{bucket}/ft/missing-folder", base_dir=model_a, spec=spec)
