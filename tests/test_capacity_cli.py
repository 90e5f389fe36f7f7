"""The capacity planner (``svd-serve capacity``): the figures file, the derivation rules, the plan's
numbers against a hand computation (Erlang C written out here, independently of loadtest.capacity),
``--from-report`` with a report written by loadtest.report, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loadtest import capacity_cli, report
from loadtest.capacity_data import FIGURES_FILE, VARIANTS, CapacityFigures, CpuFigure, load_figures, parse_figures
from loadtest.records import JobRecord
from loadtest.stages import CHART_GPU_SHARE

ROOT = Path(__file__).resolve().parent.parent
RAW = yaml.safe_load(FIGURES_FILE.read_text())


def run_json(capsys, *argv: str) -> dict:
    assert capacity_cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_stage(result: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in result["stages"]}


def erlang_c_mean_wait(servers: int, offered: float, service_s: float) -> float:
    """M/M/c mean queue wait, the textbook formula with factorials."""
    top = offered ** servers / math.factorial(servers) * servers / (servers - offered)
    bottom = sum(offered ** k / math.factorial(k) for k in range(servers)) + top
    return top / bottom * service_s / (servers - offered)


# -- the data file ---------------------------------------------------------------------------------


def test_figures_file_is_valid_and_every_figure_is_labelled_and_sourced():
    figures = load_figures()
    assert isinstance(figures, CapacityFigures)
    assert {"svd", "svd-xt", "svd-xt-1.1"} <= set(figures.models)
    assert {"h100", "h200", "a100", "l4"} <= set(figures.gpus)
    assert figures.models["svd-xt"].frames == 25 and figures.models["svd"].frames == 14
    for record in [*RAW["figures"], *RAW["cpu_figures"]]:
        assert record["label"] in {"measured", "published"} and record["source"]
        if record["label"] == "measured":
            assert record["date"] and "PENDING" not in json.dumps(record)
    # Measured full-size SVD-XT figures on the H200, eager and compiled, for every GPU stage.
    h200 = {(f["variant"], f["stage"]): f["label"] for f in RAW["figures"]
            if (f["model"], f["gpu"]) == ("svd-xt", "h200")}
    gpu_stages = [stage for stage, where in RAW["stages"].items() if where == "gpu"]
    assert h200 == {(variant, stage): "measured" for variant in ("eager", "compiled") for stage in gpu_stages}
    for name, entry in figures.models.items():
        assert all(figures.model_name(alias) == name for alias in entry.aliases)


# -- the plan against a hand computation --------------------------------------------------------------


def hand_stage_seconds(model: str, gpu: str, variant: str) -> dict[str, float]:
    """What the file says for svd-xt, by the rules as written: this GPU's own figure, else the
    measured H200 figure scaled by the dense bf16 peaks."""
    peaks = {name: g["dense_bf16_tflops"] for name, g in RAW["gpus"].items()}
    out = {}
    for stage, where in RAW["stages"].items():
        if where == "cpu":
            out[stage] = next(c["seconds"] for c in RAW["cpu_figures"] if (c["model"], c["stage"]) == (model, stage))
            continue
        own = [f for f in RAW["figures"]
               if (f["model"], f["gpu"], f["variant"], f["stage"]) == (model, gpu, variant, stage)]
        if own:
            out[stage] = own[0]["seconds"]
        else:
            anchor = next(f for f in RAW["figures"] if (f["model"], f["gpu"], f["variant"], f["stage"])
                          == (model, "h200", variant, stage))
            out[stage] = anchor["seconds"] * peaks["h200"] / peaks[gpu]
    return out


def test_svd_xt_on_h100_at_600_per_hour_matches_the_hand_computation(capsys):
    result = run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h100")
    stages = by_stage(result)
    rate_s = 600 / 3600
    expected_gpus = 0.0
    for stage, seconds in hand_stage_seconds("svd-xt", "h100", "eager").items():
        row = stages[stage]
        offered = rate_s * seconds
        replicas = max(1, math.ceil(offered / 0.7))
        assert row["service_s"] == pytest.approx(seconds)
        assert row["replicas"] == replicas
        assert row["utilisation"] == pytest.approx(offered / replicas)
        assert row["gpus"] == pytest.approx(replicas * CHART_GPU_SHARE[stage])
        assert row["est_queue_wait_s"] == pytest.approx(erlang_c_mean_wait(replicas, offered, seconds), rel=1e-9)
        expected_gpus += replicas * CHART_GPU_SHARE[stage]
    assert result["bottleneck"] == "sampling"
    assert result["gpus_packed"] == math.ceil(expected_gpus - 1e-9)
    assert result["est_queue_wait_total_s"] == pytest.approx(sum(s["est_queue_wait_s"] for s in result["stages"]))
    assert (result["model"], result["gpu"], result["variant"]) == ("svd-xt", "h100", "eager")
    assert result["from_report"] is None
    # With the figures of this writing (15.28 s sampling, the H200's): 2.55 busy Samplers -> 4 at 70%,
    # 4 + 0.25 + 0.5 GPUs -> 5 packed, 6 in pools; Erlang C with c=4, a=2.547: 3.53 s.
    if stages["sampling"]["service_s"] == 15.28:
        assert stages["sampling"]["replicas"] == 4 and result["gpus_packed"] == 5 and result["gpus_dedicated"] == 6
        assert stages["sampling"]["est_queue_wait_s"] == pytest.approx(3.53, abs=0.01)

    assert capacity_cli.main(["--rate", "600/h", "--model", "svd-xt", "--gpu", "h100"]) == 0
    table = capsys.readouterr().out
    assert "bottleneck: sampling" in table
    row = next(line for line in table.splitlines() if line.startswith("sampling "))
    cells = row.split()
    assert cells[1] == f"{stages['sampling']['service_s']:.2f}" and cells[2] == stages["sampling"]["figure"]["label"]
    assert int(cells[4]) == stages["sampling"]["replicas"]
    assert cells[-1] == f"{stages['sampling']['est_queue_wait_s']:.2f}"
    assert f"GPUs: {result['gpus_packed']} x h100 in all" in table
    assert "M/M/c (Erlang C)" in table


def stored(model: str, gpu: str, variant: str, stage: str) -> float:
    return next(f["seconds"] for f in RAW["figures"]
                if (f["model"], f["gpu"], f["variant"], f["stage"]) == (model, gpu, variant, stage))


def test_labels_and_rules_of_measured_published_and_derived_figures(capsys):
    h200 = by_stage(run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h200"))
    assert {h200[s]["figure"]["label"] for s in ("image_encode", "sampling", "decode")} == {"measured"}
    assert "issue #15" in h200["sampling"]["figure"]["source"] and h200["sampling"]["figure"]["date"]

    compiled = by_stage(run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h200", "--compiled"))
    assert (compiled["sampling"]["service_s"], compiled["decode"]["service_s"]) == (
        stored("svd-xt", "h200", "compiled", "sampling"), stored("svd-xt", "h200", "compiled", "decode"))
    assert by_stage(run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h200", "--variant",
                             "compiled")) == compiled

    a100 = by_stage(run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "a100"))
    assert a100["sampling"]["figure"]["label"] == "derived"
    assert a100["sampling"]["service_s"] == pytest.approx(stored("svd-xt", "h200", "eager", "sampling") * 989 / 312)
    assert a100["sampling"]["figure"]["anchor_label"] == "measured"
    assert any("989/312 dense bf16 TFLOP/s (h200 -> a100)" in r for r in a100["sampling"]["figure"]["rules"])

    # TensorRT: Stability's published SVD-XT 1.1 figures serve svd-xt (same architecture and shape).
    trt = by_stage(run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h100-pcie",
                            "--variant", "tensorrt"))
    assert (trt["sampling"]["service_s"], trt["sampling"]["figure"]["label"]) == (
        stored("svd-xt-1.1", "h100-pcie", "tensorrt", "sampling"), "published")
    assert "svd-xt-1.1's figure serves svd-xt" in trt["sampling"]["figure"]["rules"][0]

    # svd-xt-1.1 shares svd-xt's measured figures; svd is derived from them by the model rule.
    xt11 = by_stage(run_json(capsys, "--rate", "600/h", "--model", "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
                             "--gpu", "h200"))
    assert (xt11["sampling"]["service_s"], xt11["sampling"]["figure"]["label"]) == (
        stored("svd-xt", "h200", "eager", "sampling"), "measured")
    result = run_json(capsys, "--rate", "600/h", "--model", "svd", "--gpu", "h200")
    svd = by_stage(result)
    factors = RAW["models"]["svd"]["derive_from"]["factors"]
    xt = {stage: stored("svd-xt", "h200", "eager", stage) for stage in ("sampling", "decode")}
    assert svd["sampling"]["service_s"] == pytest.approx(xt["sampling"] * factors["sampling"])
    assert svd["decode"]["service_s"] == pytest.approx(xt["decode"] * factors["decode"])
    assert svd["sampling"]["figure"]["label"] == "derived" and "model" in result["rules"]
    assert svd["video_encode"]["figure"]["label"] == "measured"  # measured at 14 frames itself


def test_derivation_prefers_measured_anchors_and_the_nearest_peak(tmp_path, capsys):
    doc = {
        "stages": {"sampling": "gpu", "video_encode": "cpu"},
        "gpus": {"big": {"name": "Big", "dense_bf16_tflops": 1000, "source": "t"},
                 "mid": {"name": "Mid", "dense_bf16_tflops": 500, "source": "t"},
                 "small": {"name": "Small", "dense_bf16_tflops": 250, "source": "t"},
                 "tiny": {"name": "Tiny", "dense_bf16_tflops": 100, "source": "t"}},
        "models": {"m": {"description": "M", "frames": 25, "height": 576, "width": 1024, "steps": 25}},
        "figures": [
            {"model": "m", "gpu": "big", "variant": "eager", "stage": "sampling", "seconds": 10.0, "label": "measured",
             "source": "doc A", "date": "2026-01-01"},
            {"model": "m", "gpu": "mid", "variant": "eager", "stage": "sampling", "seconds": 30.0, "label": "published",
             "source": "vendor"},
            {"model": "m", "gpu": "small", "variant": "eager", "stage": "sampling", "seconds": 44.0,
             "label": "measured", "source": "doc B", "date": "2026-01-02"},
        ],
        "cpu_figures": [{"model": "m", "stage": "video_encode", "seconds": 1.0, "label": "measured", "cpu": "c",
                         "source": "doc C", "date": "2026-01-03"}],
    }
    path = tmp_path / "figures.yaml"
    path.write_text(yaml.safe_dump(doc))
    figures = load_figures(path)
    # On "mid" its own published figure wins over scaling a measured one.
    assert figures.plan_figures(model="m", gpu="mid", variant="eager")[0].label == "published"
    # On "tiny": measured anchors only (not the nearer published "mid"), the nearest of them by peak ("small").
    tiny = figures.plan_figures(model="m", gpu="tiny", variant="eager")[0]
    assert (tiny.label, tiny.seconds, tiny.source) == ("derived", pytest.approx(44.0 * 250 / 100), "doc B")
    with pytest.raises(ValueError, match="no figure for sampling of m \\(compiled on any GPU\\)"):
        figures.plan_figures(model="m", gpu="big", variant="compiled")
    result = run_json(capsys, "--rate", "360/h", "--model", "m", "--gpu", "tiny", "--figures", str(path))
    assert by_stage(result)["sampling"]["service_s"] == pytest.approx(110.0) and "gpu" in result["rules"]


BASE = {"stages": {"sampling": "gpu", "video_encode": "cpu"},
        "gpus": {"g": {"name": "G", "dense_bf16_tflops": 100, "source": "t"}},
        "models": {"m": {"description": "M", "aliases": ["org/m"], "frames": 25, "height": 576, "width": 1024,
                         "steps": 25}},
        "figures": [{"model": "m", "gpu": "g", "variant": "eager", "stage": "sampling", "seconds": 1.0,
                     "label": "measured", "source": "s", "date": "d"}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["figures"][0].pop("date"), "a measured figure needs its date"),
    (lambda d: d["figures"][0].update(gpu="nope"), "unknown model or GPU"),
    (lambda d: d["figures"][0].update(stage="video_encode"), "not a GPU stage"),
    (lambda d: d["figures"].append(dict(d["figures"][0])), "given twice"),
    (lambda d: d["figures"][0].update(label="derived"), "figures.0.label"),
    (lambda d: d["models"].update(n={**d["models"]["m"], "aliases": ["org/m"]}), "'org/m' is used twice"),
    (lambda d: d["models"].update(n={**d["models"]["m"], "aliases": [], "same_figures_as": "x"}), "same_figures_as"),
    (lambda d: d["models"].update(n={**d["models"]["m"], "aliases": [],
                                     "derive_from": {"model": "m", "factors": {"sampling": 0}, "rule": "r"}}),
     "factors must be above 0"),
    (lambda d: d["stages"].update(upscale="gpu"), "not registered"),
])
def test_a_bad_figures_file_is_refused_in_one_line(change, message):
    doc = json.loads(json.dumps(BASE))
    parse_figures(yaml.safe_dump(doc))  # the base itself is valid
    change(doc)
    with pytest.raises(ValueError, match=message) as caught:
        parse_figures(yaml.safe_dump(doc))
    assert "\n" not in str(caught.value)


def test_a_figures_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "figures.yaml"
    path.write_text("stages: [\n  unclosed: {\n")
    assert capacity_cli.main(["--rate", "600/h", "--model", "svd-xt", "--gpu", "h100", "--figures", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not YAML" in err and err.count("\n") == 1


def test_an_unquoted_yaml_date_is_kept_as_its_text():
    text = yaml.safe_dump(BASE).replace("date: d\n", "date: 2026-11-28\n")
    assert "2026-11-28" in text and parse_figures(text).figures[0].date == "2026-11-28"


# -- --from-report ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def load_test_report(tmp_path_factory) -> Path:
    """report.json written by loadtest.report from 12 completed jobs with known stage timings."""
    t0 = 1_800_000_000.0
    records = []
    for i in range(12):
        start = t0 + 30 * i
        records.append(JobRecord(
            seq=i, tenant="a", scheduled_at=start, submitted_at=start, submit_status=202, status="completed",
            created_at=start + 0.1, started_at=start + 0.2, finished_at=start + 20.0, first_progress_at=start + 1.0,
            terminal_at=start + 20.2, done_at=start + 20.5,
            timings={"image_encode": 0.1, "sampling": 16.0 + 0.1 * i, "decode": 2.5, "video_encode": 0.4,
                     "store": 0.05}))
    records.append(JobRecord(seq=99, tenant="a", scheduled_at=t0, submitted_at=t0, submit_status=202, status="failed",
                             created_at=t0, started_at=t0, finished_at=t0 + 1, terminal_at=t0 + 1,
                             timings={"sampling": 500.0}))
    built = report.build_report(records, meta={"profile": "unit", "target": "http://127.0.0.1:1", "started_at": t0,
                                               "ended_at": t0 + 400, "window_s": 360}, weights={"a": 1})
    out = tmp_path_factory.mktemp("run")
    return report.write_report(out, built)["json"]


def test_from_report_overrides_the_figures_with_the_reports_means(capsys, load_test_report):
    result = run_json(capsys, "--rate", "600/h", "--model", "svd-xt", "--gpu", "h100",
                      "--from-report", str(load_test_report))
    stages = by_stage(result)
    assert stages["sampling"]["service_s"] == pytest.approx(16.55)  # mean of 16.0..17.1; the failed job left out
    assert stages["video_encode"]["service_s"] == pytest.approx(0.45)  # the upload folded into its replica's stage
    assert result["from_report_stages"] == ["image_encode", "sampling", "decode", "video_encode"]
    for row in stages.values():
        assert row["figure"]["label"] == "measured" and str(load_test_report) in row["figure"]["source"]
        assert "mean of 12 completed jobs" in row["figure"]["source"]
    assert result["bottleneck"] == "sampling"
    offered = 600 / 3600 * 16.55
    assert stages["sampling"]["replicas"] == math.ceil(offered / 0.7)

    assert capacity_cli.main(["--rate", "600/h", "--from-report", str(load_test_report)]) == 0
    table = " ".join(capsys.readouterr().out.split())  # footnotes wrap
    assert f"from the load-test report {load_test_report} (they override the data file)" in table
    assert "(profile unit): mean of 12 completed jobs" in table and "bottleneck: sampling" in table


def test_a_report_without_stage_timings_is_one_line(tmp_path, capsys):
    empty = tmp_path / "report.json"
    empty.write_text(json.dumps({"meta": {}, "stages": {}}))
    notjson = tmp_path / "notes.txt"
    notjson.write_text("hello")
    for path, message in ((empty, "no stage timings"), (notjson, "not a JSON report")):
        assert capacity_cli.main(["--rate", "600/h", "--from-report", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


# -- the command: wiring and bad input ----------------------------------------------------------------


def test_registered_under_a_top_level_parser_as_svd_serve_wires_it(capsys):
    parser = argparse.ArgumentParser(prog="svd-serve")
    commands = parser.add_subparsers(dest="command", required=True)
    capacity_cli.register(commands)
    args = parser.parse_args(["capacity", "--rate", "10/min", "--model", "svd-xt", "--gpu", "h200", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["rate_per_hour"] == 600
    helptext = " ".join(commands.choices["capacity"].format_help().split())
    assert f"which figures: {' | '.join(VARIANTS)}" in helptext and "--from-report" in helptext
    args = parser.parse_args(["capacity", "--rate", "600/h", "--model", "svd-xxl", "--gpu", "h100"])
    assert args.handler(args) == 2
    assert capsys.readouterr().err == "svd-serve capacity: unknown model 'svd-xxl' (known: svd, svd-xt, svd-xt-1.1)\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "svd-xxl", "--gpu", "h100"], "unknown model 'svd-xxl' (known: svd, svd-xt, svd-xt-1.1)"),
    (["--model", "svd-xt", "--gpu", "v100"], "unknown GPU 'v100' (known: a100, a100-pcie, h100, h100-pcie, h200, l4)"),
    (["--model", "svd-xt", "--gpu", "h100", "--variant", "fp4"], "unknown variant 'fp4'"),
    (["--model", "svd-xt"], "give --model and --gpu together"),
    ([], "give --model and --gpu (or --from-report)"),
    (["--model", "svd-xt", "--gpu", "h100", "--utilisation", "1.5"], "utilisation must be in (0, 1]"),
    (["--model", "svd-xt", "--gpu", "h100", "--utilisation", "most"], "--utilisation: 'most' is not a number"),
    (["--model", "svd-xt", "--gpu", "h100", "--from-report", "/no/such/report.json"], "No such file or directory"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys):
    assert capacity_cli.main(["--rate", "600/h", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_the_module_runs_as_a_program_with_exit_status_2_on_bad_rate():
    done = subprocess.run([sys.executable, "-m", "loadtest.capacity_cli", "--rate", "fast", "--model", "svd-xt",
                           "--gpu", "h100"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "python -m loadtest.capacity_cli: not a rate: 'fast' (use e.g. 600/h, 10/min, 0.5/s)\n"


# -- the CPU figure's measurement ----------------------------------------------------------------------


def test_capacity_cpu_times_the_video_encode_stage_and_prints_a_valid_record(capsys):
    from loadtest import capacity_cpu

    frames = capacity_cpu.panning_frames(3, 64, 96)
    assert frames.shape == (3, 64, 96, 3) and frames.dtype.name == "uint8"
    assert (frames[1, :, :-4] == frames[0, :, 4:]).all()  # panned 4 px a frame
    runs = capacity_cpu.time_video_encode(frames=3, height=64, width=96, repeat=2)
    assert len(runs) == 2 and all(r > 0 for r in runs)
    with pytest.raises(ValueError):
        capacity_cpu.time_video_encode(frames=3, height=64, width=96, repeat=0)
    assert capacity_cpu.main(["--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    # The record it prints for the figures file is one the file accepts.
    printed = capacity_cpu.figure_record(model="svd", seconds=0.1734, rounds=15, cpu=capacity_cpu.cpu_description(),
                                         date="2026-11-28")
    figure = CpuFigure.model_validate(yaml.safe_load(printed)[0])
    assert (figure.model, figure.stage, figure.label, figure.seconds, figure.date) == (
        "svd", "video_encode", "measured", 0.173, "2026-11-28")
    assert "logical cores" in figure.cpu and "--model svd --repeat 15" in figure.source
