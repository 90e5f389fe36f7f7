"""Tenants: the policy model, the tenants file (defaults merged under each tenant's policy), the
registry's hot reload, and the ``svd-serve tenants`` CLI run for real in subprocesses against an
API that is never restarted."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.app import create_api
from serve.api.service import VideoService
from serve.config import AppConfig
from serve.jobstore import make_job_store
from serve.storage import make_storage
from serve.tenants import (
    Tenant,
    TenantPolicy,
    TenantRegistry,
    TenantsFileError,
    add_tenant,
    hash_key,
    load_tenants_file,
    parse_tenants,
    read_tenants,
    update_defaults,
    update_policy,
    write_tenants,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HASH = "sha256:" + "ab" * 32


# ---------------------------------------------------------------------------------------------- policy


def test_policy_defaults_are_documented_and_sensible():
    policy = TenantPolicy()
    assert (policy.rate_limit_per_minute, policy.burst, policy.max_running_jobs, policy.max_queued_jobs,
            policy.weight) == (150, 20, 4, 100, 1.0)
    assert policy.allowed_models == [] and policy.allows_model("anything/at-all")
    assert policy.max_num_frames is policy.max_pixels is policy.max_long_side is policy.max_inference_steps is None
    assert policy.retention_s is None and policy.rate_per_s == pytest.approx(2.5)
    for name, field in TenantPolicy.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize("values, message", [
    ({"rate_limit_per_minute": 0}, "greater than 0"),
    ({"burst": 0}, "greater than or equal to 1"),
    ({"max_running_jobs": 0}, "greater than or equal to 1"),
    ({"max_queued_jobs": -1}, "greater than or equal to 1"),
    ({"weight": 0}, "greater than 0"),
    ({"max_pixels": 100}, "greater than or equal to 4096"),
    ({"retention_s": 0}, "greater than 0"),
    ({"allowed_models": ["ok/model", " "]}, "must not be empty"),
    ({"max_pixels": 64 * 500, "max_long_side": 1024}, "max_long_side could never be reached"),
    ({"rate_limit": 5}, "Extra inputs are not permitted"),
])
def test_policy_validation(values, message):
    with pytest.raises(ValueError, match=message):
        TenantPolicy.model_validate(values)


def test_allowed_models_match_exactly_or_by_glob():
    policy = TenantPolicy(allowed_models=["stabilityai/*", "/models/tiny/", "stabilityai/*"])
    assert policy.allowed_models == ["stabilityai/*", "/models/tiny/"]  # deduplicated
    assert policy.allows_model("stabilityai/stable-video-diffusion-img2vid-xt-1-1")
    assert policy.allows_model("/models/tiny") and policy.allows_model("/models/tiny/")
    assert not policy.allows_model("someone/else") and not policy.allows_model("/models/tiny-2")


def test_limit_violations_name_each_limit():
    policy = TenantPolicy(max_num_frames=14, max_inference_steps=50, max_long_side=1024, max_pixels=1024 * 576)
    assert policy.limit_violations(num_frames=14, width=1024, height=576, num_inference_steps=50) == []
    problems = policy.limit_violations(num_frames=25, width=1536, height=1024, num_inference_steps=80)
    assert problems == [
        "num_frames 25 exceeds this tenant's limit of 14",
        "num_inference_steps 80 exceeds this tenant's limit of 50",
        "1536x1024: the long side 1536 exceeds this tenant's limit of 1024 pixels",
        "1536x1024 = 1572864 pixels per frame exceeds this tenant's limit of 589824",
    ]


# ---------------------------------------------------------------------------------------------- the file


def test_defaults_are_merged_under_each_tenants_policy(tmp_path):
    document = parse_tenants({
        "defaults": {"rate_limit_per_minute": 60, "max_running_jobs": 2, "allowed_models": ["a/*"]},
        "tenants": {
            "acme": {"key_hashes": [HASH], "policy": {"max_running_jobs": 8, "allowed_models": ["b/*"]}},
            "globex": {"key_hashes": []},
        },
    })
    acme, globex = document.tenants["acme"], document.tenants["globex"]
    assert acme.policy.rate_limit_per_minute == 60 and acme.policy.max_running_jobs == 8
    assert acme.policy.allowed_models == ["b/*"]  # a list is replaced, not merged
    assert globex.policy.max_running_jobs == 2 and globex.policy.allowed_models == ["a/*"]
    assert globex.policy.burst == 20  # built-in default
    assert acme.policy_overrides == {"max_running_jobs": 8, "allowed_models": ["b/*"]}

    # The file keeps only each tenant's own settings, so a new default reaches everyone else.
    path = tmp_path / "tenants.yaml"
    add_tenant(path, "acme", max_running_jobs=8)
    add_tenant(path, "globex")
    update_defaults(path, {"max_running_jobs": 3, "burst": 5})
    tenants = read_tenants(path)
    assert tenants["acme"].policy.max_running_jobs == 8 and tenants["globex"].policy.max_running_jobs == 3
    assert tenants["acme"].policy.burst == tenants["globex"].policy.burst == 5
    raw = yaml.safe_load(path.read_text())
    assert raw["defaults"] == {"max_running_jobs": 3, "burst": 5}
    assert raw["tenants"]["acme"]["policy"] == {"max_running_jobs": 8} and "policy" not in raw["tenants"]["globex"]
    # write_tenants keeps the defaults section.
    write_tenants(path, tenants)
    assert yaml.safe_load(path.read_text())["defaults"] == {"max_running_jobs": 3, "burst": 5}
    assert os.stat(path).st_mode & 0o777 == 0o600  # it holds webhook secrets


def test_a_tenant_can_reset_to_the_defaults(tmp_path):
    path = tmp_path / "tenants.yaml"
    add_tenant(path, "acme", burst=7, max_queued_jobs=9)
    tenant = update_policy(path, "acme", {"max_running_jobs": 1}, reset=["burst"])
    assert tenant.policy.burst == 20 and tenant.policy.max_queued_jobs == 9 and tenant.policy.max_running_jobs == 1
    assert read_tenants(path)["acme"].policy_overrides == {"max_queued_jobs": 9, "max_running_jobs": 1}
    with pytest.raises(TenantsFileError, match="unknown tenant"):
        update_policy(path, "nobody", {"burst": 2})
    with pytest.raises(TenantsFileError, match="burst"):
        update_policy(path, "acme", {"burst": 0})
    assert read_tenants(path)["acme"].policy.burst == 20  # a refused change writes nothing


def test_weight_stays_on_the_tenant_and_the_old_format_is_read():
    old = parse_tenants({"tenants": {"acme": {"key_hashes": [HASH], "weight": 2.5}}}).tenants["acme"]
    assert old.weight == old.policy.weight == 2.5 and old.policy_overrides == {"weight": 2.5}
    direct = Tenant(name="acme", key_hashes=[HASH], weight=3.0)
    assert direct.weight == 3.0 and direct.policy_overrides == {"weight": 3.0}
    with pytest.raises(TenantsFileError, match="weight is given both"):
        parse_tenants({"tenants": {"acme": {"weight": 2, "policy": {"weight": 3}}}})


def test_file_errors_name_the_place_but_never_a_value(tmp_path):
    secret = "whsec_do-not-print-me"
    for raw, where in [
        ({"tenants": {"acme": {"webhook_secret": secret, "policy": {"rate_limit": secret}}}},
         "tenants.acme.policy.rate_limit"),
        ({"defaults": {"burst": secret}}, "defaults.burst"),
        ({"tenants": {"acme": {"key_hashes": [secret]}}}, "tenants.acme.key_hashes"),
        ({"tenants": {"acme": {"keys": [secret]}}}, "tenants.acme: unknown keys"),
        ({"tenantz": {}}, "unknown top-level keys"),
    ]:
        with pytest.raises(TenantsFileError) as caught:
            parse_tenants(raw)
        assert where in str(caught.value) and secret not in str(caught.value)
    path = tmp_path / "bad.yaml"
    path.write_text("tenants: [unclosed")
    with pytest.raises(TenantsFileError, match="not valid YAML"):
        load_tenants_file(path)


def test_secrets_stay_out_of_reprs(tmp_path):
    path = tmp_path / "tenants.yaml"
    key = add_tenant(path, "acme")
    tenant = read_tenants(path)["acme"]
    assert tenant.webhook_secret and tenant.webhook_secret.startswith("whsec_")
    for text in (repr(tenant), str(tenant), f"{tenant}"):
        assert tenant.webhook_secret not in text and tenant.key_hashes[0] not in text and key not in text


def test_registry_reloads_policies_and_survives_a_bad_edit(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    key = add_tenant(path, "acme")
    registry = TenantRegistry(path, check_interval_s=0)
    assert registry.authenticate(f"Bearer {key}").policy.max_running_jobs == 4
    update_policy(path, "acme", {"max_running_jobs": 9})
    update_policy(path, "acme", {"burst": 3})  # two writes in one timestamp tick are both seen
    tenant = registry.authenticate(f"Bearer {key}")
    assert tenant.policy.max_running_jobs == 9 and tenant.policy.burst == 3
    # A broken edit keeps the last good tenants in force, and says so once in the log.
    good = path.read_text()
    path.write_text(good.replace("burst: 3", "burst: many-whsec_x"))
    with caplog.at_level(logging.ERROR, logger="ray.serve.svd_serve"):
        assert registry.authenticate(f"Bearer {key}").policy.burst == 3
        assert registry.authenticate(f"Bearer {key}").policy.burst == 3
    errors = [r for r in caplog.records if "invalid" in r.getMessage()]
    assert len(errors) == 1 and "many-whsec_x" not in errors[0].getMessage()
    path.write_text(good.replace("burst: 3", "burst: 4"))
    assert registry.authenticate(f"Bearer {key}").policy.burst == 4
    # At startup a broken file is an error, not an empty registry.
    path.write_text("tenants: {acme: {policy: {burst: 0}}}")
    with pytest.raises(TenantsFileError, match="burst"):
        TenantRegistry(path)


# ---------------------------------------------------------------------------------------------- the CLI


def cli(*args: str, file: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = ["--file", str(file)] if file is not None else []
    return subprocess.run([sys.executable, "-m", "serve.cli", "tenants", *args, *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def cli_in_process(capsys, *args: str, file: Path) -> subprocess.CompletedProcess:
    """The same ``main`` as ``python -m serve.cli``, without a new interpreter (the subprocess runs
    above cover the real entry point; these keep the file fast)."""
    from serve.cli import main

    capsys.readouterr()
    try:
        code = main(["tenants", *args, "--file", str(file)])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-serve tenants: "), result.stderr
    return lines[0]


@pytest.fixture
def api(tmp_path):
    """The HTTP API over a tenants file that the CLI edits while the app keeps running."""
    config = AppConfig.model_validate({
        "storage": {"local_dir": str(tmp_path / "outputs")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
    })

    async def model_info(model_id=None):
        return {"num_frames": 14}

    service = VideoService(config, store=make_job_store(config.job_store), storage=make_storage(config.storage),
                           model_info=model_info)
    path = tmp_path / "tenants.yaml"
    client = TestClient(create_api(service, TenantRegistry(path, check_interval_s=0)))
    client.tenants_file = path
    yield client
    service.store.close()


def status(api, key: str) -> int:
    return api.get("/v1/videos", headers={"Authorization": f"Bearer {key}"}).status_code


def test_cli_add_prints_credentials_once_and_stores_only_the_hash(api, capsys):
    path = api.tenants_file
    result = cli("add", "acme", "--weight", "2", "--rate-limit", "60", "--max-steps", "30", "--retention", "12h",
                 "--allowed-model", "stabilityai/*", file=path)
    assert result.returncode == 0, result.stderr
    key = next(line.split()[-1] for line in result.stdout.splitlines() if "api key:" in line)
    secret = next(line.split()[-1] for line in result.stdout.splitlines() if "webhook secret:" in line)
    assert key.startswith("svd_") and secret.startswith("whsec_") and result.stdout.count(key) == 1
    stored = path.read_text()
    assert key not in stored and hash_key(key) in stored
    tenant = read_tenants(path)["acme"]
    assert tenant.webhook_secret == secret and tenant.weight == 2.0
    assert tenant.policy.rate_limit_per_minute == 60 and tenant.policy.max_inference_steps == 30
    assert tenant.policy.retention_s == 12 * 3600 and tenant.policy.allowed_models == ["stabilityai/*"]
    assert status(api, key) == 200  # live at once, no restart

    # --json, for scripts; the file comes from the environment this time.
    result = cli("add", "globex", "--json", env={"SVD_SERVE_TENANTS_FILE": str(path)})
    issued = json.loads(result.stdout)
    assert set(issued) == {"tenant", "api_key", "key_id", "webhook_secret"}
    assert hash_key(issued["api_key"]).removeprefix("sha256:").startswith(issued["key_id"])

    # list: names, key counts, policies; never a key, a hash or a secret.
    listing = cli("list", file=path)
    assert listing.returncode == 0
    assert "acme: 1 key, webhook secret set" in listing.stdout and "rate_limit_per_minute=60" in listing.stdout
    for hidden in (key, secret, hash_key(key), hash_key(key)[7:19], issued["api_key"], issued["webhook_secret"]):
        assert hidden not in listing.stdout
    as_json = json.loads(cli_in_process(capsys, "list", "--json", file=path).stdout)
    assert [t["name"] for t in as_json["tenants"]] == ["acme", "globex"]
    assert as_json["tenants"][0]["keys"] == 1 and as_json["tenants"][0]["policy"]["weight"] == 2.0
    assert secret not in json.dumps(as_json) and hash_key(key) not in json.dumps(as_json)


def test_cli_rotate_and_revoke_take_effect_without_restart(api):
    path = api.tenants_file
    first = json.loads(cli("add", "acme", "--json", file=path).stdout)["api_key"]
    assert status(api, first) == 200

    rotated = cli("rotate", "acme", file=path)
    assert rotated.returncode == 0
    second = next(line.split()[-1] for line in rotated.stdout.splitlines() if "api key:" in line)
    assert status(api, first) == 401 and status(api, second) == 200

    grace = json.loads(cli("rotate", "acme", "--keep-old", "--json", file=path).stdout)
    third = grace["api_key"]
    assert status(api, second) == 200 and status(api, third) == 200  # both work during the grace period
    second_id = hash_key(second).removeprefix("sha256:")[:10]
    revoked = cli("revoke", "acme", "--key-hash", second_id, file=path)
    assert revoked.returncode == 0 and "1 key left" in revoked.stdout
    assert status(api, second) == 401 and status(api, third) == 200

    old_secret = read_tenants(path)["acme"].webhook_secret
    new_secret = json.loads(cli("rotate", "acme", "--webhook-secret", "--json", file=path).stdout)["webhook_secret"]
    assert new_secret != old_secret and read_tenants(path)["acme"].webhook_secret == new_secret
    assert status(api, third) == 200  # the key is untouched

    removed = cli("revoke", "acme", file=path)
    assert removed.returncode == 0 and status(api, third) == 401
    assert "acme" not in read_tenants(path)


def test_cli_set_changes_the_policy_of_a_running_service(api):
    path = api.tenants_file
    key = add_tenant(path, "acme")
    changed = cli("set", "acme", "--max-steps", "10", "--max-queued", "none", file=path)
    assert changed.returncode == 0 and "max_inference_steps=10" in changed.stdout
    assert read_tenants(path)["acme"].policy.max_queued_jobs is None
    png = Path(SAMPLE_IMAGE_PATH).read_bytes()
    response = api.post("/v1/videos", headers={"Authorization": f"Bearer {key}"},
                        json={"image_url": "data:image/png;base64," + base64.b64encode(png).decode(),
                              "num_inference_steps": 20, "width": 64, "height": 64, "num_frames": 4})
    assert response.status_code == 422 and response.json()["error"]["code"] == "limit_exceeded"
    assert "num_inference_steps 20 exceeds this tenant's limit of 10" in response.json()["error"]["message"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    add_tenant(path, "acme")
    before = path.read_text()
    # Through the real entry point...
    assert "already exists" in one_line_error(cli("add", "acme", file=path))
    assert "--max-running 'x'" in one_line_error(cli("set", "acme", "--max-running", "x", file=path))
    # ...and the rest in process.
    cases = [
        (("add", "bad name!"), "tenant name"),
        (("add", "bob", "--burst", "lots"), "--burst 'lots': expected a whole number"),
        (("add", "bob", "--rate-limit", "0"), "--rate-limit: Input should be greater than 0"),
        (("set", "nobody", "--burst", "2"), "unknown tenant 'nobody'"),
        (("set", "acme"), "nothing to change"),
        (("set", "acme", "--reset", "colour"), "not a policy setting"),
        (("rotate", "nobody"), "unknown tenant"),
        (("revoke", "acme", "--key-hash", "zz"), "at least 6 hex digits"),
        (("revoke", "acme", "--key-hash", "000000"), "no key whose hash starts with 000000"),
    ]
    for args, message in cases:
        assert message in one_line_error(cli_in_process(capsys, *args, file=path)), args
    assert path.read_text() == before  # nothing was written by a refused command
