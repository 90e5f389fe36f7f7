"""The model zoo without Ray: entries, the registry in SQLite and Redis, the catalog, the CLI, and
what every API does with ``model`` (the native and OpenAI routes, the generations endpoint, fal
app ids through the official fal-client, ``GET /v1/models``)."""

from __future__ import annotations

import base64
from pathlib import Path

import openai
import pytest

from fixtures_api import make_api
from fixtures_redis import redis_server  # noqa: F401
from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.cli import main as cli
from serve.config import AppConfig
from serve.tenants import TenantPolicy
from serve.zoo import (ModelCatalog, ModelEntry, ModelNotAllowedError, UnknownModelError, make_model_store,
                       model_id_for)
from serve.zoo.store import RedisModelStore, SqliteModelStore

DATA_URL = "data:image/png;base64," + base64.b64encode(Path(SAMPLE_IMAGE_PATH).read_bytes()).decode()
#: The OpenAI SDK uploads the image as a file (multipart) with the native parameters beside it.
REFERENCE = ("sample.png", Path(SAMPLE_IMAGE_PATH).read_bytes(), "image/png")
SMALL = {"num_frames": 4, "width": 64, "height": 64, "num_inference_steps": 2}


# -- entries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"id": "a"}, "exactly one of source"),
    ({"id": "a", "source": "x/y", "base": "b"}, "exactly one of source"),
    ({"id": "a", "base": "b"}, "brings a unet checkpoint, a lora adapter, or both"),
    ({"id": "a", "base": "a", "lora": "/l"}, "its own base"),
    ({"id": "a", "source": "x/y", "visibility": "private"}, "names its tenant"),
    ({"id": "a", "source": "x/y", "tenant": "acme"}, "names its tenant"),
    ({"id": "a", "kind": "text-to-image", "base": "b", "lora": "/l"}, "a text-to-image model is a whole pipeline"),
    ({"id": "a", "source": "x/y", "defaults": {"seed": 1}}, "seed cannot have a model default"),
    ({"id": "a", "source": "x/y", "defaults": {"num_frames": 0}}, "num_frames"),
    ({"id": "a", "source": "x/y", "defaults": {"num_frames": 20}, "limits": {"max_num_frames": 14}},
     "exceeds limits.max_num_frames"),
    ({"id": "/etc/passwd", "source": "x/y"}, "pattern"),
    ({"id": "a/b/c", "source": "x/y"}, "pattern"),
    ({"id": "a", "source": "x/y", "lora_scale": 0}, "greater than 0"),
    ({"id": "a", "source": "x/y", "surprise": 1}, "Extra inputs"),
    ({"id": "v1/videos", "source": "x/y"}, "the API's own routes"),
    ({"id": "fal-ai/stable-video", "source": "x/y"}, "the API's own routes"),
    ({"id": "a", "base": "b", "lora": "/l", "dtype": "bf16"}, "belong to a whole pipeline"),
])
def test_bad_entries_are_refused_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelEntry.model_validate(fields)


def test_owner_and_visibility():
    assert ModelEntry(id="svd", source="stabilityai/svd").owned_by == "stabilityai"
    assert ModelEntry(id="svd", source="/models/svd").owned_by == "svd-serve"
    private = ModelEntry(id="acme/x", base="svd", lora="/l", visibility="private", tenant="acme")
    assert private.owned_by == "acme" and private.visible_to("acme") and not private.visible_to("globex")
    assert model_id_for("stabilityai/stable-video-diffusion-img2vid-xt") == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert model_id_for("/abs/models/tiny/") == "tiny" and model_id_for("./models/tiny") == "tiny"


# -- the registry in both backends ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteModelStore(tmp_path / "jobs.sqlite3")
    else:
        made = RedisModelStore(request.getfixturevalue("redis_server"), key_prefix=f"zoo{id(tmp_path)}")
    yield made
    made.close()


