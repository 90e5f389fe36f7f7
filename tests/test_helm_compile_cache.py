"""The Helm chart's side of compiled stages: the per-stage acceleration options, the compile cache
(`compileCache`) and the warm-cache Jobs that fill it before a rollout.

Rendered with Helm's own Go SDK (tests/helm_utils.py); checked against the application's own code:
serve.config (the args the chart renders), pipelines.acceleration.options (the schema's enums and
bounds) and serve/warm_cache.py (its argument parser parses the Jobs' command, and its stage
selection accepts the Jobs' app config).
"""

from __future__ import annotations

import argparse
import base64
import copy
import enum
import json
import re
import typing

import pytest
import yaml

try:  # `tests` is a namespace package when the repository root is on sys.path
    from tests import helm_utils as hu
except ImportError:  # pytest's rootdir-relative import puts tests/ itself on sys.path
    import helm_utils as hu

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')")

from pydantic import ValidationError  # noqa: E402

from pipelines.acceleration.options import LowVramOptions, StageAcceleration, WarmupShape  # noqa: E402
from serve.config import AppConfig  # noqa: E402
from serve.config.deployments import DeploymentConfig, StagesConfig  # noqa: E402

SCHEMA = json.loads((hu.CHART_DIR / "values.schema.json").read_text())
PRODUCTION = hu.CI_VALUES_DIR / "gpu-production-values.yaml"
SHAPE = {"width": 1024, "height": 576, "num_frames": 25}

# The production values' objects: pre-created Secrets, an existing claim, no chart ServiceAccount,
# so nothing the Jobs need is created by the release and pre-install can stay pre-install.
PRECREATED = {"serviceAccount": {"create": False, "name": "svd-serve-ray"},
              "modelCache": {"existingClaim": "shared-models"},
              "huggingface": {"existingSecret": "hf"}, "aws": {"existingSecret": "s3-creds"}}


def compiled(**sections):
    """Values with the Sampler and the decoder compiled, the compile cache on and the warm Jobs, with
    nothing the Jobs need created by the release; ``sections`` replace whole top-level sections."""
    values = {"stages": {"sampler": {"acceleration": {"compile": "default"}, "warmup_shapes": [SHAPE]},
                         "decoder": {"acceleration": {"compile": "max-autotune-no-cudagraphs"}}},
              "compileCache": {"enabled": True, "warmJob": {"enabled": True}}, **copy.deepcopy(PRECREATED)}
    return {**values, **sections}


def jobs_by_group(rendered: hu.Rendered) -> dict[str, dict]:
    return {job["metadata"]["labels"]["svd-serve/worker-group"]: job for job in rendered.of_kind("Job")}


def warm_cache_parser() -> argparse.ArgumentParser:
    """`svd-serve warm-cache`'s own parser (serve/warm_cache.py register())."""
    from serve.warm_cache import register

    parser = argparse.ArgumentParser(prog="svd-serve")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def container(job: dict) -> dict:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def worker_template(rendered: hu.Rendered, group: str) -> dict:
    return dict(hu.pod_templates(rendered.rayservice))[group]


# -- the stage options ------------------------------------------------------------------------------


def test_defaults_render_no_compile_options_and_no_jobs():
    """Everything off by default: the documented per-stage keys are null and leave the args untouched."""
    rendered = hu.render()
    assert not rendered.of_kind("Job") and not rendered.of_kind("ConfigMap")
    for name, stage in rendered.app_args["stages"].items():
        assert not {"acceleration", "warmup_shapes", "low_vram", "h264_codec", "max_surge_percent"} & set(stage), name
    assert "compile cache" not in rendered.notes


