"""Render, lint and check the Helm chart (helm/svd-serve) without a ``helm`` binary or a cluster.

Rendering and linting go through ``helm_python`` (PyPI: helm-python-sdk), a ctypes binding of
Helm's own Go SDK: ``Chart.load(dir).render(values, name=..., namespace=...)`` is ``helm template``
(it validates values against values.schema.json first) and ``lint(dir, values, strict=True)`` is
``helm lint --strict``.

Also the command that regenerates the plain manifests for users without Helm:

    python -m tests.helm_utils render-manifests            # rewrite k8s/manifests/svd-serve.yaml
    python -m tests.helm_utils render-manifests --check    # exit 1 when the file is stale
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "helm" / "svd-serve"
CI_VALUES_DIR = CHART_DIR / "ci"
EXAMPLE_VALUES_DIR = REPO_ROOT / "k8s" / "values"
MANIFESTS_FILE = REPO_ROOT / "k8s" / "manifests" / "svd-serve.yaml"
# KubeRay's CRDs live next to the repository (../shared/kuberay-crds), not in it.
CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
RAYSERVICE_CRD = CRD_DIR / "ray.io_rayservices.yaml"

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a kubernetes-validate ships.
K8S_VERSION = "1.30.0"
# KubeRay's limits (ray-operator/controllers/ray/utils/constant.go, validation.go).
MAX_RAYSERVICE_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

MANIFEST_RELEASE = "svd-serve"
MANIFEST_NAMESPACE = "svd-serve"

# Helm's install order (pkg/release/util/kind_sorter.go), for a kubectl-applicable manifest file.
_KIND_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding",
    "RoleBindingList", "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
]


# -- rendering --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _chart():
    import helm_python

    return helm_python.Chart.load(CHART_DIR)


def load_values(path: str | Path) -> dict[str, Any]:
    """A values file as a dict (an empty or all-comment file is {})."""
    return yaml.safe_load(Path(path).read_text()) or {}


def values_files() -> list[Path]:
    """Every value set the tests render: the chart's ci/ files and the k8s/values/ examples."""
    return sorted(CI_VALUES_DIR.glob("*.yaml")) + sorted(EXAMPLE_VALUES_DIR.glob("*.yaml"))


@dataclass
class Rendered:
    """One rendering of the chart: its documents (with their template) and NOTES.txt."""

    documents: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    @property
    def docs(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self.documents]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind}{'/' + name if name else ''}, found {len(found)}")
        return found[0]

    @property
    def rayservice(self) -> dict[str, Any]:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def app_args(self) -> dict[str, Any]:
        (application,) = self.serve_config["applications"]
        return application["args"]


def render(values: dict[str, Any] | None = None, *, release: str = MANIFEST_RELEASE,
           namespace: str = MANIFEST_NAMESPACE) -> Rendered:
    """``helm template``: values are validated against values.schema.json, then templates render.

    Raises helm_python.HelmValuesError for values the schema rejects and HelmRenderError for a
    template ``fail``.
    """
    texts = _chart().render(values or {}, name=release, namespace=namespace)
    rendered = Rendered(texts=texts)
    for template, text in sorted(texts.items()):
        if template.endswith("NOTES.txt"):
            rendered.notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                rendered.documents.append((template, doc))
    return rendered


def render_file(path: str | Path, **kwargs: Any) -> Rendered:
    return render(load_values(path), **kwargs)


def lint(values: dict[str, Any] | None = None, *, strict: bool = True) -> dict[str, Any]:
    """``helm lint --strict`` with these values over the chart's; findings come back as data."""
    import helm_python

    return helm_python.lint(CHART_DIR, values or {}, strict=strict, kube_version=f"v{K8S_VERSION}")


