"""One headless load-test session in this process: its options, the Locust run, the report, the exit status.

:func:`run_cli` is the command line of ``python -m loadtest.run`` (and ``svd-serve loadtest``,
``python -m loadtest.local``); the caller passes the handler of ``--local`` (``loadtest.local``
starts the service, then calls :func:`execute` and :func:`finish` here), so this module never
imports the one that manages the service.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from .profile import Profile, load_profile
from .stages import stage_deployments
from .units import parse_duration, parse_keys

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: The ``--local`` handler: ``run_local(profile, out=, args=, command=)`` -> exit status.
LocalRunner = Callable[..., int]


def build_parser(prog: str = "python -m loadtest.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a load-test profile against svd-serve and write a report.")
    parser.add_argument("--target", help="base URL of the API, e.g. http://127.0.0.1:8000 (not with --local)")
    parser.add_argument("--profile", required=True, help="profile YAML, or the name of a bundled one (smoke, burst, ...)")
    parser.add_argument("--duration", help="override the profile's load window, e.g. 2m, 90s")
    parser.add_argument("--max-jobs", type=int, help="override the profile's max_jobs")
    parser.add_argument("--keys", default="", help="API keys: tenantA=KEY,tenantB=KEY (or one bare KEY for every tenant); "
                        "also read from the LOADTEST_KEYS environment variable")
    parser.add_argument("--out", help="report directory (default: loadtest-results/<profile>-<UTC time>)")
    parser.add_argument("--local", action="store_true",
                        help="start `svd-serve up` on a free port in a temp data dir, create the profile's tenants, "
                             "run, and shut it down")
    parser.add_argument("--keep-data", action="store_true", help="with --local: keep the temp data dir")
    parser.add_argument("--serve-config", help="with --local: application config YAML for `svd-serve up --config` "
                        "(default: tiny CPU model, Sampler autoscaling 1-2)")
    parser.add_argument("--ray-address", help="GCS address of the cluster to sample replica counts from (this machine)")
    parser.add_argument("--dashboard-url", help="Ray dashboard URL to sample replica counts from (remote clusters)")
    parser.add_argument("--no-replicas", action="store_true", help="do not sample replica counts")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 unless jobs completed, no 5xx, no connection errors, no failed jobs")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


def resolve_profile(args: argparse.Namespace) -> Profile:
    profile = load_profile(args.profile)
    update = {}
    if args.duration:
        update["duration"] = parse_duration(args.duration)
    if args.max_jobs:
        update["max_jobs"] = args.max_jobs
    return Profile.model_validate({**profile.model_dump(), **update}) if update else profile


def default_out(profile: Profile) -> Path:
    return Path("loadtest-results") / f"{profile.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def _replica_sampler(args: argparse.Namespace, target: str, out: Path, interval: float):
    """(sampler or None, source description, error or None)."""
    from .replicas import DashboardSampler, RaySamplerProcess, gcs_address_for_port

    if args.no_replicas:
        return None, None, "disabled (--no-replicas)"
    path = out / "replicas.jsonl"
    if args.dashboard_url:
        return DashboardSampler(args.dashboard_url, path, interval=interval).start(), f"dashboard {args.dashboard_url}", None
    address = args.ray_address
    parsed = urlparse(target)
    if address is None and parsed.hostname in LOOPBACK:
        address = gcs_address_for_port(parsed.port or (443 if parsed.scheme == "https" else 80))
    if address is None:
        return None, None, "no Ray cluster found for the target (pass --ray-address or --dashboard-url)"
    return RaySamplerProcess(address, path, interval=interval).start(), f"ray {address} (serve.status())", None


class ProgressLine:
    """One status line on stderr, rewritten in place on a terminal (a line every 10 s otherwise)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_plain = 0.0
        self.width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self.width - len(text))
            sys.stderr.write("\r" + text + " " * pad)
            sys.stderr.flush()
            self.width = len(text)
        elif time.monotonic() - self.last_plain >= 10.0:
            self.last_plain = time.monotonic()
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_text(state, replicas_path: Path | None) -> str:
    from .report import percentile

    records = state.records
    done = [r for r in records if r.status == "completed"]
    counts = {s: sum(1 for r in records if r.status == s) for s in ("failed", "cancelled", "rejected")}
    sent = sum(1 for r in records if r.submitted_at is not None)
    in_flight = sum(1 for r in state.active.values() if r.submitted_at is not None)
    e2e = percentile([(r.done_at or r.terminal_at) - r.submitted_at for r in done
                      if (r.done_at or r.terminal_at) and r.submitted_at], 50)
    phase = "load" if state.in_window else "drain"
    text = (f"[{state.elapsed():5.0f}s {phase} {state.profile.duration:.0f}s] sent {sent}/{state.queue.max_jobs} "
            f"in flight {in_flight} | done {len(done)} failed {counts['failed']} cancelled {counts['cancelled']} "
            f"rejected {counts['rejected']} | e2e p50 {'-' if e2e is None else f'{e2e:.1f}s'} | req {state.requests}")
    if replicas_path is not None and replicas_path.exists():
        try:
            last = replicas_path.read_text().strip().splitlines()[-1]
            deployments = json.loads(last)["deployments"]
            stages = stage_deployments()
            text += " | " + " ".join(f"{n[:7]}={d['running']}" for n, d in deployments.items() if n in stages)
        except (IndexError, KeyError, ValueError):
            pass
    return text


