"""The svd-serve Grafana dashboard, built with grafana-foundation-sdk.

    python -m monitoring.dashboard            # rewrite helm/svd-serve/dashboards/svd-serve.json
    python -m monitoring.dashboard --check    # exit 1 when the committed JSON is stale

The JSON is committed (the chart ships it as a ConfigMap for Grafana's dashboard sidecar, and it
imports by hand: the datasource is a variable, so it has no ``__inputs``). The panels are listed in
:mod:`monitoring.panels`; metric names come from :mod:`monitoring.metrics` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from . import metrics
from .panels import SECTIONS, PanelSpec, Query

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = REPO_ROOT / "helm" / "svd-serve" / "dashboards" / "svd-serve.json"
DASHBOARD_UID = "svd-serve"
DASHBOARD_TITLE = "svd-serve"
#: Every panel and variable queries the datasource the `datasource` variable picks.
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The metric the cluster and namespace variables list their values from: every process exports it.
ANCHOR = metrics.QUEUE_DEPTH
#: The metric the tenant and model variables list their values from.
TENANT_MODEL_SOURCE = metrics.JOBS


def _datasource_variable() -> dashboard_builders.DatasourceVariable:
    return (
        dashboard_builders.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes the Ray pods' metrics port.")
    )


def _label_variable(name: str, label: str, query: str, description: str) -> dashboard_builders.QueryVariable:
    """A multi-value label filter whose "All" is `.*` (which also matches a series without the label)."""
    return (
        dashboard_builders.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
    )


def variables() -> list[dashboard_builders.QueryVariable | dashboard_builders.DatasourceVariable]:
    scope = 'cluster=~"$cluster", namespace=~"$namespace"'
    return [
        _datasource_variable(),
        _label_variable("cluster", "Cluster", f"label_values({ANCHOR.name}, cluster)",
                        "The `cluster` label (an external label of a multi-cluster Prometheus); empty with one "
                        "cluster."),
        _label_variable("namespace", "Namespace", f'label_values({ANCHOR.name}{{cluster=~"$cluster"}}, namespace)',
                        "The Kubernetes namespace of the release (the scrape's `namespace` label)."),
        _label_variable("tenant", "Tenant", f"label_values({TENANT_MODEL_SOURCE.name}{{{scope}}}, tenant)",
                        "Tenant ids (tenants that finished a job in the time range)."),
        _label_variable("model", "Model", f"label_values({TENANT_MODEL_SOURCE.name}{{{scope}}}, model)",
                        "Model ids (the registry id, not the weights' digest)."),
    ]


def _target(query: Query, ref_id: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(query.expr)
        .legend_format(query.legend)
        .ref_id(ref_id)
        .range()
        .datasource(DATASOURCE)
    )


def _timeseries(spec: PanelSpec) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .line_width(1)
        .fill_opacity(10)
        .show_points(common_models.VisibilityMode.NEVER)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.TABLE)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI)
                 .sort(common_models.SortOrder.DESCENDING))
    )
    if spec.stacked:
        panel.stacking(common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL))
    if spec.dashed_series:
        panel.override_by_regexp(spec.dashed_series, [
            dashboard_models.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        ])
    return panel


def _stat(spec: PanelSpec) -> stat.Panel:
    panel = (
        stat.Panel()
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .color_mode(common_models.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if spec.value_text:
        panel.mappings([dashboard_models.ValueMap(options={
            value: dashboard_models.ValueMappingResult(text=text, color=color, index=index)
            for index, (value, (text, color)) in enumerate(spec.value_text.items())
        })])
    return panel


def _panel(spec: PanelSpec, panel_id: int):
    panel = _stat(spec) if spec.kind == "stat" else _timeseries(spec)
    panel.id(panel_id).title(spec.title).description(spec.description).datasource(DATASOURCE)
    panel.unit(spec.unit).span(spec.width).height(spec.height)
    if spec.minimum is not None:
        panel.min(spec.minimum)
    if spec.thresholds:
        steps = [dashboard_models.Threshold(value=None, color=spec.base_colour)]
        steps += [dashboard_models.Threshold(value=value, color=color) for value, color in spec.thresholds]
        panel.thresholds(
            dashboard_builders.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE).steps(steps))
    for index, query in enumerate(spec.queries):
        panel.with_target(_target(query, chr(ord("A") + index)))
    return panel


def build() -> dashboard_models.Dashboard:
    """The dashboard as the SDK's model."""
    board = (
        dashboard_builders.Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .description("svd-serve: jobs, stages, tenants, errors and start-up (docs/operations.md).")
        .tags(["svd-serve", "ray-serve"])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .variables(variables())
    )
    panel_id = 0
    for section in SECTIONS:
        panel_id += 1
        board.with_row(dashboard_builders.Row(section.title).id(panel_id))
        for spec in section.panels:
            panel_id += 1
            board.with_panel(_panel(spec, panel_id))
    return board.build()


def render() -> str:
    """The dashboard's JSON, as committed (stable key order, trailing newline)."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the committed JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    relative = DASHBOARD_FILE.relative_to(REPO_ROOT)
    if args.check:
        current = DASHBOARD_FILE.read_text() if DASHBOARD_FILE.exists() else ""
        if current != text:
            print(f"{relative} is stale: run python -m monitoring.dashboard", file=sys.stderr)
            return 1
        print(f"{relative} is up to date")
        return 0
    DASHBOARD_FILE.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_FILE.write_text(text)
    print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
