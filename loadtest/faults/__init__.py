"""Fault runs: the application on a local multi-node Ray cluster under a steady load while its
backing services and replicas are broken on purpose (``tests/test_fault_suite.py`` runs a short
one in CI, ``scripts/fault_suite.py`` a long one whose figures are in docs/reliability.md)."""

from .load import LoadReport, SteadyLoad
from .run import FaultReport, FaultRun

__all__ = ["FaultReport", "FaultRun", "LoadReport", "SteadyLoad"]
