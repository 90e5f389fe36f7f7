"""``svd-serve capacity``: replicas and GPUs per stage for a target rate, from labelled service times.

    svd-serve capacity --rate 600/h --model svd-xt --gpu h100 [--compiled] [--json]
    svd-serve capacity --rate 600/h --model svd-xt --gpu h100 --from-report results/constant/report.json

The service times come from ``loadtest/capacity_figures.yaml`` (:mod:`loadtest.capacity_data`):
measured or published figures, or figures derived from them by the file's stated rules, each
labelled in the output. ``--from-report`` puts a load test's measured mean stage times in place of
the file's for every stage the report has. The maths is :func:`loadtest.capacity.plan`.

Wired into the ``svd-serve`` command by :func:`register`; ``python -m loadtest.capacity_cli`` runs it alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capacity import parse_rate_per_hour, plan, stage_seconds_from_report
from .stages import STORE, default_gpu_shares, stage_of
from .units import parse_mapping

if TYPE_CHECKING:  # pydantic models: imported when a plan is made, not when ``svd-serve`` builds its parser
    from .capacity_data import CapacityFigures, StageFigure

#: Exit status of every refused input (as argparse's own).
EXIT_USAGE = 2
GPU_RULE = ("GPU rule: seconds x peak(anchor GPU) / peak(this GPU), dense bf16 TFLOP/s; coarse: memory-bound work "
            "(decode's group norms and elementwise ops) does not follow it")
QUEUE_NOTE = ("queue wait: mean wait in each stage's queue, M/M/c (Erlang C) at the planned replicas; a rough "
              "guide (real service times are not exponential)")


# -- figures from a load-test report ---------------------------------------------------------------


def report_figures(path: str | Path) -> dict[str, StageFigure]:
    """The report's mean stage times as ``measured`` figures (the upload folded into the final stage)."""
    from .capacity_data import StageFigure

    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON report ({error.msg} at line {error.lineno})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path}: not a load-test report (no JSON object)")
    try:
        seconds = stage_seconds_from_report(report)
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    meta = report.get("meta") or {}
    started = meta.get("started_at")
    profile = f" (profile {meta['profile']})" if meta.get("profile") else ""
    date = dt.datetime.fromtimestamp(float(started), dt.timezone.utc).date().isoformat() if started else None
    blocks = report["stages"]
    out = {}
    for stage, value in seconds.items():
        jobs = max((int(block.get("jobs") or 0) for name, block in blocks.items() if stage_of(name) == stage),
                   default=0)
        folded = " with the upload (store) folded in" if STORE in blocks and stage_of(STORE) == stage else ""
        out[stage] = StageFigure(stage=stage, seconds=value, label="measured", date=date,
                                 source=f"load-test report {path}{profile}: mean of {jobs} completed jobs{folded}")
    return out


# -- the plan --------------------------------------------------------------------------------------


def build_plan(*, rate_per_hour: float, figures: CapacityFigures, model: str | None, gpu: str | None,
               variant: str, report_path: str | None = None, utilisation: float = 0.7,
               gpu_share: dict[str, float] | None = None, parallel: dict[str, int] | None = None,
               current: dict[str, int] | None = None) -> dict[str, Any]:
    """:func:`loadtest.capacity.plan` on the labelled figures, with the figures and their rules attached."""
    from .capacity_data import GPU_RULE_MARK, MODEL_RULE_MARK, VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if (model is None) != (gpu is None):
        raise ValueError("give --model and --gpu together")
    if model is None and not report_path:
        raise ValueError("give --model and --gpu (or --from-report)")
    by_stage: dict[str, StageFigure] = {}
    header: dict[str, Any] = {"model": None, "gpu": None, "variant": variant}
    if model is not None:
        model_key, entry = figures.model(model)
        gpu_key = figures.gpu_name(gpu)
        kind = figures.gpus[gpu_key]
        by_stage = {f.stage: f for f in figures.plan_figures(model=model_key, gpu=gpu_key, variant=variant)}
        header.update(model=model_key, model_description=entry.description,
                      shape={"frames": entry.frames, "height": entry.height, "width": entry.width,
                             "steps": entry.steps},
                      gpu=gpu_key, gpu_name=kind.name, gpu_dense_bf16_tflops=kind.dense_bf16_tflops, gpu_note=kind.note)
    overridden: list[str] = []
    if report_path:
        measured = report_figures(report_path)
        overridden = list(measured)
        by_stage.update(measured)
    result = plan(rate_per_hour, {stage: f.seconds for stage, f in by_stage.items()}, utilisation=utilisation,
                  gpu_share=gpu_share, parallel=parallel, current=current)
    for entry in result["stages"]:
        entry["figure"] = asdict(by_stage[entry["stage"]])
    waits = [s["est_queue_wait_s"] for s in result["stages"]]
    applied = " ".join(rule for f in by_stage.values() for rule in f.rules)
    rules = {}
    if GPU_RULE_MARK in applied:
        rules["gpu"] = GPU_RULE
    if MODEL_RULE_MARK in applied:
        derive = figures.models[header["model"]].derive_from
        rules["model"] = f"model rule, {header['model']} from {derive.model}: {derive.rule}"
    return {**header, **result, "from_report": str(report_path) if report_path else None,
            "from_report_stages": overridden, "rules": rules,
            "est_queue_wait_total_s": None if None in waits else sum(waits)}


