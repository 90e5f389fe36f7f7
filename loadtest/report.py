"""The load-test report: statistics from per-job records, as JSON, Markdown and PNG charts.

    python -m loadtest.report DIR          # rebuild report.{json,md} and charts from DIR/records.jsonl

Definitions (all per job; latencies use completed jobs only):

* queue wait = ``started_at - created_at`` (both the service's clock: admission to first claim)
* time to first progress = first time the client saw the job leave the queue - POST sent
  (resolution: the poll interval, or immediate with SSE)
* end-to-end = clip downloaded (or terminal state seen, without download) - POST sent
* service time = ``finished_at - created_at`` (the service's clock)
* stage busy = sum of a stage's timings over completed jobs / wall time of the run; divided by the
  mean number of replicas of the stage it is the utilisation of that stage
* a tenant's share of work = its completed GPU-stage seconds (the stages that load model
  components: image_encode + sampling + decode) / everybody's; compare it with its share of the
  weights (fair share holds under contention only)

Stage and deployment names come from the stage registry (:mod:`loadtest.stages`).

No Locust import: unit-tested on known inputs.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from .records import JobRecord, read_records
from .stages import deployment_of, deployment_order, gpu_stages, timing_names

LAG_WARNING_S = 2.0


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return float(data[low] + (data[high] - data[low]) * (rank - low))


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    data = [float(v) for v in values if v is not None]
    if not data:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {"n": len(data), "mean": sum(data) / len(data), "min": min(data), "p50": percentile(data, 50),
            "p95": percentile(data, 95), "p99": percentile(data, 99), "max": max(data)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def queue_wait(r: JobRecord) -> float | None:
    return _diff(r.started_at, r.created_at)


def first_progress(r: JobRecord) -> float | None:
    return _diff(r.first_progress_at, r.submitted_at)


def end_to_end(r: JobRecord) -> float | None:
    return _diff(r.done_at or r.terminal_at, r.submitted_at)


def service_time(r: JobRecord) -> float | None:
    return _diff(r.finished_at, r.created_at)


def arrival_lag(r: JobRecord) -> float | None:
    return _diff(r.submitted_at, r.scheduled_at)


def gpu_seconds(r: JobRecord) -> float:
    return sum(float(r.timings.get(stage, 0.0)) for stage in gpu_stages())


def latency_block(records: Sequence[JobRecord]) -> dict[str, Any]:
    completed = [r for r in records if r.status == "completed"]
    return {
        "queue_wait_s": summarize(queue_wait(r) for r in completed),
        "first_progress_s": summarize(first_progress(r) for r in completed),
        "end_to_end_s": summarize(end_to_end(r) for r in completed),
        "service_s": summarize(service_time(r) for r in completed),
    }


def status_counts(records: Sequence[JobRecord]) -> dict[str, int]:
    counts = Counter(r.status for r in records)
    out = {name: counts.get(name, 0) for name in ("completed", "failed", "cancelled", "rejected", "unfinished",
                                                  "not_sent", "error")}
    out["submitted"] = sum(1 for r in records if r.submitted_at is not None)
    out["accepted"] = sum(1 for r in records if r.submit_status == 202)
    out["scheduled"] = len(records)
    return out


def completed_per_minute(records: Sequence[JobRecord], t0: float, t_end: float, *,
                         bin_s: float = 60.0) -> list[dict[str, Any]]:
    """Completed jobs per bin (by the time the client saw them complete), as counts and per-minute rates."""
    span = max(t_end - t0, 1e-9)
    bins = max(1, math.ceil(span / bin_s))
    counts = [0] * bins
    for r in records:
        if r.status == "completed" and r.terminal_at is not None:
            index = min(max(int((r.terminal_at - t0) // bin_s), 0), bins - 1)
            counts[index] += 1
    out = []
    for i, n in enumerate(counts):
        width = min(bin_s, span - i * bin_s)
        out.append({"start_s": i * bin_s, "completed": n, "per_minute": n * 60.0 / width if width > 0 else 0.0})
    return out


def tenant_shares(records: Sequence[JobRecord], weights: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each tenant's share of completed jobs and of completed GPU work, beside its share of the weights.

    Weights are normalised over the tenants that submitted something in the run.
    """
    by_tenant: dict[str, list[JobRecord]] = defaultdict(list)
    for r in records:
        by_tenant[r.tenant].append(r)
    active = [t for t, rs in by_tenant.items() if any(r.submitted_at is not None for r in rs)]
    total_weight = sum(weights.get(t, 1.0) for t in active) or 1.0
    completed = {t: [r for r in rs if r.status == "completed"] for t, rs in by_tenant.items()}
    total_jobs = sum(len(v) for v in completed.values())
    work = {t: sum(gpu_seconds(r) or r.work_units for r in rs) for t, rs in completed.items()}
    total_work = sum(work.values())
    out = {}
    for tenant in sorted(by_tenant):
        weight = weights.get(tenant, 1.0)
        weight_share = weight / total_weight if tenant in active else 0.0
        work_share = work[tenant] / total_work if total_work else 0.0
        out[tenant] = {
            "weight": weight,
            "weight_share": weight_share,
            "completed": len(completed[tenant]),
            "job_share": len(completed[tenant]) / total_jobs if total_jobs else 0.0,
            "work_s": work[tenant],
            "work_share": work_share,
            "share_vs_weight": work_share / weight_share if weight_share else None,
        }
    return out


