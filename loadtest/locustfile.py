"""Locust entry for the Locust CLI, its web UI and distributed runs (master + workers).

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --loadtest-profile loadtest/profiles/burst.yaml --loadtest-keys tenantA=KEY,tenantB=KEY \\
        --loadtest-out loadtest-results/burst

Prefer ``python -m loadtest.run`` on one machine (same users, plus replica sampling and a live
progress line). This file is what ``k8s/loadtest/`` runs: options also come from the environment
(``LOADTEST_PROFILE``, ``LOADTEST_KEYS``, ``LOADTEST_OUT``, ``LOADTEST_WORKERS``,
``LOADTEST_DASHBOARD_URL``). In a distributed run each worker runs 1/``LOADTEST_WORKERS`` of every
rate and budget, sends its job records to the master, and the master writes the report when the
shape ends the run (window + drain, or every worker done).

The users: :class:`~loadtest.users.JobUser` (submit, follow by poll or SSE, cancel, download) and
:class:`~loadtest.users.PollUser` (status-poll storm); the shape: :class:`~loadtest.users.ProfileShape`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import gevent
from locust import events
from locust.runners import MasterRunner, WorkerRunner

# Locust imports this file by path: make the package importable from a checkout or a ConfigMap.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.profile import load_profile  # noqa: E402
from loadtest.units import parse_keys  # noqa: E402
from loadtest.users import MSG_FINAL, MSG_FLUSH, MSG_RECORDS, JobUser, PollUser, ProfileShape, setup  # noqa: E402,F401

logger = logging.getLogger("loadtest")
FINAL_WAIT_S = 15.0


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser  # Locust's parser (not an argument group) knows include_in_web_ui / is_secret
    group.add_argument("--loadtest-profile", env_var="LOADTEST_PROFILE", default="smoke",
                       help="profile YAML or bundled profile name")
    group.add_argument("--loadtest-keys", env_var="LOADTEST_KEYS", default="", is_secret=True,
                       help="tenantA=KEY,tenantB=KEY (or one bare KEY)")
    group.add_argument("--loadtest-out", env_var="LOADTEST_OUT", default="loadtest-results",
                       help="directory for reports (one sub-directory per run)")
    group.add_argument("--loadtest-workers", env_var="LOADTEST_WORKERS", type=int, default=1,
                       help="number of Locust workers sharing the load (each runs 1/N of it)")
    group.add_argument("--loadtest-dashboard-url", env_var="LOADTEST_DASHBOARD_URL", default="",
                       help="Ray dashboard URL to sample replica counts from (master or local runner)")


@events.init.add_listener
def _init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # imported by loadtest.run, which sets things up itself
        return
    profile = load_profile(options.loadtest_profile)
    keys = parse_keys(options.loadtest_keys)
    runner = environment.runner
    workers = max(1, options.loadtest_workers) if isinstance(runner, WorkerRunner) else 1
    # A worker learns its index from the master's ack, after init: set up with a provisional index.
    state = setup(environment, profile, keys, index=0, workers=workers)
    state.options = options
    if isinstance(runner, MasterRunner):
        # Look the state up per message: every run starts with a fresh one (see _test_start).
        runner.register_message(MSG_RECORDS, lambda msg, **_: environment.loadtest.on_worker_message(msg))
        runner.register_message(MSG_FINAL, lambda msg, **_: environment.loadtest.on_worker_message(msg, final=True))
    elif isinstance(runner, WorkerRunner):
        runner.register_message(MSG_FLUSH, lambda msg, **_: _final_flush(environment))


def _final_flush(environment) -> None:
    """Worker: the run is over (the master says so, or this worker stops): settle and send everything."""
    state = environment.loadtest
    state.finish()
    state.flush_to_master(final=True)


@events.test_start.add_listener
def _test_start(environment, **_kwargs) -> None:
    state = getattr(environment, "loadtest", None)
    if state is None or environment.parsed_options is None:
        return
    runner = environment.runner
    # A fresh state per run (the web UI can start several), sliced by the worker's index, which a
    # worker only learns from the master's ack after init.
    index = max(0, runner.worker_index) if isinstance(runner, WorkerRunner) else 0
    state = setup(environment, state.profile, state.keys, index=index, workers=state.workers)
    state.options = environment.parsed_options
    state.start()
    state.run_started_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state.sampler = None
    url = environment.parsed_options.loadtest_dashboard_url
    if url and not isinstance(runner, WorkerRunner):
        from loadtest.replicas import DashboardSampler

        out = _run_dir(environment)
        out.mkdir(parents=True, exist_ok=True)
        state.sampler = DashboardSampler(url, out / "replicas.jsonl",
                                         interval=state.profile.replica_sample_interval).start()
    state.start_flusher()


def _run_dir(environment) -> Path:
    state = environment.loadtest
    if getattr(state, "run_dir", None) is None:
        stamp = datetime.fromtimestamp(state.t0_epoch or time.time(), timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        state.run_dir = Path(environment.parsed_options.loadtest_out) / f"{state.profile.name}-{stamp}"
    return state.run_dir


@events.test_stop.add_listener
def _test_stop(environment, **_kwargs) -> None:
    state = getattr(environment, "loadtest", None)
    if state is None or environment.parsed_options is None or getattr(state, "reported", False):
        return
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        _final_flush(environment)
        return
    state.finish()
    if isinstance(runner, MasterRunner):
        # A headless master ends with quit(), which fires test_stop before telling the workers
        # anything: ask them for their last records explicitly.
        runner.send_message(MSG_FLUSH)
        deadline = time.monotonic() + FINAL_WAIT_S
        while len(state.remote_final) < max(1, runner.worker_count) and time.monotonic() < deadline:
            gevent.sleep(0.5)
    _write_report(environment)


def _write_report(environment) -> None:
    from loadtest import report as reporting
    from loadtest.records import write_records
    from loadtest.replicas import read_samples

    state = environment.loadtest
    state.reported = True
    sampler = getattr(state, "sampler", None)
    if sampler is not None:
        sampler.stop()
    out = _run_dir(environment)
    out.mkdir(parents=True, exist_ok=True)
    records = state.all_records()
    http, _ = state.all_http()
    write_records(out / "records.jsonl", records)
    (out / "http.json").write_text(json.dumps([[m, n, s, c] for (m, n, s), c in sorted(http.items())]))
    meta = {"profile": state.profile.name, "profile_description": state.profile.description,
            "target": environment.host, "started_at": state.t0_epoch, "ended_at": time.time(),
            "started_iso": getattr(state, "run_started_iso", ""), "window_s": state.profile.duration,
            "drain_timeout_s": state.profile.drain_timeout, "max_jobs": state.profile.max_jobs,
            "concurrency": state.profile.concurrency, "stop_reason": state.stop_reason,
            "command": "locust -f loadtest/locustfile.py" + (" (distributed)" if state.remote else ""),
            "workers": len(state.remote) or 1, "profile_config": json.loads(state.profile.model_dump_json())}
    samples = read_samples(out / "replicas.jsonl")
    result = reporting.build_report(records, meta=meta, weights={t.name: t.weight for t in state.profile.tenants},
                                    http=http, replica_samples=samples,
                                    replica_source=f"dashboard {sampler.url}" if sampler else None,
                                    replica_error=None if sampler else "no --loadtest-dashboard-url")
    reporting.write_report(out, result)
    logger.info("load-test report written to %s\n%s", out, reporting.headline(result))
