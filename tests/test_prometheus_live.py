"""The Grafana dashboard and the alert rules against a real Prometheus scraping a live deployment.

A Prometheus from Debian's ``prometheus`` package (tests/prometheus_server.py) scrapes every
metrics export endpoint of ``make serve``'s local deployment (tests/fixtures_local.py: one Ray
node, whose metrics agent exports the svd metrics and Serve's own ``ray_serve_*`` ones) every
second, adding ``cluster`` and ``namespace`` labels as the chart's scrape config would. The alert
rules are loaded before the workload runs, so recording rules and alert state cover all of it.
The workload: a long image-to-video job with a webhook, cancelled once it has run through a
janitor gauge update (its webhook receiver answers 500 once, then 200: one retry, one delivery),
short jobs queued behind it (a text-to-video job of another tenant, a job that fails with
invalid_input, raised in the text-to-image stage), a 429 (the ``limited`` tenant's rate limit), a
404 and a 401. After one Ray metrics report interval more, the checks run over the window
Prometheus saw:

* **Template variables** (cluster, namespace, tenant, model...): each query variable's query
  returns at least one value (``label_values`` through the series API, as Grafana runs it).
* **Panels**: each target's ``expr``, with the variables set to "All" exactly as Grafana
  interpolates them for Prometheus (the variable's ``allValue`` if it has one, otherwise its
  values regex-escaped and joined as ``(a|b)``; a single-value variable gets its first value) and
  ``$__rate_interval`` as Grafana computes it for a 1 s scrape interval and a 1 s step (4s),
  parses and, as a range query over the window, returns at least one series. A panel that would
  stay empty on a deployment that just did all of the above can never show data: a defect.
* **Alerts** (and recording rules), from the plain rules file: Prometheus loads the file and
  evaluates every rule without error (``health: ok``). Every series selector of an expression
  must match series over the window: one that matches nothing is a misnamed metric or label,
  and its alert could never fire (or, under ``absent``, would fire forever). An alert's
  expression is its condition, which a healthy run need not meet, so "returns series" is asked
  of its *signal*: the expression with its thresholds taken off, everywhere in it. A comparison
  with a constant side becomes its other side; a comparison of two vectors becomes a ``bool``
  comparison (a value for every matched pair, so sides whose labels never match are caught);
  ``A unless B`` becomes A (B only suppresses); ``absent(X)`` becomes X and
  ``absent_over_time(X[r])`` ``count_over_time(X[r])`` (what must be present when all is well).
  Taking filters off only adds series, so a signal that returns nothing means the alert's
  metrics, aggregations and label matching cannot produce a series on a deployment that just
  ran jobs, failed one and answered errors: it could never fire.

Each check collects every offender and fails once, listing each panel, variable or rule with
its query and why: the selectors that match nothing, whether their metric exists at all
(with close names that do) or which label matcher excludes every series (with the values the
label has).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import promql_parser as promql
import psutil
import pytest
import yaml
from grafana_promql import (Checker, Variable, builtin_variables, dashboard_targets, interpolate, resolve_variables,
                            signal)
from prometheus_server import SCRAPE_INTERVAL_S, PrometheusServer
from test_webhooks import Receiver
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm/svd-serve/dashboards/svd-serve.json"
RULES = ROOT / "helm/svd-serve/alerts/svd-serve.rules.yaml"
#: What the chart's scrape config adds to every series, so the dashboard's variables resolve.
SCOPE_LABELS = {"cluster": "local-test", "namespace": "svd-test"}
SCRAPE_JOB = "svd-serve-ray"
#: Ray's processes push their metrics to the node's agent every metrics_report_interval_ms (10 s).
RAY_METRICS_REPORT_INTERVAL_S = 10.0
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "num_frames": 6}
SMALL_T2V = {**SMALL, "t2i_num_inference_steps": 2}
#: A job far longer than the test waits for it (minutes on a CPU): it is cancelled once it has run
#: through a janitor gauge update, so the per-tenant gauges see it running and others queued.
LONG_JOB = {"width": 128, "height": 128, "num_frames": 14, "num_inference_steps": 150}
TERMINAL = {"completed", "failed", "cancelled"}
SAMPLE_IMAGE = ROOT / "pipelines/assets/sample.png"

pytestmark = pytest.mark.timeout(600)


def live(test):
    """A check against the live deployment (the harness's own rules are checked without one)."""
    return pytest.mark.ray(pytest.mark.slow(test))


# -- the deployment's metrics endpoints, Prometheus, the workload ---------------------------------

def ray_metrics_targets(data_dir: Path) -> list[str]:
    """``127.0.0.1:port`` of every metrics agent of the Ray session that ``svd-serve up
    --data-dir data_dir`` started: each node's agent writes its export port into the session dir."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve.cli" in cmdline and "up" in cmdline and str(data_dir) in cmdline:
            for child in process.children(recursive=True):
                for arg in child.cmdline():
                    if arg.startswith("--session-dir="):
                        ports = [int(path.read_text()) for path in
                                 Path(arg.split("=", 1)[1]).glob("metrics_export_port_*")]
                        assert ports and -1 not in ports, f"Ray's metrics export is off in {arg}: {ports}"
                        return sorted(f"127.0.0.1:{port}" for port in ports)
    raise AssertionError(f"no Ray session of the svd-serve up process with --data-dir {data_dir}")


@dataclass
class Run:
    prometheus: PrometheusServer
    start: float
    end: float
    rules_error: str | None


@pytest.fixture(scope="module")
def prometheus(local_service, tmp_path_factory):
    targets = ray_metrics_targets(local_service.data_dir)
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets=targets, job_name=SCRAPE_JOB,
                          labels=SCOPE_LABELS) as server:
        server.wait_targets_up()
        yield server


@pytest.fixture(scope="module")
def run(local_service, prometheus) -> Run:
    rules_error = None
    if RULES.exists():
        try:
            prometheus.load_rule_files([RULES])
        except RuntimeError as error:
            rules_error = str(error)
    receiver = Receiver()
    receiver.script = [(500, {}, 0.0)]  # one retry, then delivered
    try:
        run_workload(local_service, receiver.url)
        wait_for(lambda: len(receiver.requests) >= 2, 60, "the webhook's retry and delivery")
    finally:
        receiver.close()
    # Every process's last counts reach the agent within one report interval, then a scrape.
    time.sleep(RAY_METRICS_REPORT_INTERVAL_S + 3 * SCRAPE_INTERVAL_S)
    return Run(prometheus=prometheus, start=prometheus.started_at, end=time.time(), rules_error=rules_error)


def janitor_gauge_period_s() -> float:
    """How often the elected janitor sets the queue and tenant gauges: on its ticks (every
    lease_s / 3), at most every GAUGE_INTERVAL_S."""
    from serve.config import AppConfig
    from serve.runner.janitor import GAUGE_INTERVAL_S

    return max(GAUGE_INTERVAL_S, AppConfig().job_store.lease_s / 3)


def run_workload(service, webhook_url: str) -> None:
    def auth(tenant: str) -> dict:
        return {"Authorization": f"Bearer {service.keys[tenant]}"}

    with httpx.Client(base_url=service.url, timeout=60) as http:
        accepted: dict[str, str] = {}  # job id -> tenant
        long = http.post("/v1/videos", headers=auth("alice"), files={"image": SAMPLE_IMAGE.read_bytes()},
                         data={**{k: str(v) for k, v in LONG_JOB.items()}, "webhook_url": webhook_url})
        assert long.status_code == 202, f"long job: {long.status_code} {long.text}"
        long_id = long.json()["id"]
        text_to_video = http.post("/v1/videos", headers=auth("bob"), json={"prompt": "a lighthouse", **SMALL_T2V})
        # Raised in the text-to-image stage, after admission: a failed job with error code invalid_input.
        failing = http.post("/v1/videos", headers=auth("alice"),
                            json={"prompt": "x", "negative_prompt": "y", "t2i_guidance_scale": 1.0, **SMALL_T2V})
        for name, response in (("text-to-video", text_to_video), ("failing", failing)):
            assert response.status_code == 202, f"{name}: {response.status_code} {response.text}"
            accepted[response.json()["id"]] = "bob" if response is text_to_video else "alice"
        # The limited tenant may submit once a minute: a second submit is a 429 (the first may be
        # one already, when an earlier test of this session used its minute).
        statuses = []
        for _ in range(3):
            response = http.post("/v1/videos", headers=auth("limited"), json={"prompt": "z", **SMALL_T2V})
            statuses.append(response.status_code)
            if response.status_code == 202:
                accepted[response.json()["id"]] = "limited"
            if response.status_code == 429:
                break
        assert 429 in statuses, f"the limited tenant got no 429: {statuses}"
        assert http.get("/v1/videos/vid_doesnotexist", headers=auth("alice")).status_code == 404
        assert http.get("/v1/videos", headers={"Authorization": "Bearer not-a-key"}).status_code == 401

        wait_for(lambda: http.get(f"/v1/videos/{long_id}", headers=auth("alice")).json()["status"] == "in_progress",
                 120, "the long job to start")
        time.sleep(janitor_gauge_period_s() + 1)
        cancel = http.post(f"/v1/videos/{long_id}/cancel", headers=auth("alice"))
        assert cancel.status_code in (200, 202), f"cancel: {cancel.status_code} {cancel.text}"
        accepted[long_id] = "alice"
        ended = {}
        for job_id, tenant in accepted.items():
            ended[job_id] = wait_for(lambda: terminal(http, job_id, auth(tenant)), 240, f"job {job_id} to end")
        outcomes = {job_id: (job["status"], (job.get("error") or {}).get("code")) for job_id, job in ended.items()}
        assert outcomes.pop(failing.json()["id"]) == ("failed", "invalid_input"), outcomes
        assert outcomes.pop(long_id)[0] == "cancelled", outcomes
        assert {status for status, _ in outcomes.values()} == {"completed"}, outcomes


def terminal(http: httpx.Client, job_id: str, headers: dict) -> dict | None:
    job = http.get(f"/v1/videos/{job_id}", headers=headers).json()
    return job if job["status"] in TERMINAL else None


# -- Grafana's interpolation -----------------------------------------------------------------------

#: Regex metacharacters Grafana's Prometheus datasource escapes in multi-value/"All" values.
def load_dashboard() -> dict:
    if not DASHBOARD.exists():
        pytest.fail(f"{DASHBOARD.relative_to(ROOT)} is missing: the dashboard this test checks", pytrace=False)
    return json.loads(DASHBOARD.read_text())


def failure_report(what: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {what}:\n" + "\n".join(f"- {line}" for line in offenders)


# -- the checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("max(a) > 600", "max(a{})"),
    ("a == 0 and on (s) b > 0", "a{} and on (s) b{}"),
    ("a < on (s) group_left (x) b", "(a{}) < bool on (s) group_left (x) (b{})"),
    ("count by (d) ((a unless a offset 30m) unless on (d) (h == 1)) > 2", "count by (d)((a{}))"),
    ("absent(a) or absent_over_time(b[5m])", "a{} or count_over_time(b{}[5m])"),
    ("sum(x > bool 1)", "sum(x{} > bool 1)"),
])
def test_signal_takes_every_threshold_off(expr, expected):
    assert " ".join(signal(promql.parse(expr)).split()) == expected


def test_interpolation_follows_grafana():
    variables = {"tenant": Variable("tenant", ["a.b", "c"], all_value=None, multi=True),
                 "model": Variable("model", ["m"], all_value=".*", multi=True),
                 "cluster": Variable("cluster", ["one", "two"], all_value=None, multi=False)}
    text = 'x{t=~"$tenant", m=~"${model}", c="$cluster", p=~"[[tenant]]", r=~"${tenant:pipe}"}[$__rate_interval]'
    assert interpolate(text, variables, {"__rate_interval": "4s"}) == (
        'x{t=~"(a\\\\.b|c)", m=~".*", c="one", p=~"(a\\\\.b|c)", r=~"a.b|c"}[4s]')
    with pytest.raises(ValueError, match=r"\$nope is not a variable"):
        interpolate("up{x=~\"$nope\"}", variables, {})


@live
def test_every_template_variable_has_values(run):
    _, problems = resolve_variables(load_dashboard(), run, builtin_variables(run))
    assert not problems, failure_report("template variables without values", problems)


@live
def test_every_dashboard_panel_query_returns_series(run):
    dashboard = load_dashboard()
    builtins = builtin_variables(run)
    variables, _ = resolve_variables(dashboard, run, builtins)
    checker = Checker(run)
    targets = dashboard_targets(dashboard)
    assert targets, "the dashboard has no panels"
    offenders = []
    for panel, target in targets:
        where = f"panel {panel.get('title')!r} (id {panel.get('id')})"
        if target is None:
            offenders.append(f"{where}: no Prometheus query (expr) at all")
            continue
        where += f" target {target.get('refId', '?')}{' (hidden)' if target.get('hide') else ''}"
        try:
            expr = interpolate(target["expr"], variables, builtins)
        except ValueError as error:
            offenders.append(f"{where}: {error}: {target['expr']}")
            continue
        if (why := checker.problem(expr)) is not None:
            offenders.append(f"{where}: {why}\n    {expr}")
    assert not offenders, failure_report(f"of {len(targets)} panel queries return no series", offenders)


@live
def test_every_alert_rule_loads_evaluates_and_returns_series(run):
    if not RULES.exists():
        pytest.fail(f"{RULES.relative_to(ROOT)} is missing: the rules this test checks", pytrace=False)
    assert run.rules_error is None, run.rules_error
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [(group["name"], index, rule) for group in groups for index, rule in enumerate(group["rules"])]
    assert rules, f"{RULES.relative_to(ROOT)} has no rules"
    # The rules API lists each group's rules in file order (its query is re-formatted: not a key).
    loaded = {(group["name"], index): rule for group in run.prometheus.rule_groups()
              for index, rule in enumerate(group["rules"])}
    checker = Checker(run)
    offenders = []
    for group, index, rule in rules:
        name = rule.get("alert") or rule.get("record")
        where = f"{'alert' if 'alert' in rule else 'recording rule'} {name} (group {group})"
        try:
            parsed = promql.parse(rule["expr"])
        except Exception as error:  # noqa: BLE001 - the parser's own error types
            offenders.append(f"{where}: does not parse: {error}")
            continue
        state = loaded.get((group, index))
        if state is None or state["name"] != name:
            offenders.append(f"{where}: not loaded by Prometheus")
        elif state["health"] != "ok":
            offenders.append(f"{where}: evaluation {state['health']}: {state.get('lastError')}")
            continue
        empty = checker.empty_selectors(rule["expr"])
        if empty:
            offenders.append(f"{where}: " + "; ".join(empty) + f"\n    {rule['expr'].strip()}")
            continue
        try:
            expr = signal(parsed)
        except ValueError as error:
            offenders.append(f"{where}: this test cannot take its thresholds off: {error}")
            continue
        if (why := checker.problem(expr)) is not None:
            offenders.append(f"{where}: its signal {why}\n    signal: {expr}")
    assert not offenders, failure_report(f"of {len(rules)} rules fail", offenders)
