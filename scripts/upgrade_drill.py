#!/usr/bin/env python
"""The upgrade drill: change the running application's config and its model while jobs keep coming,
and count what became of every job.

On this machine it starts ``svd-serve up`` (tiny CPU models, SQLite job store, local storage) and a
steady trickle of small image-to-video jobs of one tenant, all naming the registered model
``drill``. Then, one after the other, the way docs/operations.md ("Upgrades that fail no job") tells an operator to:

1. **config change** (args): ``svd-serve deploy`` of an edited app config: the Sampler gets
   ``num_replicas: 2`` at half the CPUs. Every deployment gets a new version, so Serve replaces
   every replica; a long job is sampling on the old Sampler replica when the deploy starts.
2. **model change**: ``svd-serve models set drill --source <other tiny model>`` (new weights under
   the same id, a new version ``drill@digest``); no replica restarts.
3. with ``--long``, also a **lightweight change**: a Serve config whose ``deployments:`` override
   sets the Decoder to 2 replicas (Serve's own option, so no other replica restarts), and a
   **default model change**: the declared ``model.source`` (with ``model_id`` pinned) in an app
   config deploy.

Clients retry a 503 after its ``Retry-After`` with the same ``Idempotency-Key`` (as
``serve.client`` does). A job is *lost* when it was accepted (202) and never reached a terminal
state within the settle time. Prints one JSON report (submitted, accepted, refused, completed,
failed, lost, versions seen, each phase and its duration, the long job's attempts); exit status 1
if a job failed or was lost.

    python scripts/upgrade_drill.py [--rate 1.0] [--long] [--json out/upgrade_drill.json]

``tests/test_upgrade_drill.py`` runs the short form; docs/operations.md ("Upgrades that fail no job") records a long run.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TERMINAL = ("completed", "failed", "cancelled")
DRILL_MODEL = "drill"
#: The default model's id in the drill's app config (model_id pinned, so a new source keeps it).
DEFAULT_MODEL_ID = "tiny"
#: The deployments of the drill's application (stages.<key> of the app config).
DEPLOYMENTS = ("ingress", "runner", "image_encoder", "sampler", "decoder", "video_encoder")
#: A small job: about a second of work on the tiny model, so several are in flight at any time.
#: Every other job names the registered model ``drill``; the rest get the default model.
JOB_PARAMS = {"num_frames": 4, "num_inference_steps": 8, "width": 128, "height": 64}
#: What a replica logs when it loads a model version whose weights changed since the job started.
VERSION_RESTART_LOG = "it starts again on the new version"
#: The long job: sampling for several seconds, so a Sampler replacement finds it mid-sampling.
LONG_JOB_PARAMS = {"num_frames": 8, "num_inference_steps": 150, "width": 256, "height": 128, "model": DRILL_MODEL}
#: Most tries of one submit refused with 503 (each after its Retry-After, at most MAX_RETRY_WAIT_S).
MAX_SUBMIT_TRIES = 30
MAX_RETRY_WAIT_S = 2.0


# -- the clients' side -------------------------------------------------------------------------------


@dataclass
class Submission:
    key: str
    at: float  # time.time() of the first try
    model: str | None = None  # what the request named (None: the default model)
    tries: int = 0
    statuses: list[int] = field(default_factory=list)
    job_id: str | None = None
    accepted_at: float | None = None


class Trickle:
    """One submit every ``1/rate_per_s`` seconds from one thread; a 503 is retried after its
    Retry-After (the same Idempotency-Key) while the next submits wait their turn."""

    def __init__(self, base_url: str, api_key: str, *, rate_per_s: float, params: dict[str, Any], image: Path,
                 models: tuple[str | None, ...] = (None,)) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60.0, headers={"Authorization": f"Bearer {api_key}"})
        self.interval = 1.0 / rate_per_s
        self.body = {"image_url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode(), **params}
        self.models = models  # taken in turn; None: the request names no model (the default one)
        self.submissions: list[Submission] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upgrade-drill-load", daemon=True)

    def start(self) -> "Trickle":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def submit(self, body: dict[str, Any] | None = None) -> Submission:
        """One job, retried on 503 / transport errors; recorded."""
        if body is None:
            model = self.models[len(self.submissions) % len(self.models)]
            body = self.body if model is None else {**self.body, "model": model}
        sub = Submission(key=uuid.uuid4().hex, at=time.time(), model=body.get("model"))
        self.submissions.append(sub)
        while sub.tries < MAX_SUBMIT_TRIES:
            sub.tries += 1
            try:
                response = self.client.post("/v1/videos", json=body, headers={"Idempotency-Key": sub.key})
            except httpx.HTTPError:
                sub.statuses.append(0)
                time.sleep(0.5)
                continue
            sub.statuses.append(response.status_code)
            if response.status_code == 202:
                sub.job_id, sub.accepted_at = response.json()["id"], time.time()
                return sub
            if response.status_code != 503:
                return sub  # a refusal a retry cannot fix: counted as refused
            time.sleep(min(MAX_RETRY_WAIT_S, float(response.headers.get("Retry-After") or 1)))
        return sub

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.submit()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def job(self, job_id: str) -> dict[str, Any] | None:
        response = self.client.get(f"/v1/videos/{job_id}")
        return response.json() if response.status_code == 200 else None

    def settle(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Every accepted job, polled until terminal (or the time is up): id -> its last JSON."""
        pending = collections.deque(sub.job_id for sub in self.submissions if sub.job_id)
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            job_id = pending.popleft()
            try:
                job = self.job(job_id)
            except httpx.HTTPError:
                job = None
            if job is not None:
                seen[job_id] = job
                if job["status"] in TERMINAL:
                    continue
            pending.append(job_id)
            time.sleep(0.05 if len(pending) > 1 else 0.5)
        return seen


