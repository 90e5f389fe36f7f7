"""``svd-serve deploy CONFIG``: change the running application in place, no restart of Ray.

``svd-serve up`` starts Ray without its dashboard (≈900 MB less), so Ray's ``serve deploy``, a
client of the dashboard's REST API, has nothing to talk to. This command makes the same call the
REST handler makes (``PUT /api/serve/applications/``, ``dashboard/modules/serve/serve_head.py`` in
Ray 2.60: ``serve_start`` for the running controller, then ``ServeControllerClient.deploy_apps``,
i.e. ``ServeController.apply_config``) from a Ray driver connected to the cluster, then follows the
roll-out until the application is RUNNING again.

CONFIG is either

* an app config (``serve.config.AppConfig`` fields, what ``svd-serve up --config`` takes), applied
  as ``up`` would run it (the tenants file defaults to the data dir's), or
* a Serve config (``applications:``, like ``serve/serve_config.yaml``), applied as ``serve deploy``
  would, Serve's own per-deployment overrides (``deployments:``) included.

Relative paths in the app's args resolve against this command's working directory (``serve deploy``
leaves them to the cluster's). The running deployment is found through the state file ``svd-serve
up`` keeps in its data dir (``svd-serve.json``: its Ray address, HTTP address and the app config it
runs), or ``--address`` names a Ray cluster. A config that would move the job store, the outputs or
the tenants file elsewhere is refused unless ``--force``: queued jobs would be stranded in the old
store. What a change restarts and how running jobs survive it is in docs/operations.md ("Upgrades that fail no job").
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .local_state import STATE_FILE, DeployError, LocalState

__all__ = ["STATE_FILE", "DeployError", "LocalState", "Plan", "changed_paths", "deploy", "plan_deploy", "show"]

#: The application ``svd-serve up`` runs (serve.up.APP_NAME; repeated here so this module stays light).
DEFAULT_APP_NAME = "svd"
IMPORT_PATH = "serve.app:build_app"
#: Default bound on the wait for the application to be RUNNING again (replicas load models).
DEFAULT_TIMEOUT_S = 900.0
#: Least seconds between two progress lines while waiting.
PROGRESS_EVERY_S = 10.0
#: Sections of the app config that say where the durable state lives.
STATE_SECTIONS = ("job_store", "storage", "auth")


# -- reading and checking the config -------------------------------------------------------------


@dataclass
class Plan:
    """What will be applied: the Serve config (as Ray's REST API takes it), our application's app
    config, and lines for the operator (what changes, what is kept)."""

    serve_config: Any  # ray.serve.schema.ServeDeploySchema
    app_name: str
    app_config: Any = None  # serve.config.AppConfig of app_name, when it runs serve.app:build_app
    notes: list[str] = field(default_factory=list)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise DeployError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DeployError(f"{path}: cannot read it: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise DeployError(f"{path}: not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(raw, dict):
        raise DeployError(f"{path}: expected a mapping (an app config or a Serve config with applications:), "
                          f"not {type(raw).__name__}")
    return raw


def _app_config(args: Any, *, where: str):
    from pydantic import ValidationError

    from pipelines.params import describe_validation_error

    from .config import AppConfig

    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as error:
        raise DeployError(f"{where}: {describe_validation_error(error)}") from None
    except ValueError as error:  # stage_modules that cannot be imported, and the like
        raise DeployError(f"{where}: {error}") from None


def plan_deploy(raw: dict[str, Any], *, path: str | Path, state: LocalState | None, app_name: str | None,
                data_dir: Path, force: bool) -> Plan:
    """Validate ``raw`` (an app config or a Serve config) and turn it into the Serve config to apply.

    ``state``: the running ``svd-serve up`` (None with --address: no comparison with what runs)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from .app import localize_paths

    if "applications" in raw:
        try:
            serve_config = ServeDeploySchema.model_validate(raw)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            raise DeployError(f"{path}: not a valid Serve config: {where + ': ' if where else ''}{first['msg']}") from None
        names = [app.name for app in serve_config.applications]
        ours = [app.name for app in serve_config.applications if app.import_path == IMPORT_PATH]
        target = app_name or (state.app_name if state is not None else (ours or names)[0])
        if target not in names:
            raise DeployError(f"{path}: the running application is {target!r}, the config has "
                              f"{', '.join(map(repr, names))}: name it {target!r} (a second application on the same "
                              "route would not deploy, and Serve would keep the old one)")
        app_config = None
        for index, app in enumerate(serve_config.applications):
            if app.import_path != IMPORT_PATH:
                continue
            config = localize_paths(_app_config(app.args, where=f"{path}: applications[{index}].args"))
            app.args = config.model_dump(mode="json")
            if app.name == target:
                app_config = config
        plan = Plan(serve_config=serve_config, app_name=target, app_config=app_config)
        wanted = (serve_config.http_options.host, serve_config.http_options.port)
        if state is not None and "http_options" in raw and wanted != (state.host, state.port):
            plan.notes.append(f"http_options ({wanted[0]}:{wanted[1]}) cannot change while Serve runs: it keeps "
                              f"answering on {state.host}:{state.port}")
        elif state is not None and "http_options" not in raw:  # Serve's defaults would read as a change
            serve_config.http_options = type(serve_config.http_options)(host=state.host, port=state.port)
    else:
        from .up import local_config

        target = app_name or (state.app_name if state is not None else DEFAULT_APP_NAME)
        try:
            config = local_config(model=None, data_dir=Path(data_dir).resolve(), config_file=str(path))
        except ValidationError as error:
            from pipelines.params import describe_validation_error

            raise DeployError(f"{path}: {describe_validation_error(error)}") from None
        except ValueError as error:
            raise DeployError(f"{path}: {error}") from None
        config = localize_paths(config)
        http = {"host": state.host, "port": state.port} if state is not None else {}
        serve_config = ServeDeploySchema.model_validate({
            "http_options": http,
            "applications": [{"name": target, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": config.model_dump(mode="json")}],
        })
        plan = Plan(serve_config=serve_config, app_name=target, app_config=config)
    if state is not None and plan.app_config is not None:
        _compare(plan, before=state.config, force=force)
    return plan


def _compare(plan: Plan, *, before: dict[str, Any], force: bool) -> None:
    """Notes on what changes against the running app config; refuses moving the durable state."""
    after = plan.app_config.model_dump(mode="json")
    moved = [section for section in STATE_SECTIONS if before.get(section) != after.get(section)]
    if moved and not force:
        detail = "; ".join(f"{section}: {_short(before.get(section))} -> {_short(after.get(section))}"
                           for section in moved)
        raise DeployError(f"the new config moves {', '.join(moved)} ({detail}): queued and running jobs (and their "
                          "clips) would be stranded where they are; keep those sections as they are, or pass --force")
    changed = changed_paths(before, after)
    if not changed:
        plan.notes.append("the application's args are unchanged: no replica restarts "
                          "(Serve's own deployments: overrides, if any, still apply)")
    else:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        plan.notes.append(f"changed: {shown}; every deployment of the application gets a new version, so Serve "
                          "replaces its replicas batch by batch, each stopping replica finishing its work first")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def changed_paths(before: Any, after: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted paths (at most ``depth`` deep) where two JSON values differ."""
    if before == after:
        return []
    if depth == 0 or not isinstance(before, dict) or not isinstance(after, dict):
        return [prefix or "(all)"]
    paths: list[str] = []
    for key in sorted(set(before) | set(after), key=str):
        paths += changed_paths(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else str(key), depth - 1)
    return paths


# -- applying it ---------------------------------------------------------------------------------


def connect(address: str, *, auth_mode: str | None = None) -> None:
    """Join the Ray cluster at ``address`` as a driver (quietly). A local cluster that ``ray.init()``
    started uses token auth with the user's default token (``~/.ray/auth_token``), which Ray turns on
    by itself only for ``address="auto"``: here it is turned on the same way when the cluster uses it."""
    import ray

    if auth_mode == "token" and "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"  # what ray.init(address="auto") does, without its warning
        Config.initialize("")
    try:
        ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise DeployError(f"cannot connect to the Ray cluster at {address}: {str(error).splitlines()[0]}") from None


def apply(plan: Plan) -> None:
    """What the dashboard's ``PUT /api/serve/applications/`` does (Ray 2.60), on the connected cluster."""
    from ray.exceptions import RayTaskError
    from ray.serve._private.api import serve_start  # what the REST handler calls (serve_start_async there)

    # Serve's "Connecting to existing Serve app" and "HTTP config ... is ignored": the plan's notes say it.
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    config = plan.serve_config
    client = serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=config.grpc_options.model_dump(),
        global_logging_config=config.logging_config,
        controller_options=config.controller_options,
    )
    try:
        if config.logging_config:
            client.update_global_logging_config(config.logging_config)
        client.deploy_apps(config)
    except RayTaskError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise DeployError(f"the Serve controller refused the config: {lines[-1] if lines else error}") from None


def app_status(app_name: str) -> tuple[str | None, str, dict[str, Any]]:
    """The application's status, its message, and per deployment (status, replica states)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None, "", {}
    deployments = {name: (str(getattr(d.status, "value", d.status)),
                          {str(getattr(k, "value", k)): v for k, v in (d.replica_states or {}).items()})
                   for name, d in app.deployments.items()}
    return str(getattr(app.status, "value", app.status)), app.message or "", deployments


def wait_running(app_name: str, *, timeout_s: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Until the application is RUNNING again (every deployment on the new version and healthy);
    DeployError when it fails to deploy or the time runs out. Returns the deployments' states."""
    start = clock()
    last_line, last_said = "", float("-inf")
    while True:
        status, message, deployments = app_status(app_name)
        if status == "RUNNING":
            return deployments
        if status == "DEPLOY_FAILED":
            lines = [line for line in message.splitlines() if line.strip()]
            raise DeployError(f"the application failed to deploy: {lines[-1] if lines else 'no message'} "
                              "(the replicas that ran before keep serving)")
        if status is None:
            raise DeployError(f"the application {app_name!r} is gone")
        if clock() - start > timeout_s:
            raise DeployError(f"not RUNNING after {timeout_s:.0f}s (still {status}: {_progress(deployments)}); "
                              "Serve goes on rolling out, see `serve status` or the logs")
        line = f"{status}: {_progress(deployments)}"
        if line != last_line or clock() - last_said >= PROGRESS_EVERY_S:
            say(f"  {clock() - start:5.0f}s  {line}")
            last_line, last_said = line, clock()
        time.sleep(1.0)


def _progress(deployments: dict[str, Any]) -> str:
    busy = []
    for name, (status, replicas) in sorted(deployments.items()):
        if status != "HEALTHY" or set(replicas) - {"RUNNING"}:
            counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(replicas.items()) if count)
            busy.append(f"{name} {status.lower()} ({counts})")
    return "; ".join(busy) or "all healthy"


def draining(deployments: dict[str, Any]) -> int:
    """Replicas of the old version still finishing their work."""
    return sum(replicas.get("STOPPING", 0) for _, replicas in deployments.values())


# -- the command ---------------------------------------------------------------------------------


def deploy(config_path: str, *, data_dir: str, address: str | None, app_name: str | None, wait: bool,
           timeout_s: float, force: bool, say: Callable[[str], None] = print) -> int:
    data = Path(data_dir)
    state = None if address else LocalState.read(data)
    raw = load_yaml(config_path)
    plan = plan_deploy(raw, path=config_path, state=state, app_name=app_name, data_dir=data, force=force)
    for note in plan.notes:
        say(f"note: {note}")
    if address:
        connect(address)
    else:
        connect(state.gcs_address, auth_mode=state.auth_mode)
    try:
        started = time.monotonic()
        apply(plan)
        say(f"applied {config_path} to {plan.app_name!r}" + ("" if state is None else f" at {state.url}"))
        if state is not None and plan.app_config is not None:
            # Later commands (and `up`'s own shutdown, for the graceful periods) see what runs now.
            state.config = plan.app_config.model_dump(mode="json")
            state.write(data)
        if not wait:
            return 0
        deployments = wait_running(plan.app_name, timeout_s=timeout_s, say=say)
        left = draining(deployments)
        say(f"{plan.app_name!r} is RUNNING with the new config after {time.monotonic() - started:.0f}s"
            + (f"; {left} old replica(s) still finishing their work" if left else ""))
        return 0
    finally:
        import ray

        ray.shutdown()  # a driver's disconnect: the cluster runs on


def show(*, data_dir: str) -> int:
    """Print the app config the running ``svd-serve up`` runs, as YAML to edit and deploy back."""
    import yaml

    state = LocalState.read(Path(data_dir))
    print(f"# the app config {state.app_name!r} runs at {state.url} (svd-serve up, pid {state.pid}); edit it and "
          "apply it with: svd-serve deploy FILE")
    print(yaml.safe_dump(state.config, sort_keys=False), end="")
    return 0