def test_the_registry_round_trips(store):
    first = ModelEntry(id="acme/anime", base="svd", unet="/u.safetensors", defaults={"num_frames": 14})
    assert store.put(first) is True and store.put(first) is False
    second = ModelEntry(id="b", source="org/b", preload=True)
    store.put(second)
    assert [entry.id for entry in store.list()] == ["acme/anime", "b"]
    assert store.get("acme/anime") == first and store.get("nope") is None
    assert store.delete("acme/anime") is True and store.delete("acme/anime") is False
    assert store.list() == [second]


# -- the catalog ------------------------------------------------------------------------------------


def catalog_for(tmp_path, **config) -> ModelCatalog:
    app = AppConfig.model_validate({"model": {"source": "stabilityai/stable-video-diffusion-img2vid-xt"},
                                    "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")}, **config})
    return ModelCatalog(app, make_model_store(app.job_store), ttl_s=3600)


def test_declared_models_win_and_new_ones_are_seen_at_once(tmp_path):
    catalog = catalog_for(tmp_path, models=[{"id": "svd-xt-lora", "base": "stabilityai/stable-video-diffusion-"
                                             "img2vid-xt", "lora": "/l"}])
    assert catalog.default_id == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert catalog.get("stable-video-diffusion-img2vid-xt").id == catalog.default_id  # the old alias
    catalog.store.put(ModelEntry(id="svd-xt-lora", source="someone/else"))  # cannot shadow a declared one
    assert catalog.get("svd-xt-lora").lora == "/l"
    assert catalog.get("late") is None
    catalog.store.put(ModelEntry(id="late", source="org/late"))
    assert catalog.get("late").source == "org/late"  # a miss reads the registry again, TTL or not
    catalog.store.put(ModelEntry(id="late", source="org/changed"))
    assert catalog.get("late").source == "org/late"  # a hit is cached for ttl_s
    assert catalog.entries(fresh=True)["late"].source == "org/changed"


def test_resolve_hides_private_models_and_applies_allowed_models(tmp_path):
    catalog = catalog_for(tmp_path)
    catalog.store.put(ModelEntry(id="acme/mine", base=catalog.default_id, lora="/l", visibility="private",
                                 tenant="acme"))
    anyone = TenantPolicy()
    assert catalog.resolve("acme/mine", anyone, "acme").id == "acme/mine"
    with pytest.raises(UnknownModelError):
        catalog.resolve("acme/mine", anyone, "globex")
    with pytest.raises(UnknownModelError):
        catalog.resolve("nope", anyone, "acme")
    with pytest.raises(ModelNotAllowedError, match="allowed_models"):
        catalog.resolve("acme/mine", TenantPolicy(allowed_models=["stabilityai/*"]), "acme")
    assert catalog.resolve(None, TenantPolicy(allowed_models=["stabilityai/*"]), "acme").id == catalog.default_id
    assert [e.id for e in catalog.visible(anyone, "globex")] == [catalog.default_id,
                                                                  "stabilityai/stable-diffusion-xl-base-1.0"]


