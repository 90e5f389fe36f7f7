"""Monitoring assets of svd-serve: the Grafana dashboard generator and the metric catalogue.

* :mod:`monitoring.metrics`: every metric the dashboard and the alert rules read, named once,
  exactly as Prometheus scrapes it (Ray's metrics agent adds the ``ray_`` prefix).
* :mod:`monitoring.dashboard`: builds ``helm/svd-serve/dashboards/svd-serve.json`` with
  grafana-foundation-sdk (``python -m monitoring.dashboard``; ``--check`` fails when it is stale).

The alert rules are a plain Prometheus rules file, ``helm/svd-serve/alerts/svd-serve.rules.yaml``;
tests/test_alert_rules.py checks that they only read metrics of this catalogue.
"""
