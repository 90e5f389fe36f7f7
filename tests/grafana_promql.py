"""Grafana's template interpolation and the PromQL analysis behind tests/test_prometheus_live.py:
how a dashboard query reads for "All", which selectors an expression uses, an alert expression's
"signal" (its thresholds taken off), and a checker that says why a query returns nothing."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

import promql_parser as promql
from prometheus_server import SCRAPE_INTERVAL_S, PrometheusQueryError

REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|{}\[\]'])")
VARIABLE_REFERENCE = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]")


def builtin_variables(run: Any) -> dict[str, str]:
    """Grafana's built-ins for a range query over the run at a 1 s step with a datasource scrape
    interval of 1 s: ``$__rate_interval`` = max($__interval + scrape interval, 4 x scrape interval)."""
    interval = SCRAPE_INTERVAL_S
    range_s = int(run.end - run.start)
    return {"__interval": f"{interval}s", "__interval_ms": str(interval * 1000),
            "__rate_interval": f"{max(interval + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)}s",
            "__range": f"{range_s}s", "__range_s": str(range_s), "__range_ms": str(range_s * 1000)}


@dataclass
class Variable:
    name: str
    values: list[str]
    all_value: str | None  # what "All" interpolates to (None: not an All variable)
    multi: bool


def interpolate(text: str, variables: dict[str, Variable], builtins: dict[str, str]) -> str:
    """``text`` with every variable reference replaced as Grafana does for Prometheus queries;
    ValueError naming a variable the dashboard does not define."""
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        form = match.group(3) or match.group(5)
        if name in builtins:
            return builtins[name]
        if name not in variables:
            raise ValueError(f"${name} is not a variable of the dashboard")
        variable = variables[name]
        if variable.all_value is not None:  # "All" with a custom all value: used as it is
            return variable.all_value
        values = variable.values if variable.multi else variable.values[:1]  # a single-value one: its first
        if form in ("raw", "csv"):
            return ",".join(values)
        if form == "pipe":
            return "|".join(values)
        if form not in (None, "regex"):
            raise ValueError(f"${{{name}:{form}}}: format {form!r} is not supported by this test")
        if not variable.multi and form is None:  # one value, as a string literal's content
            return values[0].replace("\\", "\\\\").replace("'", "\\'") if values else ""
        escaped = [REGEX_SPECIAL.sub(r"\\\\\1", value) for value in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return VARIABLE_REFERENCE.sub(replace, text)


def variable_values(run: Any, query: str) -> list[str]:
    """Values of a Grafana Prometheus query variable's query over the run."""
    prometheus = run.prometheus
    if match := re.fullmatch(r"\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*", query, re.S):
        selector, label = match.groups()
        series = prometheus.series(selector or f'{{{label}!=""}}', start=run.start, end=run.end)
        return sorted({labels[label] for labels in series if labels.get(label)})
    if match := re.fullmatch(r"\s*metrics\((.*)\)\s*", query, re.S):
        return sorted(name for name in prometheus.metric_names() if re.search(match.group(1).strip(), name))
    if match := re.fullmatch(r"\s*query_result\((.+)\)\s*", query, re.S):
        return [json.dumps(item["metric"]) for item in prometheus.query(match.group(1), at=run.end)]
    raise ValueError(f"query {query!r}: not label_values(), metrics() or query_result()")


def resolve_variables(dashboard: dict, run: Any, builtins: dict[str, str]) -> tuple[dict[str, Variable], list[str]]:
    """The dashboard's variables with the values they take on this run, in the dashboard's order
    (later queries may use earlier variables), and a line per variable that has no value."""
    variables: dict[str, Variable] = {}
    problems = []
    for spec in dashboard.get("templating", {}).get("list", []):
        name, kind = spec["name"], spec.get("type")
        query = spec.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        try:
            if kind == "query":
                values = variable_values(run, interpolate(query, variables, builtins))
                if spec.get("regex"):
                    pattern = re.compile(spec["regex"].strip("/"))
                    values = [m.group(1) if m.groups() else v for v in values if (m := pattern.search(v))]
            elif kind in ("custom", "interval"):
                values = [v.strip() for v in query.split(",") if v.strip()]
            elif kind in ("constant", "textbox"):
                values = [query]
            else:  # datasource, adhoc: not part of any expr
                continue
        except (ValueError, PrometheusQueryError) as error:
            values = []
            problems.append(f"variable ${name} ({query!r}): {error}")
        else:
            if not values:
                problems.append(f"variable ${name} ({query!r}): no values")
        # "All" without an allValue is every value, interpolated like a multi-value selection.
        all_value = (spec.get("allValue") or None) if spec.get("includeAll") else None
        variables[name] = Variable(name=name, values=values, all_value=all_value,
                                   multi=bool(spec.get("multi") or spec.get("includeAll")))
    return variables, problems


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict | None]]:
    """(panel, target) for every panel with data (rows' nested panels included); target None for a
    data panel without any Prometheus expr."""
    found = []
    for panel in dashboard.get("panels", []):
        nested = panel.get("panels", []) if panel.get("type") == "row" else [panel]
        for inner in nested:
            if inner.get("type") in ("row", "text", "news", "dashlist", "alertlist", "annolist"):
                continue
            targets = [t for t in inner.get("targets", []) if isinstance(t.get("expr"), str)]
            if targets:
                found.extend((inner, target) for target in targets)
            else:
                found.append((inner, None))
    return found