def test_weights_resolve_through_the_base_chain(tmp_path):
    catalog = catalog_for(tmp_path)
    store = catalog.store
    store.put(ModelEntry(id="anime", base=catalog.default_id, unet="/anime-unet"))
    store.put(ModelEntry(id="anime-lora", base="anime", lora="/lora", lora_scale=0.5))
    weights = catalog.weights(catalog.get("anime-lora"))
    assert weights.pipeline.source == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert (weights.unet, weights.lora, weights.lora_scale) == ("/anime-unet", "/lora", 0.5)
    store.put(ModelEntry(id="lora-on-lora", base="anime-lora", lora="/other"))
    with pytest.raises(ValueError, match="its base has a LoRA adapter"):
        catalog.weights(catalog.get("lora-on-lora"))
    store.put(ModelEntry(id="theirs", base=catalog.default_id, unet="/u", visibility="private", tenant="acme"))
    for tenant in (None, "globex"):  # a public or another tenant's fine-tune cannot build on acme's model
        visibility = {"visibility": "private", "tenant": tenant} if tenant else {}
        store.put(ModelEntry(id="thief", base="theirs", lora="/l", **visibility))
        with pytest.raises(UnknownModelError, match="base 'theirs' is not registered"):
            catalog.weights(catalog.get("thief"))
    store.put(ModelEntry(id="own", base="theirs", lora="/l", visibility="private", tenant="acme"))
    assert catalog.weights(catalog.get("own")).unet == "/u"  # its own tenant's base is fine
    store.put(ModelEntry(id="orphan", base="gone", lora="/l"))
    with pytest.raises(UnknownModelError, match="base 'gone' is not registered"):
        catalog.weights(catalog.get("orphan"))
    store.put(ModelEntry(id="loop-a", base="loop-b", unet="/u"))
    store.put(ModelEntry(id="loop-b", base="loop-a", unet="/u"))
    with pytest.raises(ValueError, match="loops"):
        catalog.weights(catalog.get("loop-a"))


def test_the_config_checks_model_ids_and_bases():
    with pytest.raises(ValueError, match="used twice"):
        AppConfig.model_validate({"models": [{"id": "a", "source": "x/a"}, {"id": "a", "source": "x/b"}]})
    with pytest.raises(ValueError, match="not declared"):
        AppConfig.model_validate({"models": [{"id": "a", "base": "nope", "lora": "/l"}]})
    with pytest.raises(ValueError, match="used twice"):
        AppConfig.model_validate({"model_id": "svd", "models": [{"id": "svd", "source": "x/a"}]})


# -- svd-serve models -------------------------------------------------------------------------------


def test_the_cli_adds_changes_lists_and_removes(tmp_path, capsys):
    where = ["models", "--job-store", f"sqlite:{tmp_path / 'jobs.sqlite3'}"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert cli([*where, "add", "acme/slowmo", "--base", "svd", "--lora", str(adapter), "--private", "acme",
                "--default", "num_frames=14", "--max-num-frames", "14"]) == 0
    assert "note: base 'svd' is not in the registry" in capsys.readouterr().err
    assert cli([*where, "add", "svd", "--source", "stabilityai/svd", "--preload"]) == 0
    assert cli([*where, "set", "acme/slowmo", "--lora-scale", "0.5", "--default", "fps=8"]) == 0
    capsys.readouterr()
    assert cli([*where, "list"]) == 0
    out = capsys.readouterr().out
    assert "acme/slowmo  image-to-video  base=svd" in out and "private=acme" in out and "preload" in out
    stored = SqliteModelStore(tmp_path / "jobs.sqlite3").get("acme/slowmo")
    assert stored.lora_scale == 0.5 and stored.defaults == {"num_frames": 14, "fps": 8}
    # Expected failures: one line, exit 1, nothing changed.
    for args, message in [
        (["add", "acme/slowmo", "--source", "x/y"], "already registered"),
        (["add", "bad id", "--source", "x/y"], "id: String should match pattern"),
        (["add", "x", "--source", str(tmp_path / "missing")], "does not exist"),
        (["add", "x", "--base", "svd"], "brings a unet checkpoint, a lora adapter, or both"),
        (["add", "x", "--source", "x/y", "--default", "seed=1"], "--default 'seed=1'"),
        (["set", "acme/slowmo", "--max-num-frames", "8"], "exceeds limits.max_num_frames"),
        (["set", "nope", "--preload"], "no registered model 'nope'"),
        (["remove", "svd"], "acme/slowmo use 'svd' as their base"),
        (["add", "globex/x", "--base", "acme/slowmo", "--unet", str(adapter)], "private to another tenant"),
        (["add", "y", "--base", "acme/slowmo", "--lora", str(adapter), "--private", "acme"],
         "has a LoRA adapter itself"),
    ]:
        assert cli([*where, *args]) == 1, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert cli([*where, "remove", "acme/slowmo"]) == 0 and cli([*where, "remove", "svd"]) == 0
    assert SqliteModelStore(tmp_path / "jobs.sqlite3").list() == []


def test_the_cli_refuses_to_change_a_declared_model(tmp_path, capsys):
    config = tmp_path / "app.yaml"
    config.write_text(f"model: {{source: stabilityai/svd}}\njob_store: {{sqlite_path: {tmp_path / 'jobs.sqlite3'}}}\n")
    assert cli(["models", "--config", str(config), "remove", "stabilityai/svd"]) == 1
    assert "declared in the app config" in capsys.readouterr().err
    assert cli(["models", "--config", str(config), "add", "x", "--base", "nope", "--lora", str(tmp_path)]) == 1
    assert "base 'nope' is not a registered or declared model" in capsys.readouterr().err


# -- the APIs ---------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    client = make_api(tmp_path, model={"source": "stabilityai/stable-video-diffusion-img2vid-xt"}, model_id="svd-xt",
                      tenants={"alice": {}, "bob": {}, "strict": {"allowed_models": ["svd-xt"]}})
    store = client.service.catalog.store
    store.put(ModelEntry(id="acme/anime", base="svd-xt", unet="/u", defaults={"num_frames": 8, "fps": 12},
                         limits={"max_pixels": 128 * 128}))
    store.put(ModelEntry(id="acme/alice-only", base="svd-xt", lora="/l", visibility="private", tenant="alice"))
    yield client
    client.service.store.close()