def test_stage_options_reach_the_app_args():
    values = {"stages": {
        "sampler": {"acceleration": {"compile": "default", "scope": "regional", "shape_policy": "dynamic",
                                     "attention": "cudnn", "channels_last": True, "fp8": True, "warmup": False},
                    "warmup_shapes": [SHAPE, {**SHAPE, "num_frames": 14}],
                    "low_vram": {"feed_forward_chunking": True, "split_guidance_batch": True},
                    "max_surge_percent": 100},
        "decoder": {"low_vram": {"decode_chunk_size": 8}},
        "image_encoder": {"acceleration": {"attention": "math"}},
        "video_encoder": {"h264_codec": "libx264"}}}
    args = hu.render(values).app_args
    config = AppConfig.model_validate(args)
    sampler = config.stages.sampler
    assert sampler.acceleration.compiled and sampler.acceleration.scope.value == "regional"
    assert sampler.acceleration.fp8 and not sampler.acceleration.warmup and sampler.acceleration.cache_dir is None
    assert [shape.label() for shape in sampler.warmup_shapes] == ["1024x576x25", "1024x576x14"]
    assert sampler.low_vram.enabled == ("feed_forward_chunking", "split_guidance_batch")
    assert sampler.max_surge_percent == 100
    assert config.stages.decoder.low_vram.decode_chunk_size == 8
    assert config.stages.image_encoder.acceleration.attention.value == "math"
    assert config.stages.video_encoder.h264_codec == "libx264"


def _schema_constraints(prop: dict) -> dict:
    return {key: prop[key] for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
            if key in prop}


def _model_constraints(field) -> dict:
    found = {}
    for item in field.metadata:
        for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum"),
                          ("lt", "exclusiveMaximum"), ("multiple_of", "multipleOf")):
            if getattr(item, attr, None) is not None:
                found[key] = getattr(item, attr)
    return found


