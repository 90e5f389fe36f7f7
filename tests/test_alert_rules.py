"""The alert rules (helm/svd-serve/alerts/svd-serve.rules.yaml) and the chart's PrometheusRule.

* ``promtool check rules`` accepts the file, and ``promtool test rules`` passes on
  tests/promtool/svd-serve.test.yaml, in which every alert fires (labels and rendered annotations
  checked) and later resolves; the fixtures are not vacuous: with every alert made to never fire,
  or to always fire, each one's test fails;
* every alert has a severity, a summary, a description and a runbook_url pointing at its section of
  docs/operations.md, which exists; the rules read only metrics of monitoring.metrics, with labels
  those metrics have; the client error codes left out of the failure ratio are the metering's;
* the chart renders the file, unchanged, as a PrometheusRule (validated against the Prometheus
  Operator's CRD, vendored in tests/crds/prometheus-operator), and applies its options.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("monitoring") is None:  # bare `pytest` puts tests/, not the repository root, on sys.path
    sys.path.insert(0, str(REPO_ROOT))
try:  # `tests` is a namespace package when the repository root is on sys.path
    from tests import helm_utils as hu
except ImportError:  # pytest's rootdir-relative import puts tests/ itself on sys.path
    import helm_utils as hu

from monitoring import metrics  # noqa: E402
from prometheus_server import require_promtool  # noqa: E402

RULES_FILE = hu.CHART_DIR / "alerts" / "svd-serve.rules.yaml"
FIXTURES = REPO_ROOT / "tests" / "promtool" / "svd-serve.test.yaml"
OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"
# The Prometheus Operator's PrometheusRule CRD (v0.93.0, Apache-2.0: its LICENSE beside it), vendored
# so the rendered PrometheusRule is validated against the real schema on every machine.
PROMETHEUS_CRD_DIR = REPO_ROOT / "tests" / "crds" / "prometheus-operator"
PROMETHEUS_RULE_CRD = PROMETHEUS_CRD_DIR / "monitoring.coreos.com_prometheusrules.yaml"
SELECTOR = re.compile(r"\b(ray_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')




def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_promtool(), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rules_file() -> dict:
    return yaml.safe_load(RULES_FILE.read_text())


def _alerts(rules_file: dict) -> list[dict]:
    return [rule for group in rules_file["groups"] for rule in group["rules"] if "alert" in rule]


# -- promtool ---------------------------------------------------------------------------------------


def test_promtool_check_rules(rules_file):
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts(rules_file))} rules found" in result.stdout


def test_promtool_test_rules():
    result = promtool("test", "rules", str(FIXTURES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_fires_and_then_resolves_in_the_fixtures(rules_file):
    fixtures = yaml.safe_load(FIXTURES.read_text())
    assert fixtures["rule_files"] == [str(Path("..", "..") / RULES_FILE.relative_to(REPO_ROOT))]
    checks: dict[str, list[tuple[int, bool]]] = {}
    for case in fixtures["tests"]:
        for check in case.get("alert_rule_test", []):
            minutes = int(check["eval_time"].removesuffix("m"))
            checks.setdefault(check["alertname"], []).append((minutes, bool(check["exp_alerts"])))
    for alert in _alerts(rules_file):
        name = alert["alert"]
        firing = [t for t, fires in checks.get(name, []) if fires]
        assert firing, f"no fixture makes {name} fire"
        assert any(t > min(firing) and not fires for t, fires in checks[name]), f"{name} never resolves in a fixture"
    assert set(checks) <= {a["alert"] for a in _alerts(rules_file)}, "a fixture tests an alert the file lacks"


def _mutated_run(tmp_path: Path, rules_file: dict, expr: str) -> str:
    """promtool test rules on the fixtures with every alert's expr replaced by ``expr``."""
    mutated = copy.deepcopy(rules_file)
    for alert in _alerts(mutated):
        alert["expr"] = expr
    rules = tmp_path / "svd-serve.rules.yaml"
    rules.write_text(yaml.safe_dump(mutated))
    fixtures = yaml.safe_load(FIXTURES.read_text())
    fixtures["rule_files"] = [str(rules)]
    path = tmp_path / "svd-serve.test.yaml"
    path.write_text(yaml.safe_dump(fixtures))
    result = promtool("test", "rules", str(path))
    assert result.returncode != 0, "the fixtures pass with broken rules: they test nothing"
    return result.stdout + result.stderr


def test_fixtures_catch_an_alert_that_never_fires(tmp_path, rules_file):
    output = _mutated_run(tmp_path, rules_file, "vector(1) == 0")
    assert [a["alert"] for a in _alerts(rules_file) if f"alertname: {a['alert']}," not in output] == []