def h(api, tenant="alice"):
    return {"Authorization": f"Bearer {api.keys[tenant]}"}


def submit(api, tenant="alice", **body):
    return api.post("/v1/videos", headers=h(api, tenant), json={"image_url": DATA_URL, **SMALL, **body})


def test_each_api_takes_a_model_and_the_job_records_it(api):
    job = submit(api, model="acme/anime", num_frames=None)
    assert job.status_code == 202, job.text
    assert job.json()["model"] == "acme/anime"
    stored = api.service.store.get(job.json()["id"], tenant="alice")
    assert stored.model == "acme/anime" and stored.params["num_frames"] == 8 and stored.params["fps"] == 12
    # Without model: the default, by its id.
    assert submit(api).json()["model"] == "svd-xt"
    # The generations endpoint's model, OpenAI's SDK.
    api.service.config.generations_wait_s = 0
    generated = api.post("/v1/video/generations", headers=h(api), json={"model": "acme/anime", "image": DATA_URL,
                                                                         **SMALL})
    assert generated.status_code == 202, generated.text
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=api.keys["alice"], http_client=api, max_retries=0)
    video = sdk.videos.create(prompt="x", model="acme/alice-only", input_reference=REFERENCE, extra_body=SMALL)
    assert video.model == "acme/alice-only"


def test_a_models_limits_and_defaults_apply(api):
    refused = submit(api, model="acme/anime", width=256, height=256)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "limit_exceeded"
    assert "exceeds this model's max_pixels 16384" in refused.json()["error"]["message"]
    # A size given by the request replaces the model's whole size group, never mixed with it.
    assert submit(api, model="acme/anime", width=128, height=64).status_code == 202


