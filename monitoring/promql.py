"""PromQL for the dashboard: selectors filtered by the dashboard's variables, and the usual shapes.

Every panel query is a plain ``expr`` whose only template variables are ``$cluster``,
``$namespace``, ``$tenant``, ``$model`` and ``$__rate_interval``, so a test can substitute them and
run the query against a real Prometheus. Each selector filters by cluster and namespace (labels
the scrape adds; absent locally, where ``=~".*"`` still matches), and by tenant and model where
the metric has those labels. The variables' "All" value is ``.*``, which matches an empty label too.
"""

from __future__ import annotations

import re

from .metrics import Metric

#: The dashboard's template variables that filter series, by the label they filter.
FILTER_VARIABLES = {"cluster": "$cluster", "namespace": "$namespace", "tenant": "$tenant", "model": "$model"}
#: Labels every series has after a Kubernetes scrape (target labels), so every selector filters them.
SCRAPE_LABELS = ("cluster", "namespace")
RATE_INTERVAL = "$__rate_interval"

_MATCHER = re.compile(r'^(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)(?P<op>=~|!~|!=|=)"(?P<value>[^"]*)"$')


def selector(metric: Metric, *matchers: str, sample: str | None = None) -> str:
    """``sample{cluster=~"$cluster", namespace=~"$namespace"[, tenant/model...], *matchers}``.

    ``sample`` picks one of the metric's series (a histogram's ``_bucket``...), by default its name.
    Each extra matcher (``'status="failed"'``) must name one of the metric's own labels.
    """
    sample = sample or metric.name
    if sample not in metric.sample_names:
        raise ValueError(f"{sample!r} is not a series of {metric.name} (its series: {', '.join(metric.sample_names)})")
    parts = [f'{label}=~"{FILTER_VARIABLES[label]}"' for label in SCRAPE_LABELS]
    parts += [f'{label}=~"{FILTER_VARIABLES[label]}"' for label in ("tenant", "model") if label in metric.labels]
    for matcher in matchers:
        match = _MATCHER.match(matcher)
        if match is None:
            raise ValueError(f"matcher {matcher!r} is not of the form label=\"value\" (or =~, !=, !~)")
        if match["label"] not in metric.labels:
            raise ValueError(f"{metric.name} has no label {match['label']!r} (its labels: {', '.join(metric.labels)})")
        parts.append(matcher)
    return f"{sample}{{{', '.join(parts)}}}"


def _by(labels: tuple[str, ...]) -> str:
    return f" by ({', '.join(labels)})" if labels else ""


def per_minute(metric: Metric, *matchers: str, by: tuple[str, ...] = ()) -> str:
    """Events per minute of a counter, summed over Ray's per-process series."""
    if metric.kind != "counter":
        raise ValueError(f"per_minute needs a counter; {metric.name} is a {metric.kind}")
    return f"60 * sum{_by(by)} (rate({selector(metric, *matchers)}[{RATE_INTERVAL}]))"


def per_second(metric: Metric, *matchers: str, by: tuple[str, ...] = ()) -> str:
    """A counter's rate per second, summed over Ray's per-process series."""
    if metric.kind != "counter":
        raise ValueError(f"per_second needs a counter; {metric.name} is a {metric.kind}")
    return f"sum{_by(by)} (rate({selector(metric, *matchers)}[{RATE_INTERVAL}]))"


def gauge(metric: Metric, *matchers: str, by: tuple[str, ...] = (), aggregate: str = "max") -> str:
    """A gauge over Ray's per-process series: ``max`` for store-wide values that one process sets
    while the others hold 0, ``min`` for health (one replica that cannot reach the store counts)."""
    if metric.kind != "gauge":
        raise ValueError(f"gauge() needs a gauge; {metric.name} is a {metric.kind}")
    if aggregate not in ("max", "min", "sum"):
        raise ValueError(f"aggregate must be max, min or sum, got {aggregate!r}")
    return f"{aggregate}{_by(by)} ({selector(metric, *matchers)})"


def quantile_over_rate(metric: Metric, quantile: float, *matchers: str, by: tuple[str, ...] = ()) -> str:
    """The quantile of a histogram's observations within the rate interval."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
    bucket = selector(metric, *matchers, sample=metric.bucket)
    return f"histogram_quantile({quantile:g}, sum{_by(('le',) + by)} (rate({bucket}[{RATE_INTERVAL}])))"


def quantile_cumulative(metric: Metric, quantile: float, *matchers: str, by: tuple[str, ...] = ()) -> str:
    """The quantile of every observation the live series hold (since their process or node started).

    For one-off events, such as a replica's start: each replica process observes once into a new
    series, which ``rate()`` never sees increase."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
    bucket = selector(metric, *matchers, sample=metric.bucket)
    return f"histogram_quantile({quantile:g}, sum{_by(('le',) + by)} ({bucket}))"