# -- the operator's side -----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    command: str
    started: float
    seconds: float
    output: str
    ok: bool


def svd_serve(*args: str, timeout_s: float = 900.0) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-m", "serve.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout_s)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def run_phase(name: str, args: list[str], say: Callable[[str], None]) -> Phase:
    started = time.time()
    ok, output = svd_serve(*args)
    phase = Phase(name=name, command="svd-serve " + " ".join(args), started=started,
                  seconds=round(time.time() - started, 1), output=output, ok=ok)
    say(f"[{phase.seconds:5.1f}s] {name}: {'ok' if ok else 'FAILED'}\n    " + output.replace("\n", "\n    "))
    return phase


# -- the drill ---------------------------------------------------------------------------------------


@dataclass
class DrillSettings:
    rate_per_s: float = 1.0
    warmup_s: float = 8.0
    between_s: float = 8.0
    tail_s: float = 8.0
    settle_s: float = 300.0
    long: bool = False
    #: max_surge_percent of every deployment (100: an old replica serves until its replacement is ready).
    surge: int = 100
    #: Sampling steps of the long job (the one sampling when the Sampler is replaced).
    long_job_steps: int = 150
    #: The Sampler's graceful_shutdown_timeout_s (None: the default, 600 s); shorter than the long
    #: job's sampling shows what happens when a replica is stopped before its work is done.
    sampler_grace_s: float | None = None


