"""k8s/loadtest/: valid Kubernetes objects, consistent with each other and with the profile model;
the load-generator image ships what the loadtest package imports, and that package has no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from loadtest.profile import Profile
from loadtest.units import parse_keys

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s" / "loadtest"


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


# -- the loadtest package's imports ------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Modules a file imports, anywhere in it (lazy imports too), relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from .x import y` in package a.b: a.b.x (`..x`: a.x)
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def _first_party(name: str) -> Path | None:
    for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _deps(module: str) -> set[str]:
    """The first-party modules ``module`` imports (its own packages left out)."""
    return {m for m in _imports(_first_party(module)) if _first_party(m) is not None
            and m != module and not module.startswith(m + ".")}


def test_loadtest_modules_import_no_circle():
    graph = {f"loadtest.{p.stem}": _deps(f"loadtest.{p.stem}") for p in sorted((ROOT / "loadtest").glob("*.py"))}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, "import circle: " + " -> ".join((*path[path.index(node):], node))
        if node in done:
            return
        for child in sorted(graph.get(node, ()) & set(graph)):
            visit(child, (*path, node))
        done.add(node)

    for module in graph:
        visit(module, ())


def test_image_ships_what_the_locustfile_imports():
    """The image copies only some of the repo: every first-party module the Locust side reaches (from
    the locustfile, lazy imports included) must be among the Dockerfile's COPY sources."""
    reached, todo = set(), ["loadtest.locustfile"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += _deps(module)
    needed = {_first_party(m).relative_to(ROOT) for m in reached}
    needed |= {p.parent / "__init__.py" for p in needed if (ROOT / p.parent / "__init__.py").is_file()}
    copied = []
    for line in (K8S / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            copied += [Path(w) for w in words[1:-1] if not w.startswith("--")]
    missing = sorted(str(p) for p in needed if not any(p == c or c in p.parents for c in copied))
    assert not missing, f"k8s/loadtest/Dockerfile does not COPY {missing} into the image"
