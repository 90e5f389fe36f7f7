"""The Helm chart (helm/svd-serve): lint, render every value set, and check what it renders.

No helm binary and no cluster: rendering and linting use Helm's Go SDK through ``helm_python``
(see tests/helm_utils.py). Checks, per value set (helm/svd-serve/ci/*.yaml, k8s/values/*.yaml):

* ``helm lint --strict`` is clean and the values pass values.schema.json;
* every Kubernetes object validates strictly against the Kubernetes OpenAPI schema
  (kubernetes-validate), the Ray pod templates included;
* the RayService validates against KubeRay v1.7's CRD (../shared/kuberay-crds), with no field the
  CRD does not declare, and passes KubeRay's own admission rules;
* serveConfigV2 parses with Ray Serve's ServeDeploySchema, its args with serve.config.AppConfig,
  every stage the application builds is configured by the chart, each is schedulable on some worker
  group, and the worker groups can hold the stages' maximum replica counts;
* the model zoo (`models`) and each stage's `max_num_models_per_replica` reach the app args, the
  schema's model entry mirrors serve.zoo.entry.ModelEntry (what one rejects, so does the other), and
  every Ray container mounts the model cache and gets SVD_SERVE_CACHE_DIR.

Compiled stages, the compile cache and the warm-cache Jobs: tests/test_helm_compile_cache.py.

Plus: typos in values are rejected, long release names stay within KubeRay's 47 characters,
secrets never appear in plain text outside Secrets, and k8s/manifests/svd-serve.yaml is current.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

try:  # `tests` is a namespace package when the repository root is on sys.path
    from tests import helm_utils as hu
except ImportError:  # pytest's rootdir-relative import puts tests/ itself on sys.path
    import helm_utils as hu

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')")

VALUE_FILES = hu.values_files()
VALUE_IDS = [f"{p.parent.name}/{p.name}" for p in VALUE_FILES]
NON_K8S_KINDS = {"RayService", "PodMonitor", "ServiceMonitor"}

requires_crds = pytest.mark.skipif(
    not hu.RAYSERVICE_CRD.exists(),
    reason=f"KubeRay CRDs not found at {hu.CRD_DIR} (expected ray.io_rayservices.yaml from KubeRay v1.7 there)",
)


@pytest.fixture(scope="module", params=VALUE_FILES, ids=VALUE_IDS)
def rendered(request) -> hu.Rendered:
    return hu.render_file(request.param)


@pytest.fixture(scope="module")
def default() -> hu.Rendered:
    return hu.render()


def _app_config():
    try:
        from serve.config import AppConfig
    except ImportError as error:  # serve/config or pipelines/loader not written yet
        pytest.skip(f"serve.config.AppConfig is not importable yet: {error}")
    return AppConfig


def _containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


# -- chart files ------------------------------------------------------------------------------------


def test_chart_metadata():
    chart = yaml.safe_load((hu.CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "svd-serve"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0" and isinstance(chart["appVersion"], str)
    assert chart["kubeVersion"] and chart["description"]
    schema = json.loads((hu.CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def _objects_without_closed_properties(schema, path="values"):
    """Objects in values.schema.json that declare properties but leave additionalProperties open.
    Conditions (if/then/else) only constrain an object declared, and closed, around them."""
    found = []
    if isinstance(schema, dict):
        if "properties" in schema and schema.get("additionalProperties") is not False:
            found.append(path)
        for key, value in schema.items():
            if key in ("if", "then", "else"):
                continue
            found += _objects_without_closed_properties(value, f"{path}.{key}" if key != "properties" else path)
    elif isinstance(schema, list):
        for item in schema:
            found += _objects_without_closed_properties(item, path)
    return found


def test_values_schema_closes_every_object():
    schema = json.loads((hu.CHART_DIR / "values.schema.json").read_text())
    assert _objects_without_closed_properties(schema) == []
    # ...and the schema accepts the chart's own defaults.
    import jsonschema

    jsonschema.Draft7Validator(schema).validate(hu.load_values(hu.CHART_DIR / "values.yaml"))


def test_every_value_is_documented():
    """helm-docs style: each value (a leaf, or a map documented as a whole) has a `# --` comment."""
    lines = (hu.CHART_DIR / "values.yaml").read_text().splitlines()
    key_line = re.compile(r"^(\s*)([A-Za-z0-9_.\-/]+):(.*)$")
    undocumented, skip_deeper_than = [], None
    for number, line in enumerate(lines):
        match = key_line.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        previous = number - 1
        while previous >= 0 and lines[previous].strip().startswith("#") and not lines[previous].strip().startswith("# --"):
            previous -= 1
        if previous >= 0 and lines[previous].strip().startswith("# --"):
            skip_deeper_than = indent  # documented as a whole: its children need no comments
            continue
        following = next((l for l in lines[number + 1:] if l.strip() and not l.strip().startswith("#")), "")
        is_parent_map = not rest and len(following) - len(following.lstrip()) > indent and not following.strip().startswith("-")
        if not is_parent_map:
            undocumented.append(f"line {number + 1}: {key}")
    assert undocumented == []


def test_values_schema_matches_app_config():
    """The values that become serveConfigV2 args use exactly AppConfig's field names, both ways."""
    AppConfig = _app_config()
    from pipelines.acceleration.options import LowVramOptions, StageAcceleration, WarmupShape
    from pipelines.loader import ModelSpec
    from pipelines.registry import STAGES
    from serve import config

    schema = json.loads((hu.CHART_DIR / "values.schema.json").read_text())
    props, defs = schema["properties"], schema["definitions"]

    def names(node):
        return set(node["properties"])

    chart_owned = {"cache_dir"}  # set by the chart from modelCache.mountPath
    pairs = {
        "model": (names(props["model"]), set(ModelSpec.model_fields) - chart_owned),
        # text_to_image_model: the same ModelSpec, plus the chart's own switch (enabled: false -> null).
        "textToImageModel": (names(props["textToImageModel"]) - {"enabled"}, set(ModelSpec.model_fields) - chart_owned),
        "stages": (names(props["stages"]), set(config.StagesConfig.model_fields)
                   | {spec.config_key for spec in STAGES.stages()}),
        "stage": (names(defs["stage"]), set(config.DeploymentConfig.model_fields)),
        "autoscaling": (names(defs["autoscaling"]), set(config.AutoscalingConfig.model_fields)),
        "ray_actor_options": (names(defs["actorOptions"]), set(config.ActorOptions.model_fields)),
        "stage.acceleration": (names(defs["stageAcceleration"]), set(StageAcceleration.model_fields)),
        "stage.warmup_shapes": (names(defs["warmupShape"]), set(WarmupShape.model_fields)),
        "stage.low_vram": (names(defs["lowVramOptions"]), set(LowVramOptions.model_fields)),
        "storage": (names(props["storage"]), set(config.StorageConfig.model_fields)),
        "jobStore": (names(props["jobStore"]), set(config.JobStoreConfig.model_fields)),
        "tracing": (names(props["tracing"]), set(config.TracingConfig.model_fields)),
    }
    # The model zoo: `models` entries are serve.zoo.entry.ModelEntry (bar `created`, which the registry stamps).
    assert "models" in AppConfig.model_fields, (
        "serve.config.AppConfig has no `models` field, but the chart renders the model zoo as args.models")
    (entry_type,) = typing.get_args(AppConfig.model_fields["models"].annotation)
    from serve.zoo.entry import DEFAULTABLE_PARAMS, ModelEntry, ModelLimits

    assert entry_type is ModelEntry
    pairs["models"] = (names(defs["modelEntry"]), set(ModelEntry.model_fields) - {"created"})
    pairs["models.limits"] = (names(defs["modelLimits"]), set(ModelLimits.model_fields))
    pairs["models.defaults"] = (names(defs["modelDefaults"]), set(DEFAULTABLE_PARAMS))
    sections = {"model", "text_to_image_model", "models", "stages", "storage", "job_store", "tracing", "auth"}
    pairs["app"] = (names(props["app"]), set(AppConfig.model_fields) - sections)
    mismatches = {
        section: {"only in the chart": sorted(chart - app), "missing from the chart": sorted(app - chart)}
        for section, (chart, app) in pairs.items()
        if chart != app
    }
    assert mismatches == {}, (
        "values.yaml/values.schema.json and serve.config.AppConfig disagree; add or remove these keys in "
        f"helm/svd-serve (values.yaml, values.schema.json): {mismatches}"
    )
    assert set(config.AuthConfig.model_fields) == {"tenants_file"}, "AuthConfig changed: map it in the chart"