# -- output ----------------------------------------------------------------------------------------


def _footnote(figure: dict[str, Any]) -> str:
    if figure["label"] == "derived":
        text = (f"derived from the {figure['anchor_label']} figure of {figure['anchor']}: "
                f"{', then '.join(figure['rules'])}. Source: {figure['source']}")
    else:
        shared = f" ({'; '.join(figure['rules'])})" if figure["rules"] else ""
        text = f"{figure['label']}{shared}: {figure['source']}"
    if figure.get("date"):
        text += f" [{figure['date']}]"
    if figure.get("note"):
        text += f"; {figure['note']}"
    return text


def _wrap(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, width=110, subsequent_indent=indent, break_on_hyphens=False)


def render(result: dict[str, Any]) -> str:
    """The plan as a table, its bottleneck and GPU count, then where every figure comes from."""
    lines = []
    if result["model"]:
        shape = result["shape"]
        lines.append(f"{result['model']}, {result['model_description']}: {shape['frames']} frames "
                     f"{shape['width']}x{shape['height']}, {shape['steps']} steps, {result['variant']}, on "
                     f"{result['gpu']} ({result['gpu_name']})")
    if result["from_report"]:
        lines.append(f"stage times of {', '.join(result['from_report_stages'])} from the load-test report "
                     f"{result['from_report']} (they override the data file)")
    lines += [f"target {result['rate_per_hour']:g} videos/h at {result['utilisation_target']:.0%} utilisation", "",
              f"{'stage':<14}{'service s':>10}  {'source':<14}{'replicas':>9}{'GPU/rep':>9}{'GPUs':>7}"
              f"{'util':>7}{'queue wait s':>14}"]
    notes: list[str] = []
    for stage in result["stages"]:
        note = _footnote(stage["figure"])
        if note not in notes:
            notes.append(note)
        label = f"{stage['figure']['label']} [{notes.index(note) + 1}]"
        wait = "-" if stage["est_queue_wait_s"] is None else f"{stage['est_queue_wait_s']:.2f}"
        lines.append(f"{stage['stage']:<14}{stage['service_s']:>10.2f}  {label:<14}{stage['replicas']:>9}"
                     f"{stage['gpu_share']:>9.2f}{stage['gpus']:>7.2f}{stage['utilisation']:>7.0%}{wait:>14}")
    bottleneck = next(s for s in result["stages"] if s["stage"] == result["bottleneck"])
    per_replica = bottleneck["max_rate_per_replica_h"]
    sustained = "" if math.isinf(per_replica) else (
        f": one replica sustains {per_replica:.0f} videos/h at 100% busy, "
        f"{per_replica * result['utilisation_target']:.0f} at {result['utilisation_target']:.0%}")
    gpu = result["gpu"] or "GPU"
    total_wait = result["est_queue_wait_total_s"]
    lines += ["",
              f"bottleneck: {bottleneck['stage']} ({bottleneck['service_s'] / bottleneck['parallel']:.2f} s per clip "
              f"per replica{sustained})",
              f"GPUs: {result['gpus_packed']} x {gpu} in all (sum {result['gpu_sum']:.2f}: fractional replicas of "
              f"different stages share a GPU); {result['gpus_dedicated']} with a GPU pool per stage",
              f"expected queue wait per video: {'-' if total_wait is None else f'{total_wait:.2f} s'} "
              f"(sum over the stages)",
              f"GPU-seconds per video: {result['gpu_seconds_per_video']:.1f}"]
    if "current" in result:
        cur = result["current"]
        lines.append(f"current replicas sustain {cur['max_rate_per_hour']:.0f} videos/h at this utilisation "
                     f"(limited by {cur['limited_by']})")
    lines.append("")
    for number, note in enumerate(notes, start=1):
        lines += _wrap(f"[{number}] {note}")
    for text in (*result["rules"].values(), *([result["gpu_note"]] if result.get("gpu_note") else []), QUEUE_NOTE):
        lines += _wrap(text, indent="  ")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``svd-serve capacity`` (also ``python -m loadtest.capacity_cli``)."""
    parser.add_argument("--rate", required=True, help="target rate: 600/h, 10/min, 0.2/s (a bare number is per hour)")
    parser.add_argument("--model", default=None, help="svd, svd-xt, svd-xt-1.1 (or their Hub ids)")
    parser.add_argument("--gpu", default=None, help="GPU kind of the GPU stages: h100, h100-pcie, h200, a100, "
                                                    "a100-pcie, l4 (see loadtest/capacity_figures.yaml)")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--variant", default="eager",
                         help="which figures: eager | compiled | tensorrt (eager PyTorch, the default; "
                              "torch.compile'd U-Net and VAE decoder; TensorRT)")
    variant.add_argument("--compiled", dest="variant", action="store_const", const="compiled",
                         help="same as --variant compiled")
    parser.add_argument("--from-report", default=None, metavar="REPORT_JSON",
                        help="a load test's report.json: its mean stage times replace the data file's")
    parser.add_argument("--utilisation", "--utilization", default="0.7",
                        help="target utilisation of each stage, 0-1 (default 0.7)")
    parser.add_argument("--gpu-share", default="",
                        help="GPU share per replica, e.g. sampling=1,decode=0.5 (default: the Helm chart's: "
                             + ", ".join(f"{k}={v:g}" for k, v in default_gpu_shares().items()) + ")")
    parser.add_argument("--parallel", default="", help="jobs a replica serves at once at full speed (default 1 each)")
    parser.add_argument("--replicas", default="",
                        help="current replica counts, e.g. sampling=4: adds the highest rate they sustain")
    parser.add_argument("--figures", default=None,
                        help="another figures file (default: loadtest/capacity_figures.yaml)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _number(text: str | float, *, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None


def run(args: argparse.Namespace) -> int:
    """Print the plan; one line on stderr and exit status 2 for any bad input."""
    from .capacity_data import load_figures

    prog = getattr(args, "capacity_prog", None) or "capacity"
    try:
        result = build_plan(
            rate_per_hour=parse_rate_per_hour(args.rate), figures=load_figures(args.figures),
            model=args.model, gpu=args.gpu, variant=args.variant, report_path=args.from_report,
            utilisation=_number(args.utilisation, what="--utilisation"),
            gpu_share=parse_mapping(args.gpu_share, what="--gpu-share"),
            parallel={k: int(v) for k, v in parse_mapping(args.parallel, what="--parallel").items()},
            current={k: int(v) for k, v in parse_mapping(args.replicas, what="--replicas").items()})
    except (ValueError, OSError) as error:
        message = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename else error
        print(f"{prog}: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``svd-serve capacity ...`` to the top-level parser."""
    parser = commands.add_parser(
        "capacity", help="replicas and GPUs per stage for a target rate of videos per hour",
        description="Replicas and GPUs per pipeline stage for a target rate, from measured or published "
                    "service times (loadtest/capacity_figures.yaml) or a load test's report.")
    add_arguments(parser)
    parser.set_defaults(handler=run, capacity_prog=parser.prog)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity_cli",
                                     description="Replicas and GPUs per pipeline stage for a target rate.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.capacity_prog = parser.prog
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
