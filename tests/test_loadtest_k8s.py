"""k8s/loadtest/: valid Kubernetes objects, consistent with each other and with the profile model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loadtest.profile import Profile
from loadtest.units import parse_keys

K8S = Path(__file__).resolve().parent.parent / "k8s" / "loadtest"


def _docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict:
    return next(d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_objects_are_valid_kubernetes():
    from helm_utils import k8s_validate

    docs = _docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret", "Deployment", "Service"}
    for doc in docs:
        k8s_validate(doc)


def test_configmap_profile_target_and_workers():
    config = _one("ConfigMap", "svd-loadtest")["data"]
    profile = Profile.model_validate(yaml.safe_load(config["profile.yaml"]))
    assert config["LOADTEST_TARGET"].endswith("-serve-svc:8000")
    assert config["LOADTEST_PROFILE"] == "/etc/svd-loadtest/profile.yaml"
    worker = _one("Deployment", "svd-loadtest-worker")
    assert worker["spec"]["replicas"] == int(config["LOADTEST_WORKERS"])
    keys = parse_keys(_one("Secret", "svd-loadtest-keys")["stringData"]["LOADTEST_KEYS"])
    assert set(keys) == {t.name for t in profile.tenants}
    assert "from loadtest.locustfile import" in config["locustfile.py"]


@pytest.mark.parametrize("name", ["svd-loadtest-master", "svd-loadtest-worker"])
def test_pods_run_the_locustfile_unprivileged(name):
    spec = _one("Deployment", name)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["args"][:2] == ["-f", "/etc/svd-loadtest/locustfile.py"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["LOCUST_HOST"]["valueFrom"]["configMapKeyRef"]["key"] == "LOADTEST_TARGET"
    has_keys = "LOADTEST_KEYS" in env
    assert has_keys == (name == "svd-loadtest-worker")  # only workers call the API
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/svd-loadtest" in mounts and "/tmp" in mounts


def test_master_service_matches_master_ports():
    service = _one("Service", "svd-loadtest-master")
    master = _one("Deployment", "svd-loadtest-master")
    labels = master["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    ports = {p["name"] for p in master["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    worker_args = _one("Deployment", "svd-loadtest-worker")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--master-host=svd-loadtest-master" in worker_args
