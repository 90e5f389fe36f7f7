"""Capacity model: replicas and GPUs per stage for a target rate of videos per hour.

Each stage is a pool of replicas; a replica serves ``parallel`` jobs at once, each taking
``service_s`` seconds (measured per stage: ``timings`` of completed jobs, or published figures).
For an arrival rate of lambda videos/s the stage's offered load is ``a = lambda * service_s``
busy replica-equivalents (Erlangs). At a target utilisation rho the stage needs

    replicas = ceil(a / (rho * parallel))          GPUs = replicas * gpu_share

and the GPUs of all stages, packed (fractional shares of different stages share a GPU), are
``ceil(sum of GPUs)``. The *bottleneck* is the stage with the largest per-replica time
(``service_s / parallel``): it saturates first at equal replica counts and dominates the GPU bill.
With ``--replicas`` the model also answers the other question: the highest rate the current
replica counts sustain at the target utilisation, and which stage limits it.

The queue-wait estimate is the M/M/c (Erlang C) mean wait of each stage at the planned replica
count: a rough guide (service times are not exponential), useful to see how close to the knee
a plan sits.

    python -m loadtest.capacity --rate 600/h --stage-seconds sampling=19.1,decode=3.4,image_encode=0.1
    python -m loadtest.capacity --rate 120/h --from-report loadtest-results/smoke/report.json

``svd-serve capacity`` (:mod:`loadtest.capacity_cli`) runs the same model on labelled figures by
model and GPU kind (``loadtest/capacity_figures.yaml``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .stages import default_gpu_shares, deployment_of, stage_names, stage_of
from .units import parse_mapping, parse_rate


@dataclass
class StagePlan:
    stage: str
    deployment: str
    service_s: float
    parallel: int
    gpu_share: float
    offered_load: float
    """Busy replica-equivalents at the target rate (Erlangs): rate x service time / parallel."""
    replicas: int
    gpus: float
    utilisation: float
    max_rate_per_replica_h: float
    est_queue_wait_s: float | None
    current_replicas: int | None = None
    current_max_rate_h: float | None = None


def erlang_c_wait(servers: int, offered: float, service_s: float) -> float | None:
    """Mean queue wait of an M/M/c queue (None when it is unstable)."""
    if servers <= 0 or offered >= servers:
        return None
    if offered <= 0:
        return 0.0
    # sum_{k<c} a^k/k! and a^c/c!, computed as a running term to avoid overflow.
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers
    tail = last * servers / (servers - offered)
    probability_wait = tail / (total + tail)
    return probability_wait * service_s / (servers - offered)


def parse_rate_per_hour(text: str) -> float:
    """Videos per hour from ``600/h``, ``10/min``, ``0.2/s``; a bare number is per hour."""
    rate = str(text).strip()
    per_hour = float(rate) if rate.replace(".", "", 1).isdigit() else parse_rate(rate) * 3600.0
    if not per_hour > 0:
        raise ValueError(f"the target rate must be above 0: {text!r}")
    return per_hour


def plan(rate_per_hour: float, stage_seconds: dict[str, float], *, utilisation: float = 0.7,
         gpu_share: dict[str, float] | None = None, parallel: dict[str, int] | None = None,
         current: dict[str, int] | None = None) -> dict[str, Any]:
    """Replicas and GPUs per stage for ``rate_per_hour`` videos at ``utilisation`` (0-1]."""
    if not 0 < utilisation <= 1:
        raise ValueError("utilisation must be in (0, 1]")
    if rate_per_hour <= 0:
        raise ValueError("the target rate must be above 0")
    if not stage_seconds:
        raise ValueError("no stage service times given")
    shares = {**default_gpu_shares(), **(gpu_share or {})}
    rate_s = rate_per_hour / 3600.0
    stages: list[StagePlan] = []
    known = stage_names()
    order = [s for s in known if s in stage_seconds] + sorted(set(stage_seconds) - set(known))
    for stage in order:
        service = float(stage_seconds[stage])
        if service < 0:
            raise ValueError(f"{stage}: a service time cannot be negative")
        par = int((parallel or {}).get(stage, 1))
        offered = rate_s * service / par
        replicas = max(1, math.ceil(offered / utilisation - 1e-9))
        share = float(shares.get(stage, 0.0))
        per_replica_h = 3600.0 * par / service if service > 0 else math.inf
        now = (current or {}).get(stage)
        stages.append(StagePlan(
            stage=stage, deployment=deployment_of(stage) or stage, service_s=service, parallel=par, gpu_share=share,
            offered_load=offered, replicas=replicas, gpus=replicas * share, utilisation=offered / replicas,
            max_rate_per_replica_h=per_replica_h,
            est_queue_wait_s=erlang_c_wait(replicas, offered, service),
            current_replicas=now,
            current_max_rate_h=(now * per_replica_h * utilisation) if now is not None else None,
        ))
    bottleneck = max(stages, key=lambda s: s.service_s / s.parallel)
    gpus_sum = sum(s.gpus for s in stages)
    result: dict[str, Any] = {
        "rate_per_hour": rate_per_hour,
        "utilisation_target": utilisation,
        "stages": [asdict(s) for s in stages],
        "bottleneck": bottleneck.stage,
        "gpus_dedicated": sum(math.ceil(s.gpus - 1e-9) for s in stages),
        "gpus_packed": math.ceil(gpus_sum - 1e-9),
        "gpu_sum": gpus_sum,
        "gpu_seconds_per_video": sum(s.service_s * s.gpu_share for s in stages),
    }
    if current:
        limited = [s for s in stages if s.current_max_rate_h is not None]
        if limited:
            limit = min(limited, key=lambda s: s.current_max_rate_h)
            result["current"] = {"max_rate_per_hour": limit.current_max_rate_h, "limited_by": limit.stage}
    return result


def stage_seconds_from_report(report: dict[str, Any]) -> dict[str, float]:
    """Mean per-stage seconds of completed jobs (store folds into the final stage: same replica)."""
    stages = report.get("stages") or {}
    out: dict[str, float] = {}
    for stage, block in stages.items():
        mean = (block.get("seconds") or {}).get("mean")
        if mean is None:
            continue
        key = stage_of(stage)
        out[key] = out.get(key, 0.0) + float(mean)
    if not out:
        raise ValueError("the report has no stage timings (no completed jobs?)")
    return out


def render(result: dict[str, Any]) -> str:
    lines = [f"target {result['rate_per_hour']:.0f} videos/h at {result['utilisation_target']:.0%} utilisation",
             "",
             f"{'stage':<13}{'svc s':>8}{'par':>5}{'load':>8}{'replicas':>10}{'util':>7}{'GPU/rep':>9}{'GPUs':>7}"
             f"{'max/h/rep':>11}{'wait s':>9}"]
    for s in result["stages"]:
        wait = "-" if s["est_queue_wait_s"] is None else f"{s['est_queue_wait_s']:.1f}"
        per_rep = "inf" if math.isinf(s["max_rate_per_replica_h"]) else f"{s['max_rate_per_replica_h']:.0f}"
        lines.append(f"{s['stage']:<13}{s['service_s']:>8.2f}{s['parallel']:>5}{s['offered_load']:>8.2f}"
                     f"{s['replicas']:>10}{s['utilisation']:>7.0%}{s['gpu_share']:>9.2f}{s['gpus']:>7.2f}"
                     f"{per_rep:>11}{wait:>9}")
    lines += ["",
              f"bottleneck: {result['bottleneck']} (largest time per replica)",
              f"GPUs: {result['gpus_packed']} packed (sum {result['gpu_sum']:.2f}; fractional stages share GPUs), "
              f"{result['gpus_dedicated']} with a GPU pool per stage",
              f"GPU-seconds per video: {result['gpu_seconds_per_video']:.1f}"]
    if "current" in result:
        cur = result["current"]
        lines.append(f"current replicas sustain {cur['max_rate_per_hour']:.0f} videos/h at this utilisation "
                     f"(limited by {cur['limited_by']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.capacity",
        description="Replicas and GPUs per pipeline stage for a target rate of videos per hour.")
    parser.add_argument("--rate", required=True, help="target rate: 600/h, 10/min, 0.2/s (a bare number is per hour)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stage-seconds", help="service time per stage, e.g. sampling=19.1,decode=3.4,image_encode=0.1")
    source.add_argument("--from-report", help="report.json of a load test: its mean stage timings")
    parser.add_argument("--utilisation", "--utilization", type=float, default=0.7,
                        help="target utilisation of each stage, 0-1 (default 0.7)")
    parser.add_argument("--gpu-share", default="",
                        help="GPU share per replica, e.g. sampling=1,decode=0.5 (default: the Helm chart's: "
                             + ", ".join(f"{k}={v:g}" for k, v in default_gpu_shares().items()) + ")")
    parser.add_argument("--parallel", default="", help="jobs a replica serves at once at full speed (default 1 each)")
    parser.add_argument("--replicas", default="", help="current replica counts, e.g. sampling=4: adds the max rate they sustain")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rate_h = parse_rate_per_hour(args.rate)
        if args.from_report:
            seconds = stage_seconds_from_report(json.loads(Path(args.from_report).read_text()))
        else:
            seconds = parse_mapping(args.stage_seconds, what="--stage-seconds")
        result = plan(rate_h, seconds, utilisation=args.utilisation,
                      gpu_share=parse_mapping(args.gpu_share, what="--gpu-share"),
                      parallel={k: int(v) for k, v in parse_mapping(args.parallel, what="--parallel").items()},
                      current={k: int(v) for k, v in parse_mapping(args.replicas, what="--replicas").items()})
    except (ValueError, OSError) as error:
        print(f"capacity: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
