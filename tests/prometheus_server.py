"""A real Prometheus server (Debian's ``prometheus`` package) for tests.

:class:`PrometheusServer` writes a config for the given scrape targets (scrape and rule evaluation
every second, static ``labels`` added to every scraped series), starts ``prometheus`` on a free
127.0.0.1 port with a TSDB directory of its own, waits until it is ready, and stops it on exit.
Queries go through the HTTP API with httpx; a query Prometheus refuses raises
:class:`PrometheusQueryError` carrying Prometheus's own message.

Rule files are loaded by a config reload (:meth:`PrometheusServer.load_rule_files`), not at start,
so a broken rules file is reported as such instead of keeping Prometheus from starting.

The ``prometheus`` daemon that the Debian package's service unit may run (port 9090, the TSDB in
/var/lib/prometheus) is never used: every server here has its own port, config and data.

Without the binary the fixture skips (install it with ``scripts/install-system-deps.sh``), except
in CI, where a missing server is a failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
import pytest
import yaml
from fixtures_redis import in_ci
from waiting import free_port

PROMETHEUS = "prometheus"
#: One scrape and one rule evaluation a second: a short test run still has enough samples for rate().
SCRAPE_INTERVAL_S = 1


class PrometheusQueryError(RuntimeError):
    """Prometheus answered a query with ``status: error`` (a parse or evaluation error)."""

    def __init__(self, query: str, error_type: str, error: str) -> None:
        super().__init__(f"{error_type}: {error}")
        self.query, self.error_type, self.error = query, error_type, error


def require_tool(name: str) -> str:
    """Path of Debian's ``prometheus`` package's ``name`` (prometheus, promtool); skips the test
    (fails it in CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = (f"{name} is not installed: install it with scripts/install-system-deps.sh "
                   "(Debian package prometheus).")
        if in_ci():
            pytest.fail(message + " CI is set, so this is an error rather than a skip.", pytrace=False)
        pytest.skip(message)
    return path


def require_prometheus() -> str:
    return require_tool(PROMETHEUS)


def require_promtool() -> str:
    return require_tool("promtool")


class PrometheusServer:
    """``prometheus`` scraping ``targets`` (``host:port``, path ``/metrics``) as job ``job_name``,
    with ``labels`` added to every series; its files live under ``work_dir``."""

    def __init__(self, work_dir: Path, *, targets: Sequence[str], job_name: str,
                 labels: Mapping[str, str]) -> None:
        if not targets:
            raise ValueError("targets: give at least one host:port to scrape")
        self.work_dir = work_dir
        self.targets, self.job_name, self.labels = list(targets), job_name, dict(labels)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = work_dir / "prometheus.yml"
        self.log_path = work_dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None  # time.time() when it was ready
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def config(self, rule_files: Sequence[Path] = ()) -> dict[str, Any]:
        interval = f"{SCRAPE_INTERVAL_S}s"
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{
                "job_name": self.job_name,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": self.targets, "labels": self.labels}],
            }],
        }

    def start(self, timeout_s: float = 60.0) -> "PrometheusServer":
        binary = require_prometheus()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_at = time.time()
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.http.get("/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus was not ready within {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.http.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- configuration ---------------------------------------------------------------------------

    def load_rule_files(self, rule_files: Sequence[Path]) -> None:
        """Rewrite the config with ``rule_files`` and reload it; RuntimeError with Prometheus's
        message when it refuses them (the old config stays in force)."""
        self.config_path.write_text(yaml.safe_dump(self.config(rule_files)))
        response = self.http.post("/-/reload")
        if response.status_code != 200:
            # The reason is in the log only (the answer says "one or more errors occurred").
            raise RuntimeError(f"prometheus refused the rule files {[str(p) for p in rule_files]}: "
                               f"{response.text.strip()}\n{self.log_tail(5)}")

    # -- HTTP API --------------------------------------------------------------------------------

    def _api(self, path: str, params: Mapping[str, Any], query: str = "", *,
             method: str = "POST") -> Any:
        # POST: templated dashboard queries can be longer than a URL should be.
        if method == "POST":
            response = self.http.post(f"/api/v1/{path}", data=params)
        else:
            response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusQueryError(query, body.get("errorType", str(response.status_code)), body.get("error", ""))
        return body["data"]

    def query(self, expr: str, *, at: float | None = None) -> list[dict]:
        """Instant query: the result vector (or ``[scalar]``)."""
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        data = self._api("query", params, expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def query_range(self, expr: str, *, start: float, end: float, step_s: float) -> list[dict]:
        """Range query: one entry per series that had a value at any step."""
        data = self._api("query_range", {"query": expr, "start": start, "end": end, "step": step_s}, expr)
        return data["result"]

    def series(self, match: str, *, start: float, end: float) -> list[dict[str, str]]:
        """Label sets of the series ``match`` (a series selector) selects between ``start`` and ``end``."""
        return self._api("series", {"match[]": [match], "start": start, "end": end}, match)

    def metric_names(self) -> list[str]:
        response = self.http.get("/api/v1/label/__name__/values")
        return response.json()["data"]

    def active_targets(self) -> list[dict]:
        return self.http.get("/api/v1/targets", params={"state": "active"}).json()["data"]["activeTargets"]

    def wait_targets_up(self, timeout_s: float = 30.0) -> None:
        """Until every target has been scraped successfully (the scrape manager applies new
        targets every 5 s, so the first scrape comes a few seconds after start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = self.active_targets()
            if len(targets) == len(self.targets) and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                states = {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in targets}
                raise TimeoutError(f"prometheus targets not up within {timeout_s:.0f}s: {states or 'none yet'}")
            time.sleep(0.5)

    def rule_groups(self) -> list[dict]:
        return self._api("rules", {}, method="GET")["groups"]
