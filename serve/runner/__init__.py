"""The job runner: a dispatcher (claims and leases), a driver (one job through its stages, failure
classification) and a janitor (lease recovery, retention, gauges; elected once per cluster)."""

from .dispatcher import JobRunner
from .driver import JobDriver
from .failures import INFRASTRUCTURE_ERRORS, classify, is_infrastructure_error
from .janitor import Janitor

__all__ = ["INFRASTRUCTURE_ERRORS", "JobDriver", "JobRunner", "Janitor", "classify", "is_infrastructure_error"]