def execute(profile: Profile, *, target: str, keys: dict[str, str], out: Path, args: argparse.Namespace,
            command: str, weights: dict[str, float] | None = None) -> dict:
    """Run ``profile`` against ``target``; write and return the report."""
    import gevent
    from locust.env import Environment
    from locust.runners import STATE_STOPPED

    from . import report as reporting
    from .records import write_records
    from .replicas import read_samples
    from .users import JobUser, PollUser, ProfileShape, setup

    out.mkdir(parents=True, exist_ok=True)
    classes = [JobUser] + ([PollUser] if profile.poll_storm else [])
    env = Environment(user_classes=classes, shape_class=ProfileShape(), host=target.rstrip("/"),
                      catch_exceptions=True)
    state = setup(env, profile, keys)
    runner = env.create_local_runner()
    sampler, source, replica_error = _replica_sampler(args, target, out, profile.replica_sample_interval)
    progress = ProgressLine(enabled=not args.quiet)
    started_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = _load_average()
    try:
        state.start()
        runner.start_shape()
        while runner.state != STATE_STOPPED:
            gevent.sleep(1.0)
            progress.update(progress_text(state, out / "replicas.jsonl" if sampler else None))
    except KeyboardInterrupt:
        state.stop_reason = "interrupted (Ctrl-C)"
    finally:
        progress.close()
        runner.quit()
        state.finish()
        if sampler is not None:
            sampler.stop()
            if getattr(sampler, "last_error", None) and not read_samples(out / "replicas.jsonl"):
                replica_error = f"sampler failed: {sampler.last_error}"
    ended = time.time()
    write_records(out / "records.jsonl", state.records)
    (out / "http.json").write_text(json.dumps([[m, n, s, c] for (m, n, s), c in sorted(state.http.items())]))
    meta = {
        "profile": profile.name, "profile_description": profile.description, "target": target,
        "started_at": state.t0_epoch, "ended_at": ended, "started_iso": started_iso,
        "window_s": profile.duration, "drain_timeout_s": profile.drain_timeout, "max_jobs": profile.max_jobs,
        "concurrency": profile.concurrency, "stop_reason": state.stop_reason, "command": command,
        "client_exceptions": sum(e["count"] for e in runner.exceptions.values()),
        "host": {"cpus": os.cpu_count(), "load_avg_1m_start": load_start, "load_avg_1m_end": _load_average()},
        "profile_config": json.loads(profile.model_dump_json()),
    }
    weights = weights or {t.name: t.weight for t in profile.tenants}
    result = reporting.build_report(state.records, meta=meta, weights=weights, http=state.http,
                                    replica_samples=read_samples(out / "replicas.jsonl"), replica_source=source,
                                    replica_error=replica_error)
    reporting.write_report(out, result)
    return result


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_cli(argv: Sequence[str] | None = None, *, prog: str = "python -m loadtest.run",
            run_local: LocalRunner | None = None) -> int:
    """Parse the command line, run the profile and write the report; returns the exit status.

    ``run_local(profile, out=, args=, command=)`` runs ``--local`` (start a service, run, stop it).
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        profile = resolve_profile(args)
    except (OSError, ValueError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(profile)
    command = " ".join([prog, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    if args.local:
        if args.target:
            parser.error("--local starts its own service: leave out --target")
        if run_local is None:
            parser.error("--local is not available here")
        return run_local(profile, out=out, args=args, command=command)
    if not args.target:
        parser.error("--target is required (or use --local)")
    target = args.target.rstrip("/")
    try:
        keys = parse_keys(args.keys or os.environ.get("LOADTEST_KEYS", ""))
    except ValueError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    missing = [t.name for t in profile.tenants if t.name not in keys and "*" not in keys]
    if missing:
        print(f"loadtest: no API key for tenant(s) {', '.join(missing)} of profile {profile.name}: pass "
              "--keys NAME=KEY,... (or one bare KEY for every tenant)", file=sys.stderr)
        return 2
    print(profile.summary(), file=sys.stderr)
    result = execute(profile, target=target, keys=keys, out=out, args=args, command=command)
    return finish(result, out, strict=args.strict)


def finish(result: dict, out: Path, *, strict: bool) -> int:
    from .report import headline

    print(headline(result))
    print(f"report: {out / 'report.md'} (JSON: {out / 'report.json'})")
    if strict:
        wanted = ("completed_jobs", "no_5xx", "no_connection_errors", "no_failed_jobs")
        if not all(result["checks"][name] for name in wanted):
            return 1
    return 0
