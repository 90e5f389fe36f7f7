"""The models one stage replica holds (``serve/stage_models.py``), without Ray: versions, sharing,
the LoRA adapter's life across eviction and requests in flight, and a model that cannot load."""

from __future__ import annotations

import gc

import pytest
import torch

from pipelines.registry import DECODE, SAMPLING
from serve.config import AppConfig
from serve.stage_models import StageModels, adapter_name
from serve.zoo import ModelCatalog, ModelEntry, ModelUnavailableError, ModelVersionChangedError, make_model_store


@pytest.fixture
def catalog(tmp_path, tiny_model_dir):
    from pipelines.adapters import write_tiny_lora
    from pipelines.loader import ModelSpec, load_components

    config = AppConfig.model_validate({"model": {"source": str(tiny_model_dir), "dtype": "fp32", "device": "cpu"},
                                       "model_id": "a", "text_to_image_model": None,
                                       "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")}})
    made = ModelCatalog(config, make_model_store(config.job_store), ttl_s=0)
    unet = load_components(ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu"), ("unet",))["unet"]
    made.lora_dir = write_tiny_lora(unet, tmp_path / "lora", seed=3)
    made.store.put(ModelEntry(id="a-lora", base="a", lora=str(made.lora_dir)))
    return made


def forward(stage) -> torch.Tensor:
    unet = stage.unet
    torch.manual_seed(0)
    sample = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        return unet(sample, torch.tensor(5.0), encoder_hidden_states=torch.randn(1, 1, 32),
                    added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]), return_dict=False)[0]


def test_a_lora_model_shares_its_bases_unet_and_keeps_its_adapter_while_in_flight(catalog):
    models = StageModels(SAMPLING, catalog)
    base = models.load(catalog.version_key("a"))
    lora = models.load(catalog.version_key("a-lora"))
    assert lora.stage.unet is base.stage.unet and models.components.hits >= 1
    base.hold()
    lora.hold()
    with base.applied() as stage:
        plain = forward(stage)
    with lora.applied() as stage:
        adapted = forward(stage)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the result; the base is untouched
    lora.__del__()  # evicted by the multiplexer while its request still runs
    assert lora.adapter in lora.adapters.names and models.evictions == 1
    again = models.load(lora.key)  # the same version requested again meanwhile
    lora.release()  # the first request ends: the adapter stays for the reloaded model
    assert again.adapter in again.adapters.names
    again.hold()
    with again.applied() as stage:
        assert torch.equal(forward(stage), adapted)
    again.release()
    again.__del__()
    assert again.adapter not in again.adapters.names  # the last holder let go
    with base.applied() as stage:
        assert torch.equal(forward(stage), plain)
    base.release()


def test_a_changed_entry_is_a_new_version_and_a_removed_one_is_unavailable(catalog, tmp_path):
    first = catalog.version_key("a-lora")
    catalog.store.put(ModelEntry(id="a-lora", base="a", lora=str(catalog.lora_dir), lora_scale=0.5))
    second = catalog.version_key("a-lora")
    assert first != second and first.split("@")[0] == second.split("@")[0] == "a-lora"
    assert adapter_name(first) != adapter_name(second)
    # A job that started on the first version asks a replica that never loaded it: refused, so the
    # job restarts on the current version instead of mixing two (the runner requeues it).
    with pytest.raises(ModelVersionChangedError, match="changed since this job started") as raised:
        StageModels(SAMPLING, catalog).load(first)
    # The runner tells a registry change from a config skew by the keys, which cross Ray with it.
    import pickle

    crossed = pickle.loads(pickle.dumps(raised.value))
    assert (crossed.requested, crossed.current) == (first, second) and str(crossed) == str(raised.value)
    catalog.store.delete("a-lora")
    with pytest.raises(ModelUnavailableError, match="no longer registered"):
        catalog.version_key("a-lora")
    models = StageModels(DECODE, catalog)
    with pytest.raises(ModelUnavailableError, match="no longer registered"):
        models.load(second)
    catalog.store.put(ModelEntry(id="broken", source=str(tmp_path / "nowhere")))
    with pytest.raises(ModelUnavailableError, match="could not be loaded on this deployment") as info:
        models.load(catalog.version_key("broken"))
    assert str(tmp_path) not in str(info.value)  # the operator's paths stay in the logs
    assert info.value.code == "model_unavailable"


def test_components_are_shared_weakly(catalog):
    models = StageModels(DECODE, catalog)
    first = models.load(catalog.version_key("a"))
    second = models.load(catalog.version_key("a-lora"))  # the base's VAE: same hash, same object
    assert second.stage.vae is first.stage.vae and models.components.hits == 1
    del first, second
    gc.collect()
    models.load(catalog.version_key("a"))
    assert models.components.loads == 2  # nothing kept it alive: loaded again