def test_fixtures_catch_an_alert_that_never_resolves(tmp_path, rules_file):
    output = _mutated_run(tmp_path, rules_file, "vector(1)")
    assert [a["alert"] for a in _alerts(rules_file) if f"alertname: {a['alert']}," not in output] == []


# -- the rules' contents ----------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_is_documented(rules_file):
    doc = OPERATIONS_DOC.read_text()
    sections = {_anchor(m[1]): m.start() for m in re.finditer(r"(?m)^#{2,4} (.+)$", doc)}
    for alert in _alerts(rules_file):
        name = alert["alert"]
        assert re.fullmatch(r"Svd[A-Za-z]+", name), name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in sections, f"docs/operations.md has no section `{name}`"
        start = sections[name.lower()]
        following = re.compile(r"(?m)^#{1,3} ").search(doc, start + 1)
        body = doc[start:following.start() if following else len(doc)]
        for part in ("**What it means.**", "**How to check.**", "**What to do.**"):
            assert part in body, f"the runbook of {name} lacks {part}"
        assert re.search(r"\d", str(alert.get("for", ""))), f"{name} has no `for`"


def test_rules_read_known_metrics_with_their_labels(rules_file):
    known = metrics.by_sample_name()
    for alert in _alerts(rules_file):
        selectors = SELECTOR.findall(alert["expr"])
        assert selectors, alert["alert"]
        for name, matchers in selectors:
            assert name in known, f"{alert['alert']}: {name} is not in monitoring.metrics"
            labels = {label for label, _, _ in MATCHER.findall(matchers)}
            assert labels <= set(known[name].labels), f"{alert['alert']}: {name} has no label {labels}"


def test_failure_ratio_leaves_out_exactly_the_client_error_codes(rules_file):
    from serve.metering.models import CLIENT_ERROR_CODES

    (alert,) = [a for a in _alerts(rules_file) if a["alert"] == "SvdJobFailureRatioHigh"]
    (codes,) = re.findall(r'code=~"([^"]*)"', alert["expr"])
    assert set(codes.split("|")) == set(CLIENT_ERROR_CODES)


# -- the chart's PrometheusRule ---------------------------------------------------------------------

ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}}


@pytest.fixture(scope="module")
def prometheus_rule() -> dict:
    pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
    return hu.render(ENABLED).one("PrometheusRule")


def test_chart_renders_the_rules_file_unchanged(prometheus_rule, rules_file):
    assert prometheus_rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert prometheus_rule["metadata"]["name"] == "svd-serve"
    assert prometheus_rule["metadata"]["namespace"] == hu.MANIFEST_NAMESPACE
    assert prometheus_rule["spec"] == rules_file


def test_prometheus_rule_structure(prometheus_rule):
    """What the Prometheus Operator's CRD requires (see the next test for the CRD itself)."""
    assert set(prometheus_rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(prometheus_rule["spec"]) == {"groups"}
    names = [group["name"] for group in prometheus_rule["spec"]["groups"]]
    assert names and len(names) == len(set(names))
    duration = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
    for group in prometheus_rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and ("alert" in rule) != ("record" in rule)
            assert duration.match(rule.get("for", "0")), rule
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule


def test_prometheus_rule_matches_the_operator_crd(prometheus_rule):
    schema = hu.crd_schema(PROMETHEUS_RULE_CRD)
    assert hu.crd_errors(prometheus_rule, schema) == []
    assert hu.unknown_fields(prometheus_rule, schema) == []


def test_prometheus_rule_options(rules_file):
    pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
    import helm_python

    assert hu.render().of_kind("PrometheusRule") == [], "off by default (it needs the operator's CRDs)"
    values = {"metrics": {"prometheusRule": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"},
        "additionalRuleLabels": {"team": "ml-platform", "severity": "page"},
        "runbookBaseUrl": "https://git.example.com/acme/svd-serve/blob/main/"}}}
    rule = hu.render(values).one("PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    expected = {a["alert"]: a for a in _alerts(rules_file)}
    for alert in _alerts(rule["spec"]):
        original = expected[alert["alert"]]
        assert alert["labels"] == {"team": "ml-platform", **original["labels"]}, "a rule's own labels win"
        assert alert["annotations"]["runbook_url"] == (
            "https://git.example.com/acme/svd-serve/blob/main/" + original["annotations"]["runbook_url"])
        assert alert["expr"] == original["expr"]
    assert hu.lint_problems(hu.lint(values)) == []
    with pytest.raises(helm_python.HelmValuesError, match="runbookBaseUrl"):
        hu.render({"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": "git.example.com/x"}}})
    with pytest.raises(helm_python.HelmValuesError, match="additionalRuleLabels"):
        hu.render({"metrics": {"prometheusRule": {"enabled": True, "additionalRuleLabels": {"bad-name": "x"}}}})
