"""``python -m loadtest.run``: run a profile headless, in this process, and write the report.

    python -m loadtest.run --target http://127.0.0.1:8000 --profile loadtest/profiles/burst.yaml \\
        --duration 2m --keys tenantA=KEY,tenantB=KEY --out DIR
    python -m loadtest.run --local --profile smoke          # start svd-serve up, run, stop it

Locust runs in-process (``Environment`` + ``LocalRunner`` + :class:`~loadtest.users.ProfileShape`),
so every job's record is at hand for the report. Replica counts per deployment are sampled during
the run: from the Ray cluster on this machine (found from the process listening on the target's
port, or ``--ray-address``), or from ``--dashboard-url``. Output in ``--out``: ``report.json``,
``report.md``, ``charts/*.png``, ``records.jsonl``, ``replicas.jsonl``, ``http.json``.

Exit status: 0 when the run completed (and, with ``--strict``, every check passed); 1 when checks
failed under ``--strict``; 2 for usage errors.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .local import run_local
from .session import run_cli


def run(argv: Sequence[str] | None = None, *, prog: str = "python -m loadtest.run") -> int:
    """Entry point of ``python -m loadtest.run`` and ``svd-serve loadtest``; returns the exit status."""
    return run_cli(argv, prog=prog, run_local=run_local)


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