def test_another_tenants_private_model_is_unknown_everywhere(api):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=api.keys["bob"], http_client=api, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.videos.create(prompt="x", model="acme/alice-only", input_reference=REFERENCE, extra_body=SMALL)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.videos.create(prompt="x", model="acme/never-was", input_reference=REFERENCE, extra_body=SMALL)
    assert unknown.value.body["message"].replace("never-was", "alice-only") == info.value.body["message"]
    assert "acme/alice-only" not in {m.id for m in sdk.models.list()}
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("acme/alice-only")
    fal = api.post("/acme/alice-only", headers={"Authorization": f"Key {api.keys['bob']}"}, json={"image_url": DATA_URL})
    assert fal.status_code == 404
    api.service.config.generations_wait_s = 0
    generated = api.post("/v1/video/generations", headers=h(api, "bob"), json={"model": "acme/alice-only",
                                                                              "image": DATA_URL})
    assert generated.status_code == 404 and generated.json()["error"]["code"] == "model_not_found"
    assert api.service.store.queue_depth() == 0
    alice = {m.id for m in openai.OpenAI(base_url="http://testserver/v1", api_key=api.keys["alice"], http_client=api,
                                         max_retries=0).models.list()}
    assert alice == {"svd-xt", "stabilityai/stable-diffusion-xl-base-1.0", "acme/anime", "acme/alice-only"}


def test_the_default_model_named_or_not_is_one_request_and_other_kinds_are_refused(api):
    first = api.post("/v1/videos", headers={**h(api), "Idempotency-Key": "k1"}, json={"image_url": DATA_URL, **SMALL})
    again = api.post("/v1/videos", headers={**h(api), "Idempotency-Key": "k1"},
                     json={"image_url": DATA_URL, **SMALL, "model": "svd-xt"})
    assert first.status_code == again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    t2i = submit(api, model="stabilityai/stable-diffusion-xl-base-1.0")
    assert t2i.status_code == 422 and "is a text-to-image model" in t2i.json()["error"]["message"]
    # The fal route for zoo app ids leaves the API's own paths as they were.
    assert api.post("/v1/models", headers=h(api), json={}).status_code == 405
    assert api.post("/healthz/x", json={}).status_code == 404


def test_allowed_models_is_a_403_and_filters_the_list(api):
    refused = submit(api, tenant="strict", model="acme/anime")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert submit(api, tenant="strict").status_code == 202
    listed = api.get("/v1/models", headers=h(api, "strict")).json()["data"]
    assert [model["id"] for model in listed] == ["svd-xt"]
    anime = api.get("/v1/models/acme/anime", headers=h(api)).json()
    assert (anime["base"], anime["fine_tune"], anime["defaults"]) == ("svd-xt", "unet", {"num_frames": 8, "fps": 12})
    assert anime["default_num_frames"] == 8 and anime["model_limits"]["max_pixels"] == 128 * 128
    private = api.get("/v1/models/acme/alice-only", headers=h(api)).json()
    assert (private["owned_by"], private["visibility"], private["fine_tune"]) == ("alice", "private", "lora")


def test_a_model_registered_while_serving_is_a_fal_app(api, tmp_path):
    from test_compat_fal import run_fal_client, served_in_process

    api.service.catalog.store.put(ModelEntry(id="globex/svd-product", base="svd-xt", lora="/l"))
    with served_in_process(api, tmp_path / "tls") as proxy:
        out = run_fal_client((api, proxy), "flow", {"image_url": DATA_URL, "seed": 5}, tmp_path,
                             app="globex/svd-product")
    request_id = out["handle"]["request_id"]
    base = f"https://{proxy.host}/globex/svd-product/requests/{request_id}"
    assert (out["handle"]["response_url"], out["handle"]["status_url"]) == (base, base + "/status")
    assert out["status"]["type"] == "Completed" and out["result"]["seed"] == 5
    assert api.service.store.get(request_id, tenant="alice").model == "globex/svd-product"


def test_tiny_model_writes_a_lora_adapter_for_a_model(tmp_path, tiny_model_dir, capsys):
    from pipelines.adapters import LoraAdapters
    from pipelines.loader import ModelSpec, load_components

    assert cli(["tiny-model", str(tmp_path / "lora"), "--lora-for", str(tiny_model_dir)]) == 0
    assert "svd-serve models add NAME --base MODEL --lora" in capsys.readouterr().out
    unet = load_components(ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu"), ("unet",))["unet"]
    assert LoraAdapters(unet).load("demo", tmp_path / "lora") >= 0
