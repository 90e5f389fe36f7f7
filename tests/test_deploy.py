"""``svd-serve deploy`` without a cluster (issue #14): finding the running deployment, reading and
checking the config, what it says will change; the options that make upgrades drain and surge; the
model version on the job. The real roll-out under load is tests/test_upgrade_drill.py."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from serve.cli import main
from serve.deploy import STATE_FILE, DeployError, LocalState, changed_paths, plan_deploy


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def app_config(tmp_path: Path, **extra) -> dict:
    return {"model": {"source": "stabilityai/stable-video-diffusion-img2vid-xt-1-1"},
            "text_to_image_model": None,
            "storage": {"local_dir": str(tmp_path / "outputs")},
            "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
            "auth": {"tenants_file": str(tmp_path / "tenants.yaml")}, **extra}


@pytest.fixture
def running(tmp_path) -> LocalState:
    """The state file of a running ``svd-serve up`` (this process stands in for it)."""
    from serve.app import localize_paths
    from serve.config import AppConfig

    config = localize_paths(AppConfig.model_validate(app_config(tmp_path)))
    state = LocalState(pid=os.getpid(), gcs_address="127.0.0.1:1", app_name="svd", host="127.0.0.1", port=8123,
                       url="http://127.0.0.1:8123", config=config.model_dump(mode="json"), auth_mode="token")
    state.write(tmp_path)
    return state


def write(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


# -- finding the running deployment ------------------------------------------------------------------


def test_state_file_round_trip_and_removal_only_by_its_writer(tmp_path, running):
    assert LocalState.read(tmp_path) == running
    LocalState.remove(tmp_path, pid=os.getpid() + 1)  # another `up` on the same dir: not its file
    assert (tmp_path / STATE_FILE).exists()
    LocalState.remove(tmp_path, pid=os.getpid())
    assert not (tmp_path / STATE_FILE).exists()


def test_nothing_running_is_a_one_line_error(tmp_path, capsys):
    config = write(tmp_path, "app.yaml", app_config(tmp_path))
    err = one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), str(config)])
    assert "no running svd-serve up found" in err and STATE_FILE in err
    (tmp_path / STATE_FILE).write_text(json.dumps({"pid": 2 ** 22 + 12345, "gcs_address": "x:1", "app_name": "svd",
                                                   "host": "h", "port": 1, "url": "u"}))
    err = one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), str(config)])
    assert "is not running" in err and "start it again" in err
    (tmp_path / STATE_FILE).write_text("{not json")
    assert "is not a state file" in one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), str(config)])


@pytest.mark.parametrize("content,needle", [
    ("stages:\n  sampler:\n    num_replicas: 0\n", "stages.sampler.num_replicas"),
    ("stages:\n  sampler:\n    num_replicas: 1\n    autoscaling: {max_replicas: 2}\n", "num_replicas or autoscaling"),
    ("stages:\n  samplr: {}\n", "unknown stage 'samplr'"),
    ("a: [\n", "not valid YAML (line 2)"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("applications:\n  - name: svd\n    import_path: serve.app:build_app\n    args:\n      max_segments: 0\n",
     "applications[0].args: max_segments"),
    ("applications:\n  - import_path: 3\n", "not a valid Serve config"),
])
def test_invalid_configs_are_one_line_errors_naming_the_field(tmp_path, running, capsys, content, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert needle in one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), str(config)])


def test_missing_config_and_bad_arguments(tmp_path, running, capsys):
    assert "no such file" in one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), str(tmp_path / "x.yaml")])
    assert "give the CONFIG" in one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path)])
    config = write(tmp_path, "app.yaml", app_config(tmp_path))
    assert "--timeout must be positive" in one_line_error(
        capsys, ["deploy", "--data-dir", str(tmp_path), "--timeout", "0", str(config)])
    assert "--show prints" in one_line_error(capsys, ["deploy", "--data-dir", str(tmp_path), "--show", str(config)])


# -- what will be applied ----------------------------------------------------------------------------


def test_an_app_config_becomes_the_application_up_runs(tmp_path, running):
    config = write(tmp_path, "app.yaml", app_config(tmp_path, stages={"sampler": {"num_replicas": 2}}))
    plan = plan_deploy(yaml.safe_load(config.read_text()), path=config, state=running, app_name=None,
                       data_dir=tmp_path, force=False)
    (app,) = plan.serve_config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("svd", "/", "serve.app:build_app")
    assert app.args["stages"]["sampler"]["num_replicas"] == 2
    assert (plan.serve_config.http_options.host, plan.serve_config.http_options.port) == ("127.0.0.1", 8123)
    assert any("stages.sampler.num_replicas" in note and "replaces its replicas" in note for note in plan.notes)


def test_an_unchanged_config_restarts_nothing(tmp_path, running):
    config = write(tmp_path, "app.yaml", app_config(tmp_path))
    plan = plan_deploy(yaml.safe_load(config.read_text()), path=config, state=running, app_name=None,
                       data_dir=tmp_path, force=False)
    assert any("no replica restarts" in note for note in plan.notes)


def test_relative_paths_resolve_against_the_callers_directory(tmp_path, running, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = app_config(tmp_path)
    relative["storage"]["local_dir"] = "outputs"
    relative["job_store"]["sqlite_path"] = "./jobs.sqlite3"
    config = write(tmp_path, "app.yaml", relative)
    plan = plan_deploy(relative, path=config, state=running, app_name=None, data_dir=tmp_path, force=False)
    args = plan.serve_config.applications[0].args
    assert args["job_store"]["sqlite_path"] == str(tmp_path / "jobs.sqlite3")
    assert args["storage"]["local_dir"] == str(tmp_path / "outputs")


def test_moving_the_job_store_or_outputs_is_refused_unless_forced(tmp_path, running):
    moved = app_config(tmp_path)
    moved["job_store"]["sqlite_path"] = str(tmp_path / "elsewhere.sqlite3")
    config = write(tmp_path, "app.yaml", moved)
    with pytest.raises(DeployError, match="moves job_store .*stranded.*--force"):
        plan_deploy(moved, path=config, state=running, app_name=None, data_dir=tmp_path, force=False)
    plan = plan_deploy(moved, path=config, state=running, app_name=None, data_dir=tmp_path, force=True)
    assert plan.serve_config.applications[0].args["job_store"]["sqlite_path"].endswith("elsewhere.sqlite3")


def test_a_serve_config_keeps_its_deployment_overrides_and_must_name_the_running_app(tmp_path, running):
    serve_config = {"applications": [{"name": "svd", "route_prefix": "/", "import_path": "serve.app:build_app",
                                      "args": app_config(tmp_path),
                                      "deployments": [{"name": "Decoder", "num_replicas": 2}]}]}
    path = write(tmp_path, "serve.yaml", serve_config)
    plan = plan_deploy(serve_config, path=path, state=running, app_name=None, data_dir=tmp_path, force=False)
    (app,) = plan.serve_config.applications
    assert app.deployments[0].name == "Decoder" and app.deployments[0].num_replicas == 2
    # No http_options given: the running ones (Serve's defaults would read as a change it ignores).
    assert plan.serve_config.http_options.port == 8123
    serve_config["applications"][0]["name"] = "svd-serve"
    with pytest.raises(DeployError, match="the running application is 'svd'"):
        plan_deploy(serve_config, path=path, state=running, app_name=None, data_dir=tmp_path, force=False)


def test_the_checked_in_serve_config_plans_against_a_running_up(running, monkeypatch):
    """From the repository root, as its header says; its data paths are ./data, so against an `up`
    on another data dir it is refused unless forced."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    raw = yaml.safe_load((root / "serve" / "serve_config.yaml").read_text())
    with pytest.raises(DeployError, match="moves job_store, storage, auth"):
        plan_deploy(raw, path="serve/serve_config.yaml", state=running, app_name=None, data_dir=Path("data"),
                    force=False)
    plan = plan_deploy(raw, path="serve/serve_config.yaml", state=None, app_name=None, data_dir=Path("data"),
                       force=False)
    assert plan.app_name == "svd" and plan.app_config.model.source == str(root / "models" / "tiny")