def lint_problems(report: dict[str, Any]) -> list[str]:
    """Lint findings of severity warning (2) or error (3), plus hard errors."""
    problems = [f"{m['path']}: {m['error'].strip()}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return problems + [error.strip() for error in report.get("errors", [])]


# -- Kubernetes schemas -----------------------------------------------------------------------------


def k8s_validate(doc: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Strict validation against the Kubernetes OpenAPI schema (kubernetes-validate)."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def pod_templates(rayservice: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group, pod template) of the head and of every worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def as_pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    """A pod template as a Pod document, for kubernetes-validate."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


# -- KubeRay's CRD ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def crd_schema(crd_file: Path = RAYSERVICE_CRD, version: str = "v1") -> dict[str, Any]:
    """``spec.versions[name=version].schema.openAPIV3Schema`` of a CRD file."""
    crd = yaml.safe_load(crd_file.read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd_file.name} has no version {version}")


def crd_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Types, enums, required fields and patterns (jsonschema; OpenAPI v3 reads as draft 4)."""
    import jsonschema

    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not declare: the API server would silently prune them.

    A field is known when the schema lists it under ``properties``, or the object allows it through
    ``additionalProperties``, or the schema sets ``x-kubernetes-preserve-unknown-fields``. The root
    ``metadata`` (an ObjectMeta the API server validates itself) is checked for the usual fields.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors: list[str] = []
    if isinstance(doc, dict):
        if path == "metadata":
            allowed = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}
            return [f"metadata.{k}: unknown field" for k in doc if k not in allowed]
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, value in doc.items():
            child_path = f"{path}.{key}" if path else str(key)
            if key in properties:
                errors += unknown_fields(value, properties[key], child_path)
            elif isinstance(additional, dict):
                errors += unknown_fields(value, additional, child_path)
            elif additional is True:
                continue
            else:
                errors.append(f"{child_path}: unknown field (not in the CRD schema; the API server would drop it)")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(doc):
            errors += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return errors


def _env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def kuberay_errors(rayservice: dict[str, Any]) -> list[str]:
    """The checks KubeRay's ValidateRayServiceMetadata/ValidateRayClusterSpec make at admission time."""
    errors: list[str] = []
    name = rayservice["metadata"]["name"]
    if len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"RayService name {name!r} is longer than {MAX_RAYSERVICE_NAME}")
    if not DNS1035.match(name):
        errors.append(f"RayService name {name!r} is not a DNS-1035 label")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    if "serve" not in {p.get("name") for p in head_container.get("ports", [])}:
        errors.append("the head's Ray container (containers[0]) has no port named 'serve'")
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and cluster.get("autoscalerOptions", {}).get("version") == "v2"
    groups = [("head", head)] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    seen: set[str] = set()
    for group_name, group in groups:
        params = group.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{group_name}: rayStartParams.labels is not supported (use the group's labels)")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{group_name}: resources set both in rayStartParams and in resources")
        if "resources" in params:
            try:
                offered = json.loads(params["resources"])
                assert isinstance(offered, dict) and all(isinstance(v, (int, float)) for v in offered.values())
            except (ValueError, AssertionError):
                errors.append(f"{group_name}: rayStartParams.resources is not a JSON object of numbers")
        pod_spec = group["template"]["spec"]
        if v2 and pod_spec.get("restartPolicy", "Never") != "Never":
            errors.append(f"{group_name}: restartPolicy must be Never or unset with autoscaler v2")
        if group_name == "head":
            continue
        if group_name in seen:
            errors.append(f"worker group {group_name!r} is not unique")
        seen.add(group_name)
        low, want, high = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 0)
        if not low <= want <= high:
            errors.append(f"{group_name}: need minReplicas <= replicas <= maxReplicas, got {low}/{want}/{high}")
    if cluster.get("gcsFaultToleranceOptions") is not None:
        if "redis-password" in head.get("rayStartParams", {}):
            errors.append("GCS FT: redis-password must not be in rayStartParams")
        forbidden = _env_names(head_container) & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"}
        if forbidden:
            errors.append(f"GCS FT: the head container must not set {sorted(forbidden)} (KubeRay injects them)")
        if rayservice["metadata"].get("annotations", {}).get("ray.io/ft-enabled"):
            errors.append("GCS FT: the ray.io/ft-enabled annotation conflicts with gcsFaultToleranceOptions")
    elif "RAY_REDIS_ADDRESS" in _env_names(head_container):
        errors.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    return errors


# -- Serve application vs worker groups -------------------------------------------------------------


def quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 2) as a number of CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per worker group: the custom resources it offers, GPUs and CPUs per pod."""
    groups = {}
    for group in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        container = group["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        cpus = limits.get("cpu", requests.get("cpu"))
        groups[group["groupName"]] = {
            "resources": json.loads(group.get("rayStartParams", {}).get("resources", "{}")),
            "gpus": float(limits.get("nvidia.com/gpu", 0)),
            "cpus": quantity(cpus) if cpus is not None else float("inf"),
        }
    return groups


def placement_errors(rayservice: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """Every stage must be schedulable: some worker group offers each custom resource it requests,
    with enough GPUs and CPUs per pod for one replica. (Replica counts are the autoscaler's job.)"""
    groups = worker_groups(rayservice)
    errors = []
    for stage, cfg in sorted(args.get("stages", {}).items()):
        options = cfg.get("ray_actor_options", {})
        wanted = options.get("resources", {})
        fits = [
            name for name, group in groups.items()
            if all(group["resources"].get(res, 0) >= amount for res, amount in wanted.items())
            and group["gpus"] >= options.get("num_gpus", 0)
            and group["cpus"] >= options.get("num_cpus", 1)
        ]
        if not fits:
            errors.append(
                f"stage {stage} (resources {wanted}, num_gpus {options.get('num_gpus', 0)}, num_cpus "
                f"{options.get('num_cpus', 1)}) fits no worker group: "
                + ", ".join(f"{n} offers {g['resources']} with {g['gpus']:g} GPU / {g['cpus']:g} CPU" for n, g in groups.items())
            )
    return errors


# -- k8s/manifests ----------------------------------------------------------------------------------

MANIFEST_HEADER = """\
# svd-serve: plain Kubernetes manifests for users without Helm.
#
# GENERATED from helm/svd-serve with its default values (release "{release}") by
#     python -m tests.helm_utils render-manifests
# Do not edit by hand: tests/test_helm.py fails when this file and the chart disagree.
# `helm test` and NOTES.txt are left out. Requires the KubeRay operator >= 1.7 (k8s/README.md).
# Apply with: kubectl create namespace {namespace} && kubectl apply -n {namespace} -f svd-serve.yaml
"""


def _split_documents(text: str) -> list[str]:
    chunks = re.split(r"(?m)^---\s*$", text)
    return [chunk.strip("\n") for chunk in chunks if yaml.safe_load(chunk)]


def render_manifests_text() -> str:
    """k8s/manifests/svd-serve.yaml as it should be: default values, no hooks, Helm's kind order."""
    texts = _chart().render({}, name=MANIFEST_RELEASE, namespace=MANIFEST_NAMESPACE)
    entries = []
    for template, text in texts.items():
        if template.endswith("NOTES.txt"):
            continue
        for chunk in _split_documents(text):
            doc = yaml.safe_load(chunk)
            if "helm.sh/hook" in (doc.get("metadata", {}).get("annotations") or {}):
                continue
            kind = doc["kind"]
            order = _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)
            entries.append((order, kind, doc["metadata"]["name"], template, chunk))
    body = "".join(f"---\n# Source: {template}\n{chunk}\n" for _, _, _, template, chunk in sorted(entries))
    return MANIFEST_HEADER.format(release=MANIFEST_RELEASE, namespace=MANIFEST_NAMESPACE) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helm_utils", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    manifests = commands.add_parser("render-manifests", help=f"regenerate {MANIFESTS_FILE.relative_to(REPO_ROOT)}")
    manifests.add_argument("--check", action="store_true", help="only check; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = render_manifests_text()
    relative = MANIFESTS_FILE.relative_to(REPO_ROOT)
    if args.check:
        current = MANIFESTS_FILE.read_text() if MANIFESTS_FILE.exists() else ""
        if current != text:
            print(f"{relative} is stale: run python -m tests.helm_utils render-manifests", file=sys.stderr)
            return 1
        print(f"{relative} is up to date")
        return 0
    MANIFESTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    MANIFESTS_FILE.write_text(text)
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