def _model_choices(annotation) -> list | None:
    """The allowed values of an Enum or Literal field (None for other types)."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [member.value for member in arg]
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


@pytest.mark.parametrize("definition, model", [
    ("stageAcceleration", StageAcceleration), ("warmupShape", WarmupShape), ("lowVramOptions", LowVramOptions),
    ("stage", DeploymentConfig)], ids=["acceleration", "warmup_shape", "low_vram", "stage"])
def test_schema_mirrors_the_models_enums_bounds_and_required_fields(definition, model):
    """Every field of the pydantic model is in the schema with the same enum, bounds and requiredness
    (the chart may only add null, which Helm drops before the app sees it)."""
    schema = SCHEMA["definitions"][definition]
    assert set(schema["properties"]) == set(model.model_fields)
    for name, field in model.model_fields.items():
        prop = schema["properties"][name]
        choices = _model_choices(field.annotation)
        if choices is not None:
            assert [c for c in prop["enum"] if c is not None] == choices, name
        if "$ref" not in prop and "oneOf" not in prop and "items" not in prop:
            assert _schema_constraints(prop) == _model_constraints(field), name
        if definition != "stage":  # every DeploymentConfig field has a default
            assert (name in schema.get("required", [])) == field.is_required(), name


def test_schema_only_narrows_cpu_offload_for_deployments():
    """LowVramOptions allows cpu_offload (CLI, demo); a deployment never does, so the chart accepts false only."""
    assert SCHEMA["definitions"]["lowVramOptions"]["properties"]["cpu_offload"]["const"] is False
    with pytest.raises(ValidationError, match="cpu_offload is for single-process runs"):
        DeploymentConfig.model_validate({"low_vram": {"cpu_offload": True}})


# Stage values the schema rejects, with the path it names; the application rejects each one too.
BAD_STAGE_VALUES = {
    "compile-mode": ({"sampler": {"acceleration": {"compile": "fast"}}}, "/stages/sampler/acceleration/compile"),
    "scope": ({"sampler": {"acceleration": {"compile": "default", "scope": "blocks"}}}, "acceleration/scope"),
    "attention": ({"decoder": {"acceleration": {"attention": "xformers"}}}, "/stages/decoder/acceleration/attention"),
    "acceleration-key": ({"sampler": {"acceleration": {"mode": "default"}}}, "'mode' not allowed"),
    "regional-eager": ({"sampler": {"acceleration": {"scope": "regional"}}}, "/stages/sampler/acceleration/scope"),
    "dynamic-eager": ({"sampler": {"acceleration": {"compile": "none", "shape_policy": "dynamic"}}},
                      "/stages/sampler/acceleration/shape_policy"),
    "aot-eager": ({"sampler": {"acceleration": {"engine": "aot"}}}, "missing property 'compile'"),
    "aot-cuda-graphs": ({"sampler": {"acceleration": {"engine": "aot", "compile": "reduce-overhead"}}},
                        "/stages/sampler/acceleration/compile"),
    "aot-regional": ({"decoder": {"acceleration": {"engine": "aot", "compile": "default", "scope": "regional"}}},
                     "/stages/decoder/acceleration/scope"),
    "aot-no-warmup": ({"decoder": {"acceleration": {"engine": "aot", "compile": "default", "warmup": False}}},
                      "/stages/decoder/acceleration/warmup"),
    "cache-dir-eager": ({"sampler": {"acceleration": {"cache_dir": "/models/cc"}}},
                        "/stages/sampler/acceleration/cache_dir"),
    "cache-dir-empty": ({"sampler": {"acceleration": {"compile": "default", "cache_dir": " "}}},
                        "/stages/sampler/acceleration/cache_dir"),
    "shape-not-multiple-of-8": ({"sampler": {"acceleration": {"compile": "default"},
                                             "warmup_shapes": [{**SHAPE, "width": 1020}]}},
                                "/stages/sampler/warmup_shapes/0/width"),
    "shape-too-small": ({"sampler": {"acceleration": {"compile": "default"},
                                     "warmup_shapes": [{**SHAPE, "height": 56}]}}, "/stages/sampler/warmup_shapes/0/height"),
    "shape-frames": ({"sampler": {"acceleration": {"compile": "default"}, "warmup_shapes": [{**SHAPE, "num_frames": 0}]}},
                     "/stages/sampler/warmup_shapes/0/num_frames"),
    "shape-chunk": ({"decoder": {"acceleration": {"compile": "default"},
                                 "warmup_shapes": [{**SHAPE, "decode_chunk_size": 129}]}},
                    "/stages/decoder/warmup_shapes/0/decode_chunk_size"),
    "shape-missing-frames": ({"sampler": {"acceleration": {"compile": "default"},
                                          "warmup_shapes": [{"width": 1024, "height": 576}]}}, "num_frames"),
    "shapes-without-compile": ({"sampler": {"warmup_shapes": [SHAPE]}}, "missing property 'acceleration'"),
    "shapes-eager": ({"sampler": {"acceleration": {"compile": "none"}, "warmup_shapes": [SHAPE]}},
                     "/stages/sampler/acceleration/compile"),
    "low-vram-chunk": ({"decoder": {"low_vram": {"decode_chunk_size": 65}}}, "/stages/decoder/low_vram/decode_chunk_size"),
    "low-vram-offload": ({"sampler": {"low_vram": {"cpu_offload": True}}}, "/stages/sampler/low_vram/cpu_offload"),
    "low-vram-key": ({"sampler": {"low_vram": {"attention_slicing": True}}}, "'attention_slicing' not allowed"),
    "codec": ({"video_encoder": {"h264_codec": "nvenc"}}, "/stages/video_encoder/h264_codec"),
    "surge": ({"ingress": {"max_surge_percent": 101}}, "/stages/ingress/max_surge_percent"),
}


@pytest.mark.parametrize("stages, needle", BAD_STAGE_VALUES.values(), ids=BAD_STAGE_VALUES.keys())
def test_bad_stage_options_are_rejected_like_the_app_does(stages, needle):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(needle)):
        hu.render({"stages": stages})
    with pytest.raises((ValidationError, ValueError)):  # the schema is no stricter than the application
        StagesConfig.model_validate(stages)


MISPLACED = {
    "acceleration-on-video-encoder": ("video_encoder", {"acceleration": {"compile": "default"}}),
    "acceleration-on-text-to-image": ("text_to_image", {"acceleration": {"attention": "sdpa"}}),
    "warmup-on-ingress": ("ingress", {"acceleration": {"compile": "default"}, "warmup_shapes": [SHAPE]}),
    "low-vram-on-image-encoder": ("image_encoder", {"low_vram": {"feed_forward_chunking": True}}),
    "codec-on-sampler": ("sampler", {"h264_codec": "libx264"}),
}


@pytest.mark.parametrize("stage, options", MISPLACED.values(), ids=MISPLACED.keys())
def test_misplaced_stage_options_fail_with_the_apps_message(stage, options):
    with pytest.raises(ValueError) as app_error:
        StagesConfig.model_validate({stage: options})
    message = re.search(r"stages\.\S+ applies only to [a-z_]+(?:, [a-z_]+)*", str(app_error.value)).group(0)
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        hu.render({"stages": {stage: options}})


def test_default_option_values_are_no_placement():
    """As in the application: a default value (h264_codec auto, empty shapes) may sit on any stage."""
    values = {"stages": {"sampler": {"h264_codec": "auto"}, "runner": {"warmup_shapes": []}}}
    AppConfig.model_validate(hu.render(values).app_args)


# -- the compile cache ------------------------------------------------------------------------------


def test_cache_dir_goes_to_compiled_stages_without_their_own():
    values = {"stages": {"sampler": {"acceleration": {"compile": "default"}},
                         "decoder": {"acceleration": {"compile": "default", "cache_dir": "s3://own-bucket/decoder"},
                                     "warmup_shapes": [{"width": 1024, "height": 576, "num_frames": 25,
                                                        "decode_chunk_size": 8}]},
                         "image_encoder": {"acceleration": {"compile": "none", "attention": "sdpa"}}},
              "compileCache": {"enabled": True}, "modelCache": {"mountPath": "/cache/"}}
    stages = hu.render(values).app_args["stages"]
    assert stages["sampler"]["acceleration"]["cache_dir"] == "/cache/compile-cache"
    assert stages["decoder"]["acceleration"]["cache_dir"] == "s3://own-bucket/decoder"  # its own wins
    assert "cache_dir" not in stages["image_encoder"]["acceleration"]  # eager: the app refuses a cache_dir
    assert not any("acceleration" in stages[name] for name in ("video_encoder", "text_to_image", "ingress", "runner"))
    config = AppConfig.model_validate({"stages": stages, "model": {"source": "x"}})
    assert config.stages.sampler.acceleration.cache_dir == "/cache/compile-cache"

    on_s3 = hu.render({**values, "compileCache": {"enabled": True, "url": "s3://compile-cache/svd-serve"}})
    assert on_s3.app_args["stages"]["sampler"]["acceleration"]["cache_dir"] == "s3://compile-cache/svd-serve"
    deeper = hu.render({**values, "compileCache": {"enabled": True, "subPath": "torch/compile"}})
    assert deeper.app_args["stages"]["sampler"]["acceleration"]["cache_dir"] == "/cache/torch/compile"
    off = hu.render({**values, "compileCache": {"enabled": False}})
    assert "cache_dir" not in off.app_args["stages"]["sampler"]["acceleration"]


def test_cache_on_an_emptydir_is_noted():
    values = {"stages": {"sampler": {"acceleration": {"compile": "default"}}}, "compileCache": {"enabled": True}}
    assert "survives only within a pod" in hu.render(values).notes
    shared = hu.render({**values, "modelCache": {"persistence": {"enabled": True}}})
    assert "survives only within a pod" not in shared.notes and "compile cache /models/compile-cache" in shared.notes
    nothing = hu.render({"compileCache": {"enabled": True}})
    assert "nothing uses the compile cache" in nothing.notes


# -- the warm-cache Jobs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production() -> hu.Rendered:
    return hu.render_file(PRODUCTION)


def test_production_values_compile_the_sampler_and_decoder(production):
    stages = production.app_args["stages"]
    engines = {"sampler": {}, "decoder": {"engine": "aot"}}  # the decoder's replicas load packages
    for name in ("sampler", "decoder"):
        assert stages[name]["acceleration"] == {"compile": "default", "cache_dir": "/models/compile-cache",
                                                **engines[name]}, name
        assert len(stages[name]["warmup_shapes"]) == 2
    config = AppConfig.model_validate(production.app_args)
    assert config.stages.decoder.low_vram.decode_chunk_size == 8
    assert set(jobs_by_group(production)) == {"gpu-large", "gpu-small"}


def test_jobs_run_warm_cache_on_the_node_kind_of_their_stages(production, tmp_path):
    """One Job per GPU kind; its command parses with warm-cache's own parser, and the stages it names
    are exactly the compiled stages that group hosts, each with a cache to fill."""
    from pipelines import registry
    from serve.warm_cache import accelerated_stages

    configmap = production.one("ConfigMap")
    app_file = tmp_path / "app.yaml"
    app_file.write_text(configmap["data"]["app.yaml"])
    config = AppConfig.from_file(app_file)
    hosts = {"sampler": "gpu-large", "decoder": "gpu-small"}
    parser = warm_cache_parser()
    for group, job in jobs_by_group(production).items():
        command = container(job)["command"]
        assert command[0] == "svd-serve"
        args = parser.parse_args(command[1:])
        assert args.command == "warm-cache" and args.config == "/etc/svd-serve/app.yaml"
        assert args.stage == [stage for stage, host in hosts.items() if host == group]
        assert args.model is None
        specs = accelerated_stages(config, args.stage)
        assert [spec.config_key for spec in specs] == args.stage
        assert all(config.stages.for_stage(spec).acceleration.cache_dir == "/models/compile-cache" for spec in specs)
        # The group's node kind: its nodeSelector, tolerations, one of its GPUs, its CPU/memory.
        ray_pod = worker_template(production, group)["spec"]
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == ray_pod["nodeSelector"] and pod["tolerations"] == ray_pod["tolerations"]
        ray_limits = ray_pod["containers"][0]["resources"]["limits"]
        assert container(job)["resources"]["limits"] == {**ray_limits, "nvidia.com/gpu": 1}
        assert pod.get("priorityClassName") == ray_pod.get("priorityClassName")
        assert pod["restartPolicy"] == "Never"
    assert {spec.config_key for spec in registry.STAGES.stages()} >= set(hosts)


def test_job_config_is_the_serve_apps_args(production):
    """The ConfigMap holds the same args as the RayService's Serve application (one helper renders both)."""
    configmap = production.one("ConfigMap")
    assert yaml.safe_load(configmap["data"]["app.yaml"]) == production.app_args
    for job in production.of_kind("Job"):
        pod = job["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
        config_volume = volumes[mounts["app-config"]["name"]]["configMap"]
        assert config_volume["name"] == configmap["metadata"]["name"]
        (item,) = config_volume["items"]
        assert f"{mounts['app-config']['mountPath']}/{item['path']}" == "/etc/svd-serve/app.yaml"
        assert item["key"] in configmap["data"]


def test_jobs_share_the_ray_pods_image_credentials_and_model_cache(production):
    worker = worker_template(production, "gpu-large")["spec"]
    ray_container = worker["containers"][0]
    ray_env = {e["name"]: e for e in ray_container["env"]}
    ray_cache = next(v for v in worker["volumes"] if v["name"] == "model-cache")
    for job in production.of_kind("Job"):
        pod = job["spec"]["template"]["spec"]
        main = container(job)
        assert main["image"] == ray_container["image"] and pod["imagePullSecrets"] == worker["imagePullSecrets"]
        assert pod["serviceAccountName"] == worker["serviceAccountName"]  # IRSA for S3 weights and caches
        assert pod["securityContext"] == worker["securityContext"] and main["securityContext"] == ray_container["securityContext"]
        env = {e["name"]: e for e in main["env"]}
        for name in ("HF_HOME", "SVD_SERVE_CACHE_DIR", "HF_TOKEN", "AWS_REGION", "REDIS_PASSWORD"):
            assert env[name] == ray_env[name], name
        assert "SVD_SERVE_TENANTS_FILE" not in env and "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in env
        assert next(v for v in pod["volumes"] if v["name"] == "model-cache") == ray_cache
        mount = next(m for m in main["volumeMounts"] if m["name"] == "model-cache")
        assert mount == {"name": "model-cache", "mountPath": "/models"}
        # The SQLite job store's directory is the Job's own (the cpu pod's data volume stays put).
        data = next(v for v in pod["volumes"] if v["name"] == "data")
        assert "emptyDir" in data
        assert {"name": "data", "mountPath": "/data"} in main["volumeMounts"]


def test_jobs_and_configmap_are_hooks_in_order(production):
    configmap = production.one("ConfigMap")["metadata"]["annotations"]
    for job in production.of_kind("Job"):
        annotations = job["metadata"]["annotations"]
        # The production release creates its ServiceAccount and model cache claim: a first install
        # runs the Jobs post-install; upgrades before the rollout.
        assert annotations["helm.sh/hook"] == configmap["helm.sh/hook"] == "post-install,pre-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == configmap["helm.sh/hook-delete-policy"] == "before-hook-creation"
        assert int(configmap["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
        assert job["spec"]["activeDeadlineSeconds"] == 2400 and job["spec"]["backoffLimit"] == 1
    assert "run post-install instead of pre-install" in production.notes
    assert "ServiceAccount svd-serve, PersistentVolumeClaim svd-serve-model-cache" in production.notes


def test_warm_cache_objects_are_all_hooks(production):
    """The Jobs and their ConfigMap exist only as hooks (so k8s/manifests, which drops hooks, has none);
    the RayService is no hook."""
    hooks = [doc for doc in production.docs if "helm.sh/hook" in (doc["metadata"].get("annotations") or {})]
    assert {doc["kind"] for doc in hooks} == {"Pod", "ConfigMap", "Job"}
    assert "helm.sh/hook" not in (production.rayservice["metadata"].get("annotations") or {})


def test_pre_install_when_nothing_of_the_release_is_needed():
    rendered = hu.render(compiled())
    for doc in rendered.of_kind("Job") + rendered.of_kind("ConfigMap"):
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    for job in rendered.of_kind("Job"):
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "svd-serve-ray"
        cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        assert cache["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert "instead of pre-install" not in rendered.notes


@pytest.mark.parametrize("sections, needs", [
    ({"serviceAccount": {"create": True}}, "ServiceAccount svd-serve"),
    ({"modelCache": {"persistence": {"enabled": True}}}, "PersistentVolumeClaim svd-serve-model-cache"),
    ({"huggingface": {"token": "hf_notarealtoken"}}, "Secret svd-serve-hf-token"),
    ({"aws": {"accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "example"}}, "Secret svd-serve-aws"),
    ({"jobStore": {"backend": "redis"}, "redis": {"enabled": True}}, "the bundled Redis svd-serve-redis"),
], ids=["service-account", "model-cache-claim", "hf-secret", "aws-secret", "bundled-redis"])
def test_pre_install_turns_post_install_for_objects_of_the_release(sections, needs):
    values = compiled(**sections)
    rendered = hu.render(values)
    for doc in rendered.of_kind("Job") + rendered.of_kind("ConfigMap"):
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    assert needs in rendered.notes
    # Hooks that never run before the release's objects exist stay as they are.
    later = {**values, "compileCache": {"enabled": True, "warmJob": {"enabled": True,
                                                                      "hooks": ["pre-upgrade", "post-install"]}}}
    for job in hu.render(later).of_kind("Job"):
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade,post-install"


def test_job_overrides():
    stages = {"sampler": {"acceleration": {"compile": "default"}}}  # only the Sampler compiles: one Job
    values = compiled(stages=stages, compileCache={"enabled": True, "url": "s3://compile-cache/prod", "warmJob": {
        "enabled": True, "models": ["acme/svd-anime", "svd"], "backoffLimit": 0, "activeDeadlineSeconds": 900,
        "ttlSecondsAfterFinished": 3600, "hookDeletePolicy": ["before-hook-creation", "hook-succeeded"],
        "nodeSelector": {"pool": "warmup"}, "tolerations": [{"key": "warmup", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
        "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}},
        "env": [{"name": "TORCHINDUCTOR_COMPILE_THREADS", "value": "4"}],
        "podAnnotations": {"example.com/purpose": "warm-cache"}}})
    values["workerGroups"] = {"gpu-large": {"env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}}
    rendered = hu.render(values)
    (job,) = rendered.of_kind("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "warmup"} and pod["tolerations"] == [{"key": "warmup", "operator": "Exists"}]
    assert pod["affinity"]["nodeAffinity"]
    assert container(job)["resources"] == {"requests": {"cpu": "4", "memory": "32Gi"},
                                           "limits": {"memory": "32Gi", "nvidia.com/gpu": 1}}
    env = [e["name"] for e in container(job)["env"]]
    assert env.index("NCCL_DEBUG") < env.index("TORCHINDUCTOR_COMPILE_THREADS")  # group's env, then the Job's
    assert job["spec"]["template"]["metadata"]["annotations"] == {"example.com/purpose": "warm-cache"}
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"], job["spec"]["ttlSecondsAfterFinished"]) == (0, 900, 3600)
    assert job["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    args = warm_cache_parser().parse_args(container(job)["command"][1:])
    assert (args.stage, args.model) == (["sampler"], ["acme/svd-anime", "svd"])
    assert rendered.app_args["stages"]["sampler"]["acceleration"]["cache_dir"] == "s3://compile-cache/prod"
    for doc in (job, rendered.one("ConfigMap")):
        hu.k8s_validate(doc)


def test_cpu_smoke_values_with_a_warm_job(tmp_path):
    """Everything on the one CPU group: one Job, no GPU, and the tiny models written first (the Job
    loads the same models as the replicas)."""
    from serve.warm_cache import accelerated_stages

    values = hu.load_values(hu.CI_VALUES_DIR / "cpu-smoke-values.yaml")
    for stage in ("image_encoder", "sampler", "decoder"):
        values["stages"][stage]["acceleration"] = {"compile": "default"}
    values["stages"]["sampler"]["warmup_shapes"] = [{"width": 64, "height": 64, "num_frames": 2}]
    values["stages"]["decoder"]["warmup_shapes"] = [{"width": 64, "height": 64, "num_frames": 2, "decode_chunk_size": 2}]
    values["compileCache"] = {"enabled": True, "url": "s3://compile-cache/smoke", "warmJob": {"enabled": True}}
    rendered = hu.render(values)
    (job,) = rendered.of_kind("Job")
    assert job["metadata"]["name"] == "svd-serve-warm-cache-cpu"
    args = warm_cache_parser().parse_args(container(job)["command"][1:])
    assert args.stage == ["image_encoder", "sampler", "decoder"]
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    (init,) = job["spec"]["template"]["spec"]["initContainers"]
    assert "svd-serve tiny-model /models/tiny-svd" in init["command"][-1]
    app_file = tmp_path / "app.yaml"
    app_file.write_text(rendered.one("ConfigMap")["data"]["app.yaml"])
    config = AppConfig.from_file(app_file)
    assert config.model.source == "/models/tiny-svd"
    assert [spec.config_key for spec in accelerated_stages(config, args.stage)] == args.stage
    hu.k8s_validate(job)


@pytest.mark.parametrize("sections, needle", [
    ({"compileCache": {"enabled": False, "warmJob": {"enabled": True}}}, "compileCache.warmJob.enabled needs compileCache.enabled"),
    ({"modelCache": {}}, "the Jobs would fill their own emptyDir"),
    ({"stages": {"sampler": {"acceleration": {"compile": "none"}}}}, "no stage compiles"),
    ({"workerGroups": {"gpu-large": {"enabled": False}}}, "no enabled worker group can host stages.sampler"),
], ids=["cache-off", "emptydir", "nothing-compiles", "no-host"])
def test_warm_job_without_what_it_needs_fails_clearly(sections, needle):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(needle)):
        hu.render(compiled(**sections))


@pytest.mark.parametrize("values, needle", [
    ({"compileCache": {"url": "https://bucket.s3.amazonaws.com/x"}}, "/compileCache/url"),
    ({"compileCache": {"subPath": "../outside"}}, "/compileCache/subPath"),
    ({"compileCache": {"subPath": "/absolute"}}, "/compileCache/subPath"),
    ({"compileCache": {"warmJob": {"hooks": ["post-delete"]}}}, "/compileCache/warmJob/hooks/0"),
    ({"compileCache": {"warmJob": {"hookDeletePolicy": ["never"]}}}, "/compileCache/warmJob/hookDeletePolicy/0"),
    ({"compileCache": {"warmJob": {"activeDeadlineSeconds": 0}}}, "/compileCache/warmJob/activeDeadlineSeconds"),
    ({"compileCache": {"warmJob": {"stages": ["sampler"]}}}, "'stages' not allowed"),
    ({"compileCache": {"enable": True}}, "'enable' not allowed"),
], ids=["url-scheme", "subpath-dotdot", "subpath-absolute", "hook", "delete-policy", "deadline", "job-key", "cache-key"])
def test_bad_compile_cache_values_are_rejected(values, needle):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(needle)):
        hu.render(values)


def test_long_release_names_keep_job_names_valid():
    names = set()
    for release in ("a-very-long-release-name-for-svd-serve-tenant-alpha-1", "a-very-long-release-name-for-svd-serve-tenant-alpha-2"):
        values = compiled(workerGroups={"gpu-large-h100-sxm-eu-west-1-zone-a": {
            **hu.load_values(hu.CHART_DIR / "values.yaml")["workerGroups"]["gpu-large"]},
            "gpu-large": {"enabled": False}})
        rendered = hu.render(values, release=release)
        for doc in rendered.of_kind("Job") + rendered.of_kind("ConfigMap"):
            assert len(doc["metadata"]["name"]) <= 63 and hu.DNS1123_LABEL.match(doc["metadata"]["name"])
            names.add(doc["metadata"]["name"])
    assert len(names) == 6  # two releases x (ConfigMap + gpu-small Job + the long group's Job)


def test_no_secret_in_the_job_config():
    secrets = {"hf": "hf_SENTINELwarmCacheDoNotLeak", "redis": "sentinel-redis-warm-cache-DoNotLeak",
               "aws": "sentinel/aws+warm/cache/DoNotLeak"}
    values = compiled(huggingface={"token": secrets["hf"]},
                      aws={"accessKeyId": "AKIASENTINELWARM", "secretAccessKey": secrets["aws"]},
                      redis={"enabled": True, "auth": {"password": secrets["redis"]}},
                      jobStore={"backend": "redis"})
    rendered = hu.render(values)
    stored = {base64.b64decode(v).decode() for s in rendered.of_kind("Secret") for v in s.get("data", {}).values()}
    assert set(secrets.values()) <= stored
    for doc in rendered.of_kind("ConfigMap") + rendered.of_kind("Job"):
        text = yaml.safe_dump(doc)
        assert not any(secret in text for secret in secrets.values()), doc["metadata"]["name"]
    for job in rendered.of_kind("Job"):
        for env in container(job)["env"]:
            if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                assert "value" not in env and env["valueFrom"]["secretKeyRef"], env


def test_lint_is_clean_with_the_warm_jobs():
    assert hu.lint_problems(hu.lint(compiled())) == []
