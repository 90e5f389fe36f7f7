"""``svd-serve warm-cache``: the real CLI in fresh processes fills the compile cache a replica
would (same StageModels load path, key and blob), finds it on a second run, and refuses configs it
cannot warm with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_config(path: Path, tiny: Path, stages: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"source": str(tiny), "dtype": "fp32", "device": "cpu"}, "model_id": "a",
        "text_to_image_model": None, "job_store": {"sqlite_path": str(path.parent / "jobs.sqlite3")},
        "stages": stages}))
    return path


def warm_cache(*args: str | Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", "warm-cache", *map(str, args)], cwd=REPO,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.second_lane
def test_warm_cache_fills_the_cache_a_replica_reads(tmp_path, tiny_model_dir):
    cache = tmp_path / "compile-cache"
    config = write_config(tmp_path / "app.yaml", tiny_model_dir, {"sampler": {
        "acceleration": {"compile": "default", "scope": "regional", "cache_dir": str(cache)},
        "warmup_shapes": [{"width": 64, "height": 64, "num_frames": 4}]}})
    first = warm_cache("--config", config)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line.split() for line in first.stdout.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["sampling", "a", "miss"]], first.stdout
    blobs = sorted(cache.glob("sampling-*.megacache"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 0 and blobs[0].with_suffix(".json").exists()

    # A new process, as a replica starting after the Job: the blob is found and used.
    second = warm_cache("--config", config, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor")})
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.splitlines()[1].split()[:3] == ["sampling", "a", "hit"], second.stdout


@pytest.mark.parametrize("stages, args, message", [
    ({}, [], "no stage of this config compiles"),
    ({"sampler": {"acceleration": {"compile": "default"}}}, [], "stage 'sampling' compiles but has no "
                                                                "acceleration.cache_dir"),
    ({"sampler": {"acceleration": {"compile": "default", "cache_dir": "/tmp/x"}}}, ["--stage", "bogus"],
     "unknown stage 'bogus'"),
    ({"sampler": {"acceleration": {"compile": "default", "cache_dir": "/tmp/x"}}}, ["--model", "nope"],
     "no model 'nope'"),
])
def test_warm_cache_refuses_what_it_cannot_warm(tmp_path, tiny_model_dir, stages, args, message):
    config = write_config(tmp_path / "app.yaml", tiny_model_dir, stages)
    result = warm_cache("--config", config, *args, timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-serve warm-cache: ") and message in lines[0], lines