# -- lint and render --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALUE_FILES, ids=VALUE_IDS)
def test_lint_strict(path):
    report = hu.lint(hu.load_values(path))
    assert hu.lint_problems(report) == []


def test_renders_expected_objects(default):
    kinds = sorted(doc["kind"] for doc in default.docs)
    assert kinds == ["Pod", "PodDisruptionBudget", "RayService", "ServiceAccount"]
    assert "helm test" in default.notes


def test_kubernetes_schemas(rendered):
    checked = 0
    for template, doc in rendered.documents:
        if doc["kind"] in NON_K8S_KINDS:
            continue
        hu.k8s_validate(doc)
        checked += 1
    for group, template in hu.pod_templates(rendered.rayservice):
        hu.k8s_validate(hu.as_pod(f"ray-{group}", template))
    assert checked >= 2


@requires_crds
def test_rayservice_matches_kuberay_crd(rendered):
    schema = hu.crd_schema()
    rayservice = rendered.rayservice
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert hu.crd_errors(rayservice, schema) == []
    assert hu.unknown_fields(rayservice, schema) == []
    assert hu.kuberay_errors(rayservice) == []


@requires_crds
def test_crd_checks_catch_mistakes(default):
    """The strict checks above are not vacuous."""
    schema = hu.crd_schema()
    broken = copy.deepcopy(default.rayservice)
    cluster = broken["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["replica"] = 1  # typo: not in the CRD
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["bogus"] = True
    assert any("replica: unknown field" in e for e in hu.unknown_fields(broken, schema))
    assert any(".bogus: unknown field" in e for e in hu.unknown_fields(broken, schema))
    assert any("num-cpus" in e for e in hu.crd_errors(broken, schema))
    broken["metadata"]["name"] = "x" * 48
    assert any("longer than 47" in e for e in hu.kuberay_errors(broken))


def test_other_custom_resources(rendered):
    """PodMonitor/ServiceMonitor (no CRD here): they select the Ray pods on a port they declare."""
    ray_pods = [t for _, t in hu.pod_templates(rendered.rayservice)]
    for monitor in rendered.of_kind("PodMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        for template in ray_pods:
            assert selector.items() <= template["metadata"]["labels"].items()
            ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    for monitor in rendered.of_kind("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        services = [s for s in rendered.of_kind("Service")
                    if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(services) == 1
        for template in ray_pods:
            assert services[0]["spec"]["selector"].items() <= template["metadata"]["labels"].items()


# -- the Serve application --------------------------------------------------------------------------


def test_serve_config(rendered):
    from ray.serve.schema import ServeDeploySchema

    AppConfig = _app_config()
    config = rendered.serve_config
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "serve.app:build_app"
    assert application["route_prefix"] == "/"
    assert config["http_options"]["port"] == 8000
    app_config = AppConfig.model_validate(application["args"])
    for stage in ("sampler", "image_encoder", "decoder", "video_encoder", "runner"):
        assert getattr(app_config.stages, stage).graceful_shutdown_timeout_s >= 600, stage
    # Every stage the application builds is configured by the chart (a stage left out would get its
    # registry defaults: no GPU and no pinning resource), and none the application does not build.
    built = {spec.config_key for spec in app_config.built_stages()}
    assert set(application["args"]["stages"]) - {"ingress", "runner"} == built
    if application["args"]["text_to_image_model"] is not None:
        assert app_config.text_to_image_model.cache_dir == application["args"]["model"]["cache_dir"]
        assert "text_to_image" in built
    assert hu.placement_errors(rendered.rayservice, application["args"]) == []


def _max_replicas(cfg):
    autoscaling = cfg.get("autoscaling")
    return autoscaling["max_replicas"] if autoscaling else cfg.get("num_replicas") or 1


def capacity_errors(rayservice, args):
    """Each stage whose pinning resources only one worker group offers must fit there at its maximum
    replica count, together with the other stages pinned there: GPUs and CPUs per pod x maxReplicas."""
    groups = hu.worker_groups(rayservice)
    spec = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    demand = {name: {"gpus": 0.0, "cpus": 0.0, "stages": []} for name in groups}
    for stage, cfg in args["stages"].items():
        options = cfg.get("ray_actor_options", {})
        wanted = options.get("resources", {})
        hosts = [name for name, group in groups.items() if all(group["resources"].get(r, 0) >= n for r, n in wanted.items())]
        if len(hosts) != 1:
            continue
        (host,) = hosts
        count = _max_replicas(cfg)
        demand[host]["gpus"] += count * options.get("num_gpus", 0)
        demand[host]["cpus"] += count * options.get("num_cpus", 1)
        demand[host]["stages"].append(f"{stage} x{count}")
    errors = []
    for name, want in demand.items():
        pods = spec[name]["maxReplicas"]
        for kind in ("gpus", "cpus"):
            have = pods * groups[name][kind]
            if want[kind] > have + 1e-9:
                errors.append(f"{name}: {', '.join(want['stages'])} need {want[kind]:g} {kind}, "
                              f"{pods} pods offer {have:g}")
    return errors


def test_worker_groups_hold_the_stages_at_their_maximum(rendered):
    """The Sampler and TextToImage both take whole GPUs of gpu-large: its maxReplicas must cover both."""
    assert capacity_errors(rendered.rayservice, rendered.app_args) == []


def test_capacity_check_is_not_vacuous():
    rendered = hu.render({"workerGroups": {"gpu-large": {"maxReplicas": 4}}})
    (error,) = capacity_errors(rendered.rayservice, rendered.app_args)
    assert error.startswith("gpu-large:") and "text_to_image x2" in error and "sampler x4" in error


def test_import_path_builds_the_same_application_as_make_serve(rendered):
    """The chart's serveConfigV2 builds, through serve.app:build_app, the application `make serve`
    runs: the same seven deployments, each with the options the values asked for."""
    from ray.serve._private.build_app import build_app as build_deployments  # pinned ray==2.60.0

    (application,) = rendered.serve_config["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    from serve.up import local_config

    def deployments(app):
        return {d.name: d for d in build_deployments(app, name="svd").deployments}

    chart = deployments(builder(application["args"]))
    local = deployments(builder(local_config(model="models/tiny", data_dir=Path("data"), config_file=None)))
    assert set(chart) == set(local) == {"Ingress", "JobRunner", "TextToImage", "ImageEncoder", "Sampler", "Decoder",
                                        "VideoEncoder"}
    for name, key in (("TextToImage", "text_to_image"), ("ImageEncoder", "image_encoder"), ("Sampler", "sampler"),
                      ("Decoder", "decoder"), ("VideoEncoder", "video_encoder")):
        wanted = application["args"]["stages"][key]["ray_actor_options"]
        options = chart[name].ray_actor_options
        assert options.get("num_gpus", 0) == wanted.get("num_gpus", 0), name
        assert options.get("resources", {}) == wanted.get("resources", {}), name


def test_head_runs_no_model_work(rendered):
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    head_resources = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_resources.get("limits", {})


def test_worker_groups_from_one_map(default):
    groups = {g["groupName"]: g for g in default.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-large", "gpu-small", "cpu"}
    offered = {name: json.loads(g["rayStartParams"]["resources"]) for name, g in groups.items()}
    assert offered == {"gpu-large": {"svd_sampler": 1000, "svd_text_to_image": 1000}, "gpu-small": {"svd_codec": 1000},
                       "cpu": {"svd_cpu": 1000}}
    for name, group in groups.items():
        spec = group["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == name.startswith("gpu"), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/dev/shm", "/models"} <= mounts
        if name.startswith("gpu"):
            assert spec["nodeSelector"] and spec["tolerations"]
    args = default.app_args
    assert args["stages"]["sampler"]["ray_actor_options"]["resources"] == {"svd_sampler": 1}


def test_disabled_group_is_dropped_and_unplaceable_stage_is_caught():
    values = {"workerGroups": {"gpu-small": {"enabled": False}}}
    rendered = hu.render(values)
    groups = [g["groupName"] for g in rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert groups == ["cpu", "gpu-large"]
    errors = hu.placement_errors(rendered.rayservice, rendered.app_args)
    assert {e.split()[1] for e in errors} == {"decoder", "image_encoder"}


# -- text-to-video and long clips -------------------------------------------------------------------


def test_text_to_image_stage_gets_its_gpu_and_pinning_resource(default):
    """TextToImage: a whole GPU per replica, pinned by `svd_text_to_image` to gpu-large, autoscaled."""
    from pipelines.registry import TEXT_TO_IMAGE

    args = default.app_args
    stage = args["stages"][TEXT_TO_IMAGE.config_key]
    assert stage["ray_actor_options"]["num_gpus"] == 1
    assert stage["ray_actor_options"]["resources"] == {"svd_text_to_image": 1}
    assert stage["max_ongoing_requests"] == 1
    assert stage["autoscaling"]["min_replicas"] <= stage["autoscaling"]["max_replicas"]
    assert stage["autoscaling"]["target_ongoing_requests"] == 1
    groups = hu.worker_groups(default.rayservice)
    hosts = [name for name, group in groups.items() if group["resources"].get("svd_text_to_image", 0) >= 1]
    assert hosts == ["gpu-large"] and groups["gpu-large"]["gpus"] >= 1
    model = args["text_to_image_model"]
    assert model["source"] == "stabilityai/stable-diffusion-xl-base-1.0" and model["dtype"] == "fp16"
    assert model["cache_dir"] == args["model"]["cache_dir"] == "/models"

    AppConfig = _app_config()
    config = AppConfig.model_validate(args)
    assert config.stages.for_stage(TEXT_TO_IMAGE).ray_actor_options.to_ray() == {
        "num_cpus": 2, "num_gpus": 1, "resources": {"svd_text_to_image": 1}}
    assert config.model_for(TEXT_TO_IMAGE) == config.text_to_image_model
    assert TEXT_TO_IMAGE in config.built_stages()


@pytest.mark.parametrize("off", [{"enabled": False}, None], ids=["enabled-false", "null"])
def test_disabling_text_to_image_renders_null(off):
    from pipelines.registry import TEXT_TO_IMAGE

    rendered = hu.render({"textToImageModel": off})
    args = rendered.app_args
    assert "text_to_image_model" in args and args["text_to_image_model"] is None
    assert "text_to_image_model: null" in rendered.rayservice["spec"]["serveConfigV2"]
    assert TEXT_TO_IMAGE.config_key not in args["stages"]  # nothing builds it: no stale options
    assert hu.placement_errors(rendered.rayservice, args) == []
    AppConfig = _app_config()
    config = AppConfig.model_validate(args)
    assert config.text_to_image_model is None
    assert TEXT_TO_IMAGE not in config.built_stages() and len(config.built_stages()) == 4
    # The tiny model's initContainer then writes only the tiny SVD.
    tiny = hu.render({"textToImageModel": off, "tinyModel": {"enabled": True}})
    assert tiny.app_args["text_to_image_model"] is None
    for _, template in hu.pod_templates(tiny.rayservice):
        (init,) = template["spec"]["initContainers"]
        assert "tiny-t2i" not in init["command"][-1]


def test_disabled_text_to_image_builds_no_deployment():
    from ray.serve._private.build_app import build_app as build_deployments  # pinned ray==2.60.0

    from serve.app import build_app

    args = hu.render({"textToImageModel": {"enabled": False}}).app_args
    names = {d.name for d in build_deployments(build_app(args), name="svd").deployments}
    assert names == {"Ingress", "JobRunner", "ImageEncoder", "Sampler", "Decoder", "VideoEncoder"}


def test_text_to_image_model_sections_map_to_app_config():
    values = {"textToImageModel": {"source": "s3://weights/sdxl-turbo", "dtype": "bf16",
                                   "variant": "none", "s3_endpoint_url": "http://minio.minio:9000",
                                   "s3_region": "eu-west-1"},
              "aws": {"existingSecret": "s3-creds"},
              "app": {"max_duration_s": 30, "max_segments": 16}}
    rendered = hu.render(values)
    args = rendered.app_args
    assert args["text_to_image_model"] == {"source": "s3://weights/sdxl-turbo", "dtype": "bf16", "device": "auto",
                                           "variant": "none", "s3_endpoint_url": "http://minio.minio:9000",
                                           "s3_region": "eu-west-1", "cache_dir": "/models"}
    assert (args["max_duration_s"], args["max_segments"]) == (30, 16)
    config = _app_config().model_validate(args)
    assert config.text_to_image_model.source == "s3://weights/sdxl-turbo" and config.max_segments == 16
    # The s3:// text-to-image weights use the same credentials as the video model's.
    for _, template in hu.pod_templates(rendered.rayservice):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    defaults = hu.render().app_args
    assert (defaults["max_duration_s"], defaults["max_segments"]) == (8, 8)


def test_text_to_image_on_its_own_worker_group():
    """The documented alternative: take `svd_text_to_image` off gpu-large and give it a group of its own."""
    own_group = copy.deepcopy(hu.load_values(hu.CHART_DIR / "values.yaml")["workerGroups"]["gpu-small"])
    own_group.update(rayResources={"svd_text_to_image": 1000}, minReplicas=1, maxReplicas=2,
                     nodeSelector={"svd-serve/node-pool": "gpu-t2i"})
    values = {"workerGroups": {"gpu-large": {"rayResources": {"svd_text_to_image": None}, "maxReplicas": 4},
                               "gpu-t2i": own_group}}
    rendered = hu.render(values)
    groups = hu.worker_groups(rendered.rayservice)
    assert groups["gpu-large"]["resources"] == {"svd_sampler": 1000}
    assert [n for n, g in groups.items() if "svd_text_to_image" in g["resources"]] == ["gpu-t2i"]
    assert hu.placement_errors(rendered.rayservice, rendered.app_args) == []
    assert capacity_errors(rendered.rayservice, rendered.app_args) == []
    assert hu.kuberay_errors(rendered.rayservice) == []


def test_notes_warn_about_a_pinning_resource_no_group_offers(rendered):
    assert "WARNING: stages." not in rendered.notes  # every shipped value set places every stage
    lost = hu.render({"workerGroups": {"gpu-large": {"rayResources": {"svd_text_to_image": None}}}})
    assert "stages.text_to_image requests the Ray resource svd_text_to_image" in lost.notes
    off = hu.render({"workerGroups": {"gpu-large": {"rayResources": {"svd_text_to_image": None}}},
                     "textToImageModel": {"enabled": False}})
    assert "WARNING: stages." not in off.notes  # a disabled stage needs no group


# -- typos, names, secrets --------------------------------------------------------------------------


@pytest.mark.parametrize("values, needle", [
    ({"workerGroup": {"gpu-large": {"gpus": 2}}}, "'workerGroup' not allowed"),
    ({"stages": {"sampler": {"numReplicas": 2}}}, "'numReplicas' not allowed"),
    ({"stages": {"samplr": {"num_replicas": 2}}}, "'samplr' not allowed"),
    ({"workerGroups": {"gpu-large": {"gpu": 2}}}, "'gpu' not allowed"),
    ({"stages": {"sampler": {"max_ongoing_requests": "one"}}}, "max_ongoing_requests"),
    ({"storage": {"bakend": "s3"}}, "'bakend' not allowed"),
    ({"jobStore": {"redis_url": "redis://:hunter2@redis:6379/1"}}, "redis_url"),
    ({"model": {"dtype": "float16"}}, "dtype"),
    ({"textToImageModel": {"sorce": "stabilityai/sdxl-turbo"}}, "'sorce' not allowed"),
    ({"textToImageModel": {"dtype": "float16"}}, "/textToImageModel/dtype"),
    ({"textToImageModel": {"s3_endpoint_url": "minio:9000"}}, "/textToImageModel/s3_endpoint_url"),
    ({"textToImageModel": {"enabled": "no"}}, "/textToImageModel/enabled"),
    ({"stages": {"text_to_image": {"ray_actor_options": {"num_gpu": 1}}}}, "'num_gpu' not allowed"),
    ({"app": {"max_duration_s": 120}}, "/app/max_duration_s"),
    ({"app": {"max_segments": 0}}, "/app/max_segments"),
    ({"stages": {"sampler": {"max_num_models_per_replica": 0}}}, "/stages/sampler/max_num_models_per_replica"),
    ({"stages": {"sampler": {"maxNumModelsPerReplica": 2}}}, "'maxNumModelsPerReplica' not allowed"),
    ({"modelCache": {"persistence": {"enable": True}}}, "'enable' not allowed"),
    ({"modelCache": {"persistence": {"accessModes": ["ReadWriteAll"]}}}, "/modelCache/persistence/accessModes/0"),
    ({"model": {"models": []}}, "'models' not allowed"),
    ({"app": {"model_id": "svd/xt/1.1"}}, "/app/model_id"),
], ids=["workerGroup", "numReplicas", "stage-name", "group-key", "type", "storage-key", "redis-url-password", "enum",
        "t2i-key", "t2i-dtype", "t2i-endpoint", "t2i-enabled", "t2i-stage-key", "max-duration", "max-segments",
        "max-models-min", "max-models-camel", "cache-persistence-key", "cache-access-mode", "models-misplaced", "model-id"])
def test_values_typos_are_rejected(values, needle):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(needle)):
        hu.render(values)
    assert any(needle in problem for problem in hu.lint_problems(hu.lint(values)))


@pytest.mark.parametrize("values, needle", [
    ({"stages": {"sampler": {"num_replicas": 2}}}, "set either num_replicas or autoscaling"),
    ({"jobStore": {"backend": "redis"}}, "redis.enabled or redis.external.address"),
    ({"workerGroups": {"cpu": {"replicas": 5}}}, "minReplicas <= replicas <= maxReplicas"),
    ({"tenants": {"content": "tenants:\n  acme:\n    key_hashes: [svd_rawkey123]\n"}}, "never raw keys"),
    ({"aws": {"accessKeyId": "AKIA"}}, "must be set together"),
])
def test_inconsistent_values_fail_with_a_clear_message(values, needle):
    with pytest.raises(helm_python.HelmError, match=re.escape(needle)):
        hu.render(values)


def test_fixed_replicas_by_nulling_autoscaling():
    rendered = hu.render({"stages": {"sampler": {"autoscaling": None, "num_replicas": 2}}})
    sampler = rendered.app_args["stages"]["sampler"]
    assert sampler["num_replicas"] == 2 and "autoscaling" not in sampler


@requires_crds
def test_long_release_name_fits_kuberay():
    long_a = "a-very-long-release-name-for-svd-serve-tenant-alpha-1"  # 53: Helm's maximum
    long_b = "a-very-long-release-name-for-svd-serve-tenant-alpha-2"
    assert len(long_a) == 53
    names = set()
    for release in (long_a, long_b):
        rendered = hu.render(release=release, values={"ingress": {"enabled": True}, "redis": {"enabled": True}})
        rayservice = rendered.rayservice
        name = rayservice["metadata"]["name"]
        assert len(name) <= hu.MAX_RAYSERVICE_NAME and hu.DNS1035.match(name)
        assert hu.kuberay_errors(rayservice) == []
        assert len(rayservice["spec"]["serveService"]["metadata"]["name"]) <= 63
        for doc in rendered.docs:
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        names.add(name)
    assert len(names) == 2, "two long release names with a common prefix must not collide"
    assert hu.render(release="svd").rayservice["metadata"]["name"] == "svd-svd-serve"


SENTINELS = {
    "hf": "hf_SENTINELtokenDoNotLeak0123456789",
    "aws_id": "AKIASENTINELDONOTLEAK",
    "aws_secret": "sentinel/aws+secret/DoNotLeak0123456789abcd",
    "redis": "sentinel-redis-password-DoNotLeak",
}


def test_no_secret_in_plain_text():
    digest = hashlib.sha256(b"svd_sentinel").hexdigest()
    values = {
        "huggingface": {"token": SENTINELS["hf"]},
        "aws": {"accessKeyId": SENTINELS["aws_id"], "secretAccessKey": SENTINELS["aws_secret"]},
        "redis": {"enabled": True, "auth": {"password": SENTINELS["redis"]}},
        "jobStore": {"backend": "redis"},
        "gcsFaultTolerance": {"enabled": True},
        "tenants": {"content": f"tenants:\n  acme:\n    key_hashes: ['sha256:{digest}']\n"},
        "storage": {"backend": "s3", "bucket": "b"},
    }
    rendered = hu.render(values)
    secrets = rendered.of_kind("Secret")
    stored = {base64.b64decode(v).decode() for s in secrets for v in s.get("data", {}).values()}
    assert set(SENTINELS.values()) <= stored, "each secret value lands in a Secret"
    for doc in rendered.docs:
        if doc["kind"] == "Secret":
            assert "stringData" not in doc
            continue
        text = yaml.safe_dump(doc)
        for name, sentinel in SENTINELS.items():
            assert sentinel not in text, f"{name} secret appears in plain text in {doc['kind']}"
    assert not rendered.of_kind("ConfigMap") or all(
        s not in yaml.safe_dump(c) for c in rendered.of_kind("ConfigMap") for s in SENTINELS.values()
    )
    # Secret-ish environment variables are always references, never literal values.
    for group, template in hu.pod_templates(rendered.rayservice):
        for container in _containers(template):
            for env in container.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"], (group, env)


# -- wiring -----------------------------------------------------------------------------------------


def test_ingress_points_at_the_serve_service():
    rendered = hu.render({"ingress": {"enabled": True, "className": "nginx"}})
    ingress = rendered.one("Ingress")
    serve_service = rendered.rayservice["spec"]["serveService"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == serve_service["metadata"]["name"] == f"{rendered.rayservice['metadata']['name']}-serve-svc"
    assert backend["port"]["name"] == "serve"
    assert {"name": "serve", "port": 8000} in [{k: p[k] for k in ("name", "port")} for p in serve_service["spec"]["ports"]]
    head = rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]


def test_helm_test_pod_checks_readyz(default):
    (pod,) = [d for d in default.of_kind("Pod")]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = pod["spec"]["containers"][0]["args"][-1]
    assert url == f"http://{default.rayservice['spec']['serveService']['metadata']['name']}:8000/readyz"


def test_pdb_selects_the_ray_pods(default):
    selector = default.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    for _, template in hu.pod_templates(default.rayservice):
        assert selector.items() <= template["metadata"]["labels"].items()


def test_ha_values_wire_redis_everywhere():
    rendered = hu.render_file(hu.CI_VALUES_DIR / "ha-values.yaml")
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    redis_service = rendered.one("Service", f"{rendered.rayservice['metadata']['name']}-redis")
    assert ft["redisAddress"] == f"{redis_service['metadata']['name']}:6379"
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    secret = rendered.one("Secret", ref["name"])
    assert ref["key"] in secret["data"]
    statefulset = rendered.one("StatefulSet")
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == ref
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "REDIS_PASSWORD" not in {e["name"] for e in head.get("env", [])}  # KubeRay injects it
    for group in cluster["workerGroupSpecs"]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref, group["groupName"]
    args = rendered.app_args
    assert args["job_store"]["backend"] == "redis"
    assert args["job_store"]["redis_url"] == f"redis://{redis_service['metadata']['name']}:6379/1"
    assert args["storage"]["backend"] == "s3"
    assert args["stages"]["ingress"]["autoscaling"]["max_replicas"] > 1


def test_tenants_secret_is_mounted_and_passed(rendered):
    args = rendered.app_args
    tenants_file = args.get("auth", {}).get("tenants_file")
    if tenants_file is None:
        return  # no tenants configured in this value set
    mount_dir, key = tenants_file.rsplit("/", 1)
    for group, template in hu.pod_templates(rendered.rayservice):
        container = template["spec"]["containers"][0]
        if group == "head":
            # Not on the head: the Serve driver there resolves symlinks in paths (Path.resolve), which
            # would hand the workers the Secret's pod-specific ..<timestamp> directory.
            assert mount_dir not in {m["mountPath"] for m in container["volumeMounts"]}
            assert "SVD_SERVE_TENANTS_FILE" not in {e["name"] for e in container["env"]}
            continue
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_dir)
        assert "subPath" not in mount, "a subPath mount would never see Secret updates"
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["items"] == [{"key": key, "path": key}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SVD_SERVE_TENANTS_FILE"] == tenants_file, group
    inline = [s for s in rendered.of_kind("Secret") if key in s.get("data", {})]
    for secret in inline:
        content = yaml.safe_load(base64.b64decode(secret["data"][key]))
        for tenant in content["tenants"].values():
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in tenant["key_hashes"])


def test_model_sources_and_credentials():
    rendered = hu.render_file(hu.CI_VALUES_DIR / "gpu-production-values.yaml")
    service_account = rendered.one("ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in service_account["metadata"]["annotations"]
    for group, template in hu.pod_templates(rendered.rayservice):
        spec = template["spec"]
        assert spec["serviceAccountName"] == service_account["metadata"]["name"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "svd-serve-hf-token", "key": "HF_TOKEN"}
        assert "AWS_ACCESS_KEY_ID" not in env  # IRSA: no static keys
        cache = next(v for v in spec["volumes"] if v["name"] == "model-cache")
        assert cache["persistentVolumeClaim"]["claimName"] == "svd-serve-model-cache"
    # ...the chart's own shared claim (modelCache.persistence).
    claim = rendered.one("PersistentVolumeClaim", "svd-serve-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "efs-sc"
    assert rendered.app_args["job_store"]["redis_url"].startswith("rediss://")
    assert rendered.app_args["model"]["cache_dir"] == "/models"

    s3 = hu.render({"model": {"source": "s3://weights/svd-xt"}, "aws": {"existingSecret": "s3-creds"}})
    assert s3.app_args["model"]["source"] == "s3://weights/svd-xt"
    worker = s3.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"


def test_cpu_smoke_runs_the_tiny_model_without_gpus():
    rendered = hu.render_file(hu.CI_VALUES_DIR / "cpu-smoke-values.yaml")
    args = rendered.app_args
    assert args["model"]["device"] == "cpu" and args["model"]["source"] == "/models/tiny-svd"
    # Text-to-video on CPU too, with the tiny text-to-image model the initContainer writes.
    t2i = args["text_to_image_model"]
    assert (t2i["device"], t2i["dtype"], t2i["source"]) == ("cpu", "fp32", "/models/tiny-t2i")
    assert "text_to_image" in args["stages"]
    assert all(s["ray_actor_options"].get("num_gpus", 0) == 0 for s in args["stages"].values())
    for group, template in hu.pod_templates(rendered.rayservice):
        (init,) = template["spec"]["initContainers"]
        assert "svd-serve tiny-model /models/tiny-svd" in init["command"][-1]
        assert "svd-serve tiny-model --text-to-image /models/tiny-t2i" in init["command"][-1]
        for container in _containers(template):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), group


# -- model zoo and model cache ---------------------------------------------------------------------

ZOO = [
    {"id": "svd-xt", "source": "stabilityai/stable-video-diffusion-img2vid-xt-1-1", "preload": True},
    {"id": "acme/svd-anime", "base": "svd-xt", "unet": "s3://models/svd-anime/unet.safetensors",
     "defaults": {"motion_bucket_id": 160, "num_inference_steps": 20}},
    {"id": "acme/svd-slowmo", "base": "svd-xt", "lora": "s3://models/loras/slowmo", "lora_scale": 0.8,
     "variant": None, "revision": None},
    {"id": "globex/svd-product", "base": "svd-xt", "lora": "/models/loras/product", "visibility": "private",
     "tenant": "globex", "limits": {"max_num_frames": 14, "max_pixels": 589824, "max_long_side": 1024},
     "description": "Globex only"},
    {"id": "sdxl-turbo", "kind": "text-to-image", "source": "stabilityai/sdxl-turbo", "dtype": "fp16"},
]


def _model_entry():
    try:
        from serve.zoo.entry import ModelEntry
    except ImportError as error:
        pytest.skip(f"serve.zoo.entry.ModelEntry is not importable yet: {error}")
    return ModelEntry


def test_models_render_into_the_app_args():
    """`models` goes to args.models as given (nulls included), only when it has entries; each entry is a
    valid ModelEntry and the whole args a valid AppConfig."""
    assert "models" not in hu.render().app_args
    assert "models" not in hu.render({"models": []}).app_args
    rendered = hu.render({"models": ZOO, "stages": {"sampler": {"max_num_models_per_replica": 3}}})
    args = rendered.app_args
    assert args["models"] == ZOO
    assert hu.placement_errors(rendered.rayservice, args) == []
    ModelEntry = _model_entry()
    entries = [ModelEntry.model_validate(entry) for entry in args["models"]]
    assert [e.id for e in entries if e.preload] == ["svd-xt"]
    assert [e.id for e in entries if not e.visible_to("acme")] == ["globex/svd-product"]
    config = _app_config().model_validate(args)
    assert [m.id for m in config.models] == [e["id"] for e in ZOO]
    assert config.stages.sampler.max_num_models_per_replica == 3
    # app.model_id names the default model; null (the default) is left out.
    assert "model_id" not in args
    named = hu.render({"app": {"model_id": "svd-xt"}, "models": [{**ZOO[1], "base": "svd-xt"}]}).app_args
    assert named["model_id"] == "svd-xt"
    assert _app_config().model_validate(named).resolved_model_id() == "svd-xt"


def test_max_num_models_per_replica_per_stage():
    """Set per stage under `stages.<stage>`; null (the default) leaves it out: the application derives it."""
    default = hu.render().app_args["stages"]
    assert not any("max_num_models_per_replica" in stage for stage in default.values())
    values = {"stages": {"sampler": {"max_num_models_per_replica": 2}, "image_encoder": {"max_num_models_per_replica": 6},
                         "decoder": {"max_num_models_per_replica": 4}, "text_to_image": {"max_num_models_per_replica": 1}}}
    stages = hu.render(values).app_args["stages"]
    assert {name: stage.get("max_num_models_per_replica") for name, stage in stages.items()} == {
        "sampler": 2, "image_encoder": 6, "decoder": 4, "text_to_image": 1,
        "video_encoder": None, "ingress": None, "runner": None}


def test_production_zoo():
    rendered = hu.render_file(hu.CI_VALUES_DIR / "gpu-production-values.yaml")
    args = rendered.app_args
    assert args["model_id"] == "svd-xt"  # the default model, base of the fine-tunes
    models = {m["id"]: m for m in args["models"]}
    assert len(models) == 4
    assert [i for i, m in models.items() if m.get("preload")] == ["svd"]
    assert [i for i, m in models.items() if m.get("lora")] == ["acme/svd-slowmo", "globex/svd-product"]
    assert [i for i, m in models.items() if m.get("unet")] == ["acme/svd-anime"]
    assert models["globex/svd-product"]["visibility"] == "private" and models["globex/svd-product"]["tenant"] == "globex"
    assert all(m.get("base") in (None, "svd-xt") for m in models.values())
    assert args["stages"]["sampler"]["max_num_models_per_replica"] == 3
    config = _app_config().model_validate(args)
    assert config.resolved_model_id() == "svd-xt" and len(config.models) == 4


# Entries the schema rejects, with the path/message it names. ModelEntry must reject each one too.
BAD_ENTRIES = {
    "id-pattern": ({"id": "-svd", "source": "x"}, "/models/0/id"),
    "id-two-slashes": ({"id": "a/b/c", "source": "x"}, "/models/0/id"),
    "id-too-long": ({"id": "m" * 129, "source": "x"}, "/models/0/id"),
    "id-missing": ({"source": "x"}, "missing property 'id'"),
    "unknown-key": ({"id": "m", "source": "x", "sorce": "y"}, "'sorce' not allowed"),
    "private-without-tenant": ({"id": "m", "source": "x", "visibility": "private"}, "missing property 'tenant'"),
    "private-null-tenant": ({"id": "m", "source": "x", "visibility": "private", "tenant": None}, "/models/0/tenant"),
    "public-with-tenant": ({"id": "m", "source": "x", "tenant": "acme"}, "/models/0/tenant"),
    "neither-source-nor-base": ({"id": "m"}, "missing property 'source'"),
    "source-and-base": ({"id": "m", "source": "x", "base": "svd-xt", "unet": "u"}, "/models/0/source"),
    "base-without-weights": ({"id": "m", "base": "svd-xt"}, "missing property 'lora'"),
    "t2i-fine-tune": ({"id": "m", "kind": "text-to-image", "base": "b", "lora": "l"}, "/models/0/base"),
    "kind": ({"id": "m", "source": "x", "kind": "video"}, "/models/0/kind"),
    "lora-scale-zero": ({"id": "m", "source": "x", "lora_scale": 0}, "/models/0/lora_scale"),
    "lora-scale-high": ({"id": "m", "source": "x", "lora_scale": 4.5}, "/models/0/lora_scale"),
    "dtype": ({"id": "m", "source": "x", "dtype": "float16"}, "/models/0/dtype"),
    "fine-tune-dtype": ({"id": "m", "base": "svd-xt", "lora": "l", "dtype": "bf16"}, "/models/0/dtype"),
    "variant": ({"id": "m", "source": "x", "variant": "fp32"}, "/models/0/variant"),
    "visibility": ({"id": "m", "source": "x", "visibility": "secret"}, "/models/0/visibility"),
    "defaults-key": ({"id": "m", "source": "x", "defaults": {"seed": 1}}, "'seed' not allowed"),
    "defaults-range": ({"id": "m", "source": "x", "defaults": {"motion_bucket_id": 300}}, "motion_bucket_id"),
    "limits-key": ({"id": "m", "source": "x", "limits": {"max_frames": 14}}, "'max_frames' not allowed"),
    "limits-frames": ({"id": "m", "source": "x", "limits": {"max_num_frames": 26}}, "max_num_frames"),
    "empty-source": ({"id": "m", "source": ""}, "/models/0/source"),
}


@pytest.mark.parametrize("entry, needle", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_bad_model_entries_are_rejected_like_the_app_does(entry, needle):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(needle)):
        hu.render({"models": [entry]})
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # the schema is no stricter than the application
        _model_entry().model_validate(entry)


@pytest.mark.parametrize("models, needle", [
    ([ZOO[0], {**ZOO[1], "id": "svd-xt"}], 'the id "svd-xt" is used twice'),
    ([ZOO[4], {"id": "m", "base": "sdxl-turbo", "lora": "l"}], "a fine-tune's base must be image-to-video"),
], ids=["duplicate-id", "text-to-image-base"])
def test_inconsistent_zoo_fails_with_a_clear_message(models, needle):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(needle)):
        hu.render({"models": models})


def test_every_ray_container_gets_the_model_cache(rendered):
    """Every Ray container (head included, for `svd-serve models add`) mounts the cache where the app's
    cache_dir and SVD_SERVE_CACHE_DIR point."""
    args = rendered.app_args
    cache_dir = args["model"]["cache_dir"]
    for group, template in hu.pod_templates(rendered.rayservice):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        container = template["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
        assert mount["mountPath"] == cache_dir and "subPath" not in mount, group
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SVD_SERVE_CACHE_DIR"] == cache_dir, group
        # Serve's proxy answers 503, not 404, while the application starts (serve/api/startup.py).
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve.api.startup:proxy_middlewares", group
        assert env["HF_HOME"] == f"{cache_dir}/huggingface", group
        claim = volumes["model-cache"].get("persistentVolumeClaim", {}).get("claimName")
        if claim and rendered.of_kind("PersistentVolumeClaim"):
            rendered.one("PersistentVolumeClaim", claim)


@requires_crds
def test_model_cache_volume_choices():
    # Default: an emptyDir per pod, no claim.
    default = hu.render()
    assert not default.of_kind("PersistentVolumeClaim")
    for _, template in hu.pod_templates(default.rayservice):
        cache = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        assert cache["emptyDir"]["sizeLimit"] == "40Gi"

    # The chart's own claim, shared by every pod; the RayService still validates against KubeRay's CRD.
    values = {"modelCache": {"mountPath": "/models-cache", "persistence": {
        "enabled": True, "size": "300Gi", "storageClassName": "filestore",
        "annotations": {"helm.sh/resource-policy": "keep"}}}, "models": ZOO[:2]}
    rendered = hu.render(values, release="zoo")
    claim = rendered.one("PersistentVolumeClaim")
    hu.k8s_validate(claim)
    assert claim["metadata"]["name"] == "zoo-svd-serve-model-cache"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "filestore",
                             "resources": {"requests": {"storage": "300Gi"}}}
    assert rendered.app_args["model"]["cache_dir"] == rendered.app_args["text_to_image_model"]["cache_dir"] == "/models-cache"
    templates = list(hu.pod_templates(rendered.rayservice))
    assert len(templates) == 4  # head + three worker groups
    for group, template in templates:
        cache = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "zoo-svd-serve-model-cache"}}
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SVD_SERVE_CACHE_DIR"] == "/models-cache" and env["HF_HOME"] == "/models-cache/huggingface"
        assert {"name": "model-cache", "mountPath": "/models-cache"} in container["volumeMounts"]
        hu.k8s_validate(hu.as_pod(f"ray-{group}", template))
    schema = hu.crd_schema()
    assert hu.crd_errors(rendered.rayservice, schema) == []
    assert hu.unknown_fields(rayservice := rendered.rayservice, schema) == []
    assert hu.kuberay_errors(rayservice) == []
    assert "ReadWriteMany" not in rendered.notes

    # An existing claim wins over the chart's own: no claim is created.
    existing = hu.render({"modelCache": {"existingClaim": "shared-models", "persistence": {"enabled": True}}})
    assert not existing.of_kind("PersistentVolumeClaim")
    for _, template in hu.pod_templates(existing.rayservice):
        cache = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        assert cache["persistentVolumeClaim"]["claimName"] == "shared-models"

    # A ReadWriteOnce claim only works on one node: NOTES.txt says so.
    rwo = hu.render({"modelCache": {"persistence": {"enabled": True, "accessModes": ["ReadWriteOnce"]}}})
    assert "modelCache.persistence.accessModes has no ReadWriteMany" in rwo.notes


def test_tiny_model_lands_on_the_shared_cache():
    """The CPU smoke test's tiny models are written into the cache volume, so a shared claim serves them too."""
    rendered = hu.render({**hu.load_values(hu.CI_VALUES_DIR / "cpu-smoke-values.yaml"),
                          "modelCache": {"persistence": {"enabled": True, "accessModes": ["ReadWriteOnce"]}}})
    assert rendered.app_args["model"]["source"] == "/models/tiny-svd"
    for _, template in hu.pod_templates(rendered.rayservice):
        (init,) = template["spec"]["initContainers"]
        assert {"name": "model-cache", "mountPath": "/models"} in init["volumeMounts"]
        cache = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        assert cache["persistentVolumeClaim"]["claimName"] == "svd-serve-model-cache"


# -- plain manifests --------------------------------------------------------------------------------


def test_plain_manifests_are_in_sync():
    expected = hu.render_manifests_text()
    current = hu.MANIFESTS_FILE.read_text() if hu.MANIFESTS_FILE.exists() else ""
    assert current == expected, "k8s/manifests/svd-serve.yaml is stale: run python -m tests.helm_utils render-manifests"
    docs = [d for d in yaml.safe_load_all(current) if d]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "PodDisruptionBudget", "RayService"}
    assert not any("helm.sh/hook" in (d["metadata"].get("annotations") or {}) for d in docs)