def test_changed_paths():
    before = {"a": 1, "stages": {"sampler": {"num_replicas": 1, "x": {"deep": 1}}, "decoder": {}}}
    after = {"a": 1, "stages": {"sampler": {"num_replicas": 2, "x": {"deep": 2}}, "decoder": {}}, "b": 0}
    assert changed_paths(before, after) == ["b", "stages.sampler.num_replicas", "stages.sampler.x"]
    assert changed_paths(before, before) == []


def test_show_prints_the_running_app_config(tmp_path, running, capsys):
    assert main(["deploy", "--data-dir", str(tmp_path), "--show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# the app config 'svd' runs at http://127.0.0.1:8123")
    assert yaml.safe_load(out) == running.config


# -- options that make upgrades drain and surge ----------------------------------------------------------


def test_surge_and_graceful_shutdown_reach_serve():
    from serve.config import AppConfig

    config = AppConfig.model_validate({"stages": {"sampler": {"max_surge_percent": 100}}})
    assert config.stages.sampler.to_serve_options()["max_surge_percent"] == 100
    assert config.stages.decoder.to_serve_options()["max_surge_percent"] == 0  # a GPU stage surges only if asked
    # The ingress and the runner surge by default: a quarter CPU for a moment, never no API.
    assert config.stages.ingress.max_surge_percent == config.stages.runner.max_surge_percent == 100
    # Every replica may finish its work before it stops: longer than a job's sampling call.
    assert min(d.graceful_shutdown_timeout_s for d in (config.stages.sampler, config.stages.runner)) >= 600
    with pytest.raises(ValueError, match="max_surge_percent"):
        AppConfig.model_validate({"stages": {"sampler": {"max_surge_percent": 101}}})


def test_a_whole_dumped_app_config_validates_again(tmp_path):
    """build_app hands every replica the whole config as JSON, `up` records it and `deploy --show`
    prints it: every option of every stage, defaults included, must read back as the same config."""
    from serve.app import localize_paths
    from serve.config import AppConfig
    from serve.up import local_config

    for config in (AppConfig(), localize_paths(local_config(model=None, data_dir=tmp_path, config_file=None))):
        dumped = config.model_dump(mode="json")
        assert AppConfig.model_validate(dumped).model_dump(mode="json") == dumped


def test_local_up_surges_every_deployment_of_its_tiny_models(tmp_path):
    from serve.up import local_config

    tiny = local_config(model=None, data_dir=tmp_path, config_file=None)
    keys = ["ingress", "runner", "text_to_image", "image_encoder", "sampler", "decoder", "video_encoder"]
    assert {key: getattr(tiny.stages, key).max_surge_percent for key in keys} == dict.fromkeys(keys, 100)
    assert tiny.stages.sampler.max_ongoing_requests == 1  # the registry's defaults are kept
    real = local_config(model="stabilityai/stable-video-diffusion-img2vid-xt-1-1", data_dir=tmp_path,
                        config_file=None)
    assert real.stages.sampler.max_surge_percent == 0  # real weights: a second copy may not fit the GPU


# -- the model version on the job --------------------------------------------------------------------------


def test_the_job_view_says_which_model_version_made_the_clip():
    from serve.api.views import job_view
    from serve.jobstore import Job, JobOutput, JobStatus

    job = Job(tenant="alice", model="svd-xt", status=JobStatus.QUEUED)
    assert job_view(job, "http://x").model_version is None
    done = job.model_copy(update={
        "status": JobStatus.COMPLETED, "finished_at": datetime.now(timezone.utc),
        "output": JobOutput(key="alice/vid/vid.mp4", content_type="video/mp4", file_name="vid.mp4", file_size=1,
                            model_version="svd-xt@0123456789ab")})
    view = job_view(done, "http://x").model_dump(mode="json")
    assert view["model_version"] == "svd-xt@0123456789ab" and view["model"] == "svd-xt"
    # A record stored before versions were recorded still reads.
    old = JobOutput.model_validate({"key": "k", "content_type": "video/mp4", "file_name": "f", "file_size": 1})
    assert old.model_version is None
