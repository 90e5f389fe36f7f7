"""The state file of a running ``svd-serve up`` (``DATA_DIR/svd-serve.json``): how later commands
(``svd-serve deploy``) find its Ray cluster, its URL and the app config it runs. Written once the
deployment is ready, rewritten by each ``svd-serve deploy``, removed when ``up`` stops."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.errors import SVDServeError

#: The state file ``svd-serve up`` writes into its data dir once ready, and removes when it stops.
STATE_FILE = "svd-serve.json"


class DeployError(SVDServeError):
    """An expected failure of ``svd-serve deploy`` (or of finding what it changes): printed as one line."""


@dataclass
class LocalState:
    """What ``svd-serve up`` tells later commands about itself."""

    pid: int
    gcs_address: str
    app_name: str
    host: str
    port: int
    url: str
    config: dict[str, Any] = field(default_factory=dict)
    dashboard_url: str | None = None
    #: RAY_AUTH_MODE of the cluster ("token": a new local cluster's default in Ray 2.60).
    auth_mode: str | None = None
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def write(self, data_dir: Path) -> Path:
        """Atomically (a reader never sees half a file)."""
        path = Path(data_dir) / STATE_FILE
        scratch = path.with_name(f".{STATE_FILE}.{os.getpid()}")
        scratch.write_text(json.dumps(asdict(self), indent=2))
        os.replace(scratch, path)
        return path

    @classmethod
    def read(cls, data_dir: Path) -> "LocalState":
        """The state of the ``svd-serve up`` running on ``data_dir``; DeployError if there is none."""
        path = Path(data_dir) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except FileNotFoundError:
            raise DeployError(f"no running svd-serve up found: {path} does not exist (start one with "
                              "`svd-serve up --data-dir DIR`, or pass --address of a Ray cluster)") from None
        except (OSError, ValueError, TypeError) as error:
            raise DeployError(f"{path} is not a state file of svd-serve up: {error}") from None
        if not _alive(state.pid):
            raise DeployError(f"the svd-serve up that wrote {path} (pid {state.pid}) is not running; "
                              "start it again with svd-serve up")
        return state

    @staticmethod
    def remove(data_dir: Path, *, pid: int) -> None:
        """Remove the state file if ``pid`` wrote it (a second ``up`` on the same dir keeps its own)."""
        path = Path(data_dir) / STATE_FILE
        try:
            if json.loads(path.read_text()).get("pid") == pid:
                path.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