# -- PromQL analysis -----------------------------------------------------------------------------

COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
MATCH_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def selectors(expr) -> list[str]:
    """Every series selector of ``expr`` as ``name{matchers}`` (offsets and @ dropped)."""
    found: list[str] = []

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            matchers = [f"{m.name}{MATCH_OPS[str(m.op)]}{json.dumps(m.value, ensure_ascii=False)}"
                        for m in node.matchers.matchers if not (node.name and m.name == "__name__")]
            found.append(f"{node.name or ''}{{{', '.join(matchers)}}}")

    promql.walk(expr, pre_visit=visit)
    return list(dict.fromkeys(found))


def binary_modifiers(node) -> str:
    """The ``on(...)``/``ignoring(...)``/``group_*`` text of a binary expression, ``bool`` left out."""
    text, lhs, rhs, op = str(node), str(node.lhs), str(node.rhs), str(node.op)
    if not (text.startswith(f"{lhs} {op}") and text.endswith(rhs)):
        raise ValueError(f"cannot take apart {text!r}")
    return text[len(lhs) + len(op) + 1:len(text) - len(rhs)].strip().removeprefix("bool").strip()


def signal(expr) -> str:
    """``expr`` with its thresholds taken off, throughout (the rule in the module docstring)."""
    def untied(node):
        if isinstance(node, promql.BinaryExpr):
            op = str(node.op)
            if op == "unless":
                return node.lhs
            if op in COMPARISONS and not (node.modifier and node.modifier.return_bool):
                if not selectors(node.rhs):
                    return node.lhs
                if not selectors(node.lhs):
                    return node.rhs
                return promql.parse(f"({node.lhs}) {op} bool {binary_modifiers(node)} ({node.rhs})")
        if isinstance(node, promql.Call) and node.func.name == "absent":
            return node.args[0]
        if isinstance(node, promql.Call) and node.func.name == "absent_over_time":
            return promql.parse(f"count_over_time({node.args[0]})")
        return None

    # Bottom-up, so a comparison's sides are already untied when it is.
    return str(promql.transform(expr, post_visit=untied))


class Checker:
    """Runs queries over the run's window and explains the ones that return nothing."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.step_s = SCRAPE_INTERVAL_S
        self._names: list[str] | None = None
        self._series: dict[str, list[dict]] = {}

    def returns_series(self, expr: str) -> bool:
        return bool(self.run.prometheus.query_range(expr, start=self.run.start, end=self.run.end,
                                                    step_s=self.step_s))

    def series_of(self, selector: str) -> list[dict]:
        if selector not in self._series:
            self._series[selector] = self.run.prometheus.series(selector, start=self.run.start, end=self.run.end)
        return self._series[selector]

    def empty_selectors(self, expr: str) -> list[str]:
        """A line per selector of ``expr`` that matches no series, saying why."""
        return [f"{selector} matches nothing: {self.why_empty(selector)}"
                for selector in selectors(promql.parse(expr)) if not self.series_of(selector)]

    def why_empty(self, selector: str) -> str:
        name = selector.split("{", 1)[0]
        if name and not self.series_of(name):
            if self._names is None:
                self._names = self.run.prometheus.metric_names()
            close = difflib.get_close_matches(name, self._names, n=3, cutoff=0.6)
            return f"no metric {name} is exported (close names: {', '.join(close) or 'none'})"
        excluding = []
        for matcher in promql.parse(selector).matchers.matchers:
            if matcher.name == "__name__":
                continue
            alone = f"{name}{{{matcher.name}{MATCH_OPS[str(matcher.op)]}{json.dumps(matcher.value)}}}"
            if not self.series_of(alone):
                values = sorted({s.get(matcher.name, "") for s in self.series_of(name or selector)})
                excluding.append(f"{alone} (the label's values: {values})")
        return ("no series with " + "; ".join(excluding)) if excluding else "the matchers exclude each other"

    def explain(self, expr: str) -> str:
        """Why ``expr`` returns nothing: its empty selectors, or that it combines away its series."""
        empty = self.empty_selectors(expr)
        return "; ".join(empty) if empty else ("every selector matches series, but the expression returns none "
                                               "(label sets that never match in a binary operation or filter?)")

    def problem(self, expr: str) -> str | None:
        """None if ``expr`` parses and returns series; otherwise why not."""
        try:
            if self.returns_series(expr):
                return None
        except PrometheusQueryError as error:
            return f"Prometheus refused it: {error}"
        return f"no series: {self.explain(expr)}"