def rejections_by_tenant(records: Sequence[JobRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.status == "rejected" and r.submit_status is not None:
            out[r.tenant][str(r.submit_status)] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(out.items())}


def stage_busy(records: Sequence[JobRecord], wall_s: float,
               mean_replicas: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    completed = [r for r in records if r.status == "completed"]
    out = {}
    for stage in timing_names():
        values = [float(r.timings[stage]) for r in completed if stage in r.timings]
        if not values:
            continue
        busy = sum(values)
        fraction = busy / wall_s if wall_s > 0 else None
        deployment = deployment_of(stage)
        replicas = (mean_replicas or {}).get(deployment)
        out[stage] = {
            "deployment": deployment,
            "jobs": len(values),
            "busy_s": busy,
            "busy_fraction": fraction,
            "mean_replicas": replicas,
            "utilisation": fraction / replicas if fraction is not None and replicas else None,
            "seconds": summarize(values),
        }
    return out


def _spans(records: Sequence[JobRecord], t_end: float) -> list[tuple[float, float]]:
    """(submitted, seen finished) of every admitted job; still running ones end at ``t_end``."""
    return [(r.submitted_at, r.terminal_at or r.done_at or t_end) for r in records
            if r.submitted_at is not None and r.status != "rejected"]


def in_flight_series(records: Sequence[JobRecord], t0: float, t_end: float, *,
                     step_s: float = 1.0) -> list[tuple[float, int]]:
    """(seconds since start, jobs in flight at some point of [t, t + step)) for each step.

    Counting overlap with the interval, not the instant, keeps jobs shorter than a step visible.
    """
    spans = _spans(records, t_end)
    out = []
    steps = max(1, int(math.ceil((t_end - t0) / step_s)))
    for i in range(steps + 1):
        t = t0 + i * step_s
        out.append((i * step_s, sum(1 for a, b in spans if a < t + step_s and b > t)))
    return out


def max_in_flight(records: Sequence[JobRecord], t_end: float) -> int:
    """The most jobs in flight at one instant (a sweep over submissions and completions)."""
    events = sorted([(a, 1) for a, _ in _spans(records, t_end)] + [(b, -1) for _, b in _spans(records, t_end)],
                    key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def replica_summary(samples: Sequence[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Per deployment: min/max/mean running replicas, and the timeline of changes."""
    series: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s["t"]):
        for name, detail in (sample.get("deployments") or {}).items():
            series[name].append((sample["t"] - t0, int(detail.get("running", 0))))
    order = deployment_order()
    out: dict[str, Any] = {}
    for name in sorted(series, key=lambda n: (order.index(n) if n in order else len(order), n)):
        points = series[name]
        counts = [n for _, n in points]
        changes = [points[0]] + [p for prev, p in zip(points, points[1:]) if p[1] != prev[1]]
        out[name] = {
            "min": min(counts), "max": max(counts), "mean": _time_weighted_mean(points),
            "first": counts[0], "last": counts[-1],
            "changes": [{"t_s": round(t, 1), "running": n} for t, n in changes],
        }
    return out


def _time_weighted_mean(points: Sequence[tuple[float, int]]) -> float:
    if len(points) == 1:
        return float(points[0][1])
    total = sum((b[0] - a[0]) * a[1] for a, b in zip(points, points[1:]))
    span = points[-1][0] - points[0][0]
    return total / span if span > 0 else float(points[-1][1])


def http_block(http: dict[tuple[str, str, int], int]) -> dict[str, Any]:
    by_status: Counter[str] = Counter()
    by_endpoint: dict[str, Counter] = defaultdict(Counter)
    for (method, name, status), n in http.items():
        by_status[str(status)] += n
        by_endpoint[name if name.startswith(method) else f"{method} {name}"][str(status)] += n
    errors = {code: n for code, n in by_status.items() if code == "0" or int(code) >= 400}
    return {
        "requests": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "errors_by_status": dict(sorted(errors.items())),
        "errors_5xx": sum(n for code, n in by_status.items() if code != "0" and int(code) >= 500),
        "connection_errors": by_status.get("0", 0),
        "by_endpoint": {k: dict(sorted(v.items())) for k, v in sorted(by_endpoint.items())},
    }


def cancellation_block(records: Sequence[JobRecord]) -> dict[str, Any]:
    planned = [r for r in records if r.cancel_planned_after is not None]
    requested = [r for r in records if r.cancel_requested_at is not None]
    outcomes = Counter(r.status for r in requested)
    return {
        "planned": len(planned),
        "requested": len(requested),
        "answered": dict(sorted(Counter(str(r.cancel_status) for r in requested).items())),
        "outcome": dict(sorted(outcomes.items())),
        "cancel_to_terminal_s": summarize(_diff(r.terminal_at, r.cancel_requested_at)
                                          for r in requested if r.status == "cancelled"),
    }


def download_block(records: Sequence[JobRecord]) -> dict[str, Any]:
    tried = [r for r in records if r.download_status is not None]
    return {
        "downloads": len(tried),
        "ok": sum(1 for r in tried if r.download_ok),
        "failed": sum(1 for r in tried if not r.download_ok),
        "bytes": sum(r.download_bytes or 0 for r in tried),
        "seconds": summarize(r.download_s for r in tried),
    }


def build_report(records: Sequence[JobRecord], *, meta: dict[str, Any], weights: dict[str, float],
                 http: dict[tuple[str, str, int], int] | None = None,
                 replica_samples: Sequence[dict[str, Any]] = (), replica_source: str | None = None,
                 replica_error: str | None = None) -> dict[str, Any]:
    """The machine-readable report (``report.json``)."""
    records = list(records)
    t0 = float(meta["started_at"])
    ends = [r.done_at or r.terminal_at for r in records if (r.done_at or r.terminal_at)]
    t_end = float(meta.get("ended_at") or max(ends, default=t0))
    wall = max(t_end - t0, 1e-9)
    counts = status_counts(records)
    tenants = sorted({r.tenant for r in records} | set(weights))
    replicas = replica_summary(replica_samples, t0) if replica_samples else {}
    mean_replicas = {name: block["mean"] for name, block in replicas.items()}
    step = max(1.0, round(wall / 300.0))
    lag = summarize(arrival_lag(r) for r in records)
    report: dict[str, Any] = {
        "meta": {**meta, "wall_s": wall},
        "jobs": counts,
        "throughput": {
            "completed_per_minute": counts["completed"] * 60.0 / wall,
            "videos_per_hour": counts["completed"] * 3600.0 / wall,
            "per_minute": completed_per_minute(records, t0, t_end, bin_s=60.0),
            "per_bin": completed_per_minute(records, t0, t_end, bin_s=10.0 if wall <= 600 else 60.0),
        },
        "latency": {
            "overall": latency_block(records),
            "per_tenant": {t: latency_block([r for r in records if r.tenant == t]) for t in tenants},
        },
        "per_tenant_jobs": {t: status_counts([r for r in records if r.tenant == t]) for t in tenants},
        "http": http_block(http or {}),
        "rejections_per_tenant": rejections_by_tenant(records),
        "fairness": tenant_shares(records, weights),
        "stages": stage_busy(records, wall, mean_replicas),
        "replicas": {"source": replica_source, "samples": len(replica_samples), "error": replica_error,
                     "deployments": replicas},
        "load": {"in_flight": [[t, n] for t, n in in_flight_series(records, t0, t_end, step_s=step)],
                 "step_s": step, "max_in_flight": max_in_flight(records, t_end)},
        "arrival_lag_s": lag,
        "cancellations": cancellation_block(records),
        "downloads": download_block(records),
    }
    report["checks"] = {
        "completed_jobs": counts["completed"] > 0,
        "no_5xx": report["http"]["errors_5xx"] == 0,
        "no_connection_errors": report["http"]["connection_errors"] == 0,
        "no_failed_jobs": counts["failed"] == 0,
        "downloads_ok": report["downloads"]["failed"] == 0,
        "generator_kept_up": (lag["p95"] or 0.0) <= LAG_WARNING_S,
    }
    return report


# -- rendering ----------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def render_markdown(report: dict[str, Any], charts: Sequence[str] = ()) -> str:
    meta, jobs, thr = report["meta"], report["jobs"], report["throughput"]
    lines = [f"# Load test: {meta.get('profile', '?')}", ""]
    lines += [f"- target: `{meta.get('target')}`", f"- started: {meta.get('started_iso', '')}, wall "
              f"{meta['wall_s']:.1f}s (load window {meta.get('window_s', 0):.0f}s)",
              f"- stopped because: {meta.get('stop_reason', '?')}"]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    host = meta.get("host") or {}
    if host:
        lines.append(f"- load generator host: {host.get('cpus')} CPUs, load average {host.get('load_avg_1m_start')} "
                     f"at start, {host.get('load_avg_1m_end')} at end (a busy host skews latencies)")
    failed_checks = [name for name, ok in report["checks"].items() if not ok]
    lines += [f"- checks: {'all passed' if not failed_checks else 'FAILED: ' + ', '.join(failed_checks)}", ""]

    lines += ["## Headline", "", "| figure | value |", "| --- | --- |",
              f"| jobs scheduled / submitted / accepted | {jobs['scheduled']} / {jobs['submitted']} / {jobs['accepted']} |",
              f"| completed / failed / cancelled | {jobs['completed']} / {jobs['failed']} / {jobs['cancelled']} |",
              f"| rejected / unfinished at stop | {jobs['rejected']} / {jobs['unfinished']} |",
              f"| throughput | {thr['completed_per_minute']:.2f} completed jobs/min ({thr['videos_per_hour']:.0f} videos/h) |",
              f"| max jobs in flight | {report['load']['max_in_flight']} |",
              f"| HTTP requests / 5xx / connection errors | {report['http']['requests']} / {report['http']['errors_5xx']} "
              f"/ {report['http']['connection_errors']} |",
              f"| arrival lag p50 / p95 | {_s(report['arrival_lag_s']['p50'])}s / {_s(report['arrival_lag_s']['p95'])}s |",
              ""]
    if (report["arrival_lag_s"]["p95"] or 0) > LAG_WARNING_S:
        lines += [f"> The load generator fell behind its schedule (arrival lag p95 > {LAG_WARNING_S:.0f}s): every job "
                  "client was busy. Raise `concurrency` in the profile for a true open-loop test.", ""]

    lines += ["## Latency (completed jobs, seconds)", "", "| scope | metric | n | p50 | p95 | p99 | max |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    scopes = [("all", report["latency"]["overall"])] + list(report["latency"]["per_tenant"].items())
    for scope, block in scopes:
        for metric, label in (("queue_wait_s", "queue wait"), ("first_progress_s", "first progress"),
                              ("end_to_end_s", "end-to-end"), ("service_s", "service time")):
            s = block[metric]
            if s["n"] == 0 and scope != "all":
                continue
            lines.append(f"| {scope} | {label} | {s['n']} | {_s(s['p50'])} | {_s(s['p95'])} | {_s(s['p99'])} | {_s(s['max'])} |")
    lines.append("")

    lines += ["## Tenants", "", "| tenant | weight | weight share | completed | job share | GPU work (s) | work share "
              "| work share / weight share | rejected (by status) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rejections = report["rejections_per_tenant"]
    for tenant, f in report["fairness"].items():
        rej = ", ".join(f"{code}: {n}" for code, n in rejections.get(tenant, {}).items()) or "0"
        lines.append(f"| {tenant} | {f['weight']:g} | {_pct(f['weight_share'])} | {f['completed']} | {_pct(f['job_share'])} "
                     f"| {f['work_s']:.1f} | {_pct(f['work_share'])} | {_s(f['share_vs_weight'])} | {rej} |")
    lines += ["", "Fair share only shows while tenants compete (jobs waiting in the queue); an idle service "
              "runs whatever arrives.", ""]

    lines += ["## Stages", "", "| stage | deployment | jobs | mean s | p95 s | busy s | busy / wall | mean replicas "
              "| utilisation |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, b in report["stages"].items():
        lines.append(f"| {stage} | {b['deployment']} | {b['jobs']} | {_s(b['seconds']['mean'])} | {_s(b['seconds']['p95'])} "
                     f"| {b['busy_s']:.1f} | {_pct(b['busy_fraction'])} | {_s(b['mean_replicas'])} | {_pct(b['utilisation'])} |")
    lines.append("")

    rep = report["replicas"]
    lines += ["## Replicas (autoscaling)", ""]
    if rep["deployments"]:
        lines += [f"Sampled {rep['samples']} times from {rep['source']}.", "",
                  "| deployment | min | max | mean | timeline (t s: running) |", "| --- | --- | --- | --- | --- |"]
        for name, d in rep["deployments"].items():
            timeline = ", ".join(f"{c['t_s']:.0f}: {c['running']}" for c in d["changes"][:12])
            lines.append(f"| {name} | {d['min']} | {d['max']} | {d['mean']:.2f} | {timeline} |")
    else:
        lines.append(f"Not sampled ({rep.get('error') or 'no source: pass --ray-address or --dashboard-url'}).")
    lines.append("")

    http = report["http"]
    lines += ["## HTTP", "", "| endpoint | responses by status |", "| --- | --- |"]
    for endpoint, codes in http["by_endpoint"].items():
        lines.append(f"| `{endpoint}` | {', '.join(f'{c}: {n}' for c, n in codes.items())} |")
    lines += ["", f"Errors by status: {http['errors_by_status'] or 'none'} (0 = connection error or timeout).", ""]

    canc, dl = report["cancellations"], report["downloads"]
    if canc["requested"] or canc["planned"]:
        lines += ["## Cancellations", "", f"- planned {canc['planned']}, requested {canc['requested']}, answers "
                  f"{canc['answered']}, final states {canc['outcome']}",
                  f"- cancel request to cancelled seen: p50 {_s(canc['cancel_to_terminal_s']['p50'])}s, p95 "
                  f"{_s(canc['cancel_to_terminal_s']['p95'])}s", ""]
    lines += ["## Downloads", "", f"- {dl['downloads']} downloads, {dl['ok']} ok, {dl['failed']} failed, "
              f"{dl['bytes'] / 1e6:.2f} MB, p50 {_s(dl['seconds']['p50'], 3)}s", ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts] + [""]
    return "\n".join(lines)


def render_charts(report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """PNG charts (matplotlib, Agg). Returns paths relative to ``out_dir``; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return []
    out_dir = Path(out_dir)
    (out_dir / "charts").mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / "charts" / name, dpi=110)
        plt.close(fig)
        written.append(f"charts/{name}")

    # Completed jobs per minute.
    bins = report["throughput"]["per_bin"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = (bins[1]["start_s"] - bins[0]["start_s"]) if len(bins) > 1 else 60.0
    ax.bar([b["start_s"] for b in bins], [b["per_minute"] for b in bins], width=width * 0.9, align="edge",
           color="#4C72B0")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("completed jobs / min")
    ax.set_title(f"Throughput ({width:.0f}s bins); overall {report['throughput']['completed_per_minute']:.2f}/min")
    save(fig, "throughput.png")

    # Latency percentiles, overall and per tenant.
    metrics = (("queue_wait_s", "queue wait"), ("first_progress_s", "first progress"), ("end_to_end_s", "end-to-end"))
    scopes = [("all", report["latency"]["overall"])] + [
        (t, b) for t, b in report["latency"]["per_tenant"].items() if b["end_to_end_s"]["n"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(11, 3.4), sharey=False)
    for ax, (metric, label) in zip(axes, metrics):
        for i, (scope, block) in enumerate(scopes):
            s = block[metric]
            values = [s[q] or 0.0 for q in ("p50", "p95", "p99")]
            ax.bar([j + i * (0.8 / len(scopes)) for j in range(3)], values, width=0.8 / len(scopes), label=scope)
        ax.set_xticks([j + 0.4 - 0.4 / len(scopes) for j in range(3)], ["p50", "p95", "p99"])
        ax.set_title(label)
        ax.set_ylabel("seconds")
    axes[-1].legend(fontsize="small")
    save(fig, "latency.png")

    # Replicas per deployment over time, beside the load.
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    deployments = report["replicas"]["deployments"]
    for name, d in deployments.items():
        points = d["changes"]
        xs = [p["t_s"] for p in points] + [report["meta"]["wall_s"]]
        ys = [p["running"] for p in points] + [points[-1]["running"]]
        top.step(xs, ys, where="post", label=name)
    top.set_ylabel("running replicas")
    top.set_ylim(0, max([d["max"] for d in deployments.values()] + [1]) + 1)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title("Replicas per deployment" if deployments else "Replicas per deployment (not sampled)")
    if deployments:
        top.legend(fontsize="small", ncol=3)
    load = report["load"]["in_flight"]
    bottom.step([p[0] for p in load], [p[1] for p in load], where="post", color="#C44E52")
    bottom.set_ylabel(f"jobs in flight ({report['load'].get('step_s', 1):.0f}s steps)")
    bottom.set_ylim(bottom=0)
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("time since start (s)")
    save(fig, "scaling.png")

    # Tenant shares vs weights.
    fairness = report["fairness"]
    if fairness:
        names = list(fairness)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.4))
        for i, (key, label) in enumerate((("weight_share", "weight share"), ("work_share", "share of GPU work"),
                                          ("job_share", "share of completed jobs"))):
            ax.bar([j + i * 0.27 for j in range(len(names))], [fairness[n][key] * 100 for n in names], width=0.27,
                   label=label)
        ax.set_xticks([j + 0.27 for j in range(len(names))], names)
        ax.set_ylabel("%")
        ax.set_title("Tenants: share of completed work vs weight")
        ax.legend(fontsize="small")
        save(fig, "tenants.png")

    # Stage busy time.
    stages = report["stages"]
    if stages:
        names = list(stages)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, [(stages[n]["busy_fraction"] or 0) * 100 for n in names], color="#55A868", label="busy / wall")
        util = [(stages[n]["utilisation"] or 0) * 100 for n in names]
        if any(util):
            ax.plot(names, util, "o", color="black", label="per-replica utilisation")
        ax.set_ylabel("% of wall time")
        ax.set_title("Stage busy time (sum of stage timings / wall time)")
        ax.legend(fontsize="small")
        save(fig, "stages.png")
    return written


def write_report(out_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    """report.json, charts/*.png and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str))
    charts = render_charts(report, out_dir)
    (out_dir / "report.md").write_text(render_markdown(report, charts))
    return {"json": out_dir / "report.json", "markdown": out_dir / "report.md",
            **{Path(c).stem: out_dir / c for c in charts}}


def headline(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    jobs, lat = report["jobs"], report["latency"]["overall"]
    e2e, qw, fp = lat["end_to_end_s"], lat["queue_wait_s"], lat["first_progress_s"]
    lines = [
        f"jobs: {jobs['completed']} completed, {jobs['failed']} failed, {jobs['cancelled']} cancelled, "
        f"{jobs['rejected']} rejected, {jobs['unfinished']} unfinished (of {jobs['submitted']} submitted)",
        f"throughput: {report['throughput']['completed_per_minute']:.2f} jobs/min over {report['meta']['wall_s']:.0f}s",
        f"end-to-end p50/p95/p99: {_s(e2e['p50'])}/{_s(e2e['p95'])}/{_s(e2e['p99'])}s; queue wait p50/p95: "
        f"{_s(qw['p50'])}/{_s(qw['p95'])}s; first progress p50: {_s(fp['p50'])}s",
        f"HTTP: {report['http']['requests']} requests, 5xx {report['http']['errors_5xx']}, connection errors "
        f"{report['http']['connection_errors']}",
    ]
    scaled = {n: (d["min"], d["max"]) for n, d in report["replicas"]["deployments"].items() if d["min"] != d["max"]}
    if report["replicas"]["deployments"]:
        lines.append("replicas: " + (", ".join(f"{n} {a}->{b}" for n, (a, b) in scaled.items()) or "no scaling"))
    failed = [n for n, ok in report["checks"].items() if not ok]
    lines.append("checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed)))
    return "\n".join(lines)


def rebuild(out_dir: str | Path) -> dict[str, Any]:
    """Recompute the report of a finished run from its records (e.g. after changing this module)."""
    from .replicas import read_samples

    out_dir = Path(out_dir)
    old = json.loads((out_dir / "report.json").read_text())
    http = {}
    raw_http = out_dir / "http.json"
    if raw_http.exists():
        http = {(m, n, int(s)): c for m, n, s, c in json.loads(raw_http.read_text())}
    weights = {t: f["weight"] for t, f in old.get("fairness", {}).items()}
    report = build_report(read_records(out_dir / "records.jsonl"), meta={k: v for k, v in old["meta"].items()
                                                                        if k != "wall_s"},
                          weights=weights, http=http, replica_samples=read_samples(out_dir / "replicas.jsonl"),
                          replica_source=old["replicas"]["source"], replica_error=old["replicas"].get("error"))
    write_report(out_dir, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m loadtest.report RUN_DIR", file=sys.stderr)
        return 2
    print(headline(rebuild(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