def app_config(data: Path, model_dir: Path, *, surge: int, sampler: dict[str, Any] | None = None,
               grace_s: float | None = None) -> dict[str, Any]:
    """The drill's app config: the tiny model (its id pinned), no text-to-image, state under ``data``;
    ``surge``: every deployment's max_surge_percent."""
    stages: dict[str, Any] = {name: {"max_surge_percent": surge} for name in DEPLOYMENTS}
    stages["sampler"].update(sampler or {})
    if grace_s is not None:
        stages["sampler"]["graceful_shutdown_timeout_s"] = grace_s
    return {
        "model": {"source": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "model_id": DEFAULT_MODEL_ID,
        "text_to_image_model": None,
        "storage": {"local_dir": str(data / "outputs")},
        "job_store": {"sqlite_path": str(data / "jobs.sqlite3")},
        "auth": {"tenants_file": str(data / "tenants.yaml")},
        "stages": stages,
    }


def run_drill(workdir: Path, model_a: Path, model_b: Path, settings: DrillSettings,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    from loadtest.local import LocalService
    from pipelines.sample_image import SAMPLE_IMAGE_PATH
    from serve.tenants import add_tenant

    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    key = add_tenant(data / "tenants.yaml", "drill", rate_limit_per_minute=600, burst=60, max_queued_jobs=1000,
                     max_running_jobs=16)
    first = data / "app.yaml"
    first.write_text(yaml.safe_dump(app_config(data, model_a, surge=settings.surge, grace_s=settings.sampler_grace_s)))
    store = f"sqlite:{data / 'jobs.sqlite3'}"
    service = LocalService(data, config=first, log_path=workdir / "up.log")
    phases: list[Phase] = []
    started = time.time()
    say(f"starting svd-serve up (data {data}) ...")
    service.start()
    say(f"ready in {time.time() - started:.0f}s at {service.url}")
    load = None
    try:
        phases.append(run_phase("register the drill model", ["models", "--job-store", store, "add", DRILL_MODEL,
                                                             "--source", str(model_a)], say))
        load = Trickle(service.url, key, rate_per_s=settings.rate_per_s, params=JOB_PARAMS, image=SAMPLE_IMAGE_PATH,
                       models=(DRILL_MODEL, None)).start()
        time.sleep(settings.warmup_s)

        # 1. The config change, with a long job sampling on the Sampler replica that gets replaced.
        long_job = load.submit({**load.body, **LONG_JOB_PARAMS, "model": DRILL_MODEL,
                                "num_inference_steps": settings.long_job_steps})
        sampling_at_deploy = _wait_sampling(load, long_job.job_id, timeout_s=60)
        second = data / "app-2.yaml"
        second.write_text(yaml.safe_dump(app_config(
            data, model_a, surge=settings.surge, grace_s=settings.sampler_grace_s,
            sampler={"num_replicas": 2, "max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 0.5}})))
        phases.append(run_phase("config change: Sampler 2 replicas x 0.5 CPU (args: every replica replaced)",
                                ["deploy", "--data-dir", str(data), str(second)], say))
        time.sleep(settings.between_s)

        # 2. The model change: new weights for the registered id, no restart.
        model_change = run_phase("model change: models set drill --source <tiny model, seed 1>",
                                 ["models", "--job-store", store, "set", DRILL_MODEL, "--source", str(model_b)], say)
        phases.append(model_change)
        changes = {DRILL_MODEL: model_change.started + model_change.seconds}
        if settings.long:
            time.sleep(settings.between_s)
            serve_config = data / "serve-config.yaml"
            serve_config.write_text(yaml.safe_dump({"applications": [{
                "name": "svd", "route_prefix": "/", "import_path": "serve.app:build_app",
                "args": yaml.safe_load(second.read_text()),
                "deployments": [{"name": "Decoder", "num_replicas": 2}]}]}))
            phases.append(run_phase("lightweight change: Serve config deployments: Decoder num_replicas 2",
                                    ["deploy", "--data-dir", str(data), str(serve_config)], say))
            time.sleep(settings.between_s)
            third = data / "app-3.yaml"
            config = yaml.safe_load(second.read_text())
            config["model"]["source"] = str(model_b)
            third.write_text(yaml.safe_dump(config))
            default_change = run_phase("default model change: model.source (model_id pinned) in the app config",
                                       ["deploy", "--data-dir", str(data), str(third)], say)
            phases.append(default_change)
            changes[DEFAULT_MODEL_ID] = default_change.started + default_change.seconds
        time.sleep(settings.tail_s)
        load.stop()
        say(f"load stopped: {len(load.submissions)} submitted; settling ...")
        outcomes = load.settle(settings.settle_s)
        report = tally(load.submissions, outcomes, changes=changes)
        report["long_job"] = _long_job_record(data, long_job, outcomes, sampling_at_deploy)
    finally:
        if load is not None:
            load._stop.set()
        stopping = time.time()
        clean = service.stop()
        say(f"svd-serve up stopped in {time.time() - stopping:.0f}s ({'clean' if clean else 'processes killed'})")
    report["version_restarts"] = count_in_session_logs(service.session, VERSION_RESTART_LOG)
    report["phases"] = [{"name": p.name, "command": p.command, "seconds": p.seconds, "ok": p.ok,
                         "at_s": round(p.started - started, 1)} for p in phases]
    report["settings"] = vars(settings)
    report["machine"] = {"host": platform.node(), "cpus": _cpus(), "python": platform.python_version(),
                         "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return report


def _wait_sampling(load: Trickle, job_id: str | None, *, timeout_s: float) -> dict[str, Any] | None:
    """Until the job's progress says sampling (its step and total then), or it ended / time ran out."""
    deadline = time.monotonic() + timeout_s
    while job_id and time.monotonic() < deadline:
        job = load.job(job_id)
        if job is not None and (job["progress_detail"]["stage"] == "sampling" or job["status"] in TERMINAL):
            return {"status": job["status"], "stage": job["progress_detail"]["stage"],
                    "step": job["progress_detail"]["step"], "total_steps": job["progress_detail"]["total_steps"]}
        time.sleep(0.1)
    return None


def _long_job_record(data: Path, sub: Submission, outcomes: dict[str, Any], at_deploy: Any) -> dict[str, Any]:
    from serve.jobstore.sqlite import SqliteJobStore

    job = outcomes.get(sub.job_id or "", {})
    record = SqliteJobStore(str(data / "jobs.sqlite3")).get(sub.job_id, tenant=None) if sub.job_id else None
    return {"id": sub.job_id, "at_deploy": at_deploy, "status": job.get("status"),
            "model_version": job.get("model_version"), "attempts": record.attempts if record else None,
            "timings": job.get("timings")}


def tally(submissions: list[Submission], outcomes: dict[str, dict[str, Any]], *,
          changes: dict[str, float]) -> dict[str, Any]:
    """Counts per outcome, the versions seen per model, and the jobs submitted after their model
    changed (``changes``: model id -> when the change was done) that still ran on its first version."""
    failed: dict[str, int] = {}
    lost, refused = [], collections.Counter()
    completed = cancelled = 0
    versions: collections.Counter = collections.Counter()
    first: dict[str, str] = {}  # model id -> the version its first completed job ran on
    for sub in submissions:
        job = outcomes.get(sub.job_id or "")
        version = (job or {}).get("model_version")
        if version:
            first.setdefault(version.rsplit("@", 1)[0], version)
    stale_after_change = []
    for sub in submissions:
        if sub.job_id is None:
            refused[str(sub.statuses[-1] if sub.statuses else 0)] += 1
            continue
        job = outcomes.get(sub.job_id)
        if job is None or job["status"] not in TERMINAL:
            lost.append(sub.job_id)
        elif job["status"] == "completed":
            completed += 1
            version = job.get("model_version") or "none"
            versions[version] += 1
            model_id = version.rsplit("@", 1)[0]
            if model_id in changes and sub.at > changes[model_id] and version == first.get(model_id):
                stale_after_change.append(sub.job_id)
        elif job["status"] == "cancelled":
            cancelled += 1
        else:
            code = (job.get("error") or {}).get("code", "unknown")
            failed[code] = failed.get(code, 0) + 1
    retried = [sub for sub in submissions if sub.tries > 1]
    return {
        "submitted": len(submissions), "accepted": sum(1 for s in submissions if s.job_id), "refused": dict(refused),
        "completed": completed, "failed": failed, "cancelled": cancelled, "lost": len(lost), "lost_ids": lost,
        "submits_retried": len(retried), "answers_503": sum(s.statuses.count(503) for s in submissions),
        "longest_submit_s": round(max((s.accepted_at - s.at for s in submissions if s.accepted_at), default=0), 1),
        "versions": dict(sorted(versions.items())), "old_version_after_model_change": stale_after_change,
    }


def count_in_session_logs(session: str | None, phrase: str) -> int | None:
    """Lines holding ``phrase`` in the logs of the Ray session (None: the session is unknown)."""
    if not session or not session.startswith("session_"):
        return None
    from ray._common.utils import get_default_ray_temp_dir  # pinned ray==2.60.0

    logs = Path(get_default_ray_temp_dir()) / session / "logs"
    count = 0
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            with open(path, errors="replace") as handle:
                count += sum(phrase in line for line in handle)
    return count


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1.0, help="jobs submitted per second (default 1)")
    parser.add_argument("--phase-gap", type=float, default=20.0, help="seconds of load before, between and after "
                        "the changes (default 20)")
    parser.add_argument("--long", action="store_true", help="also a lightweight Serve override and a default-model "
                        "change")
    parser.add_argument("--surge", type=int, default=100, help="max_surge_percent of every deployment (default 100; "
                        "0: an old replica stops while its replacement starts)")
    parser.add_argument("--sampler-grace", type=float, default=None, help="the Sampler's graceful_shutdown_timeout_s "
                        "(default: the config's, 600 s); below the long job's sampling time it is stopped mid-job")
    parser.add_argument("--long-job-steps", type=int, default=150, help="sampling steps of the job that is "
                        "sampling when the Sampler is replaced (default 150)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.phase_gap < 0:
        parser.error("--rate must be positive and --phase-gap not negative")
    from pipelines.tiny import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="svd-upgrade-drill-") as scratch:
        work = Path(scratch)
        model_a, model_b = write_tiny_model(work / "tiny-a", seed=0), write_tiny_model(work / "tiny-b", seed=1)
        settings = DrillSettings(rate_per_s=args.rate, warmup_s=args.phase_gap, between_s=args.phase_gap,
                                 tail_s=args.phase_gap, long=args.long, surge=args.surge,
                                 sampler_grace_s=args.sampler_grace, long_job_steps=args.long_job_steps)
        report = run_drill(work, Path(model_a), Path(model_b), settings,
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 1 if report["failed"] or report["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
