"""Shared fixtures. Heavy ones are session-scoped: building the tiny model takes a few seconds."""

from __future__ import annotations

import os

import pytest

# One torch thread in the test process: OpenMP spin-waits make 2 threads on 2 busy cores
# (Ray replicas run beside the tests) dramatically slower, see docs/benchmarks.md.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny random-weight diffusers ``StableVideoDiffusionPipeline`` (fp32, CPU)."""
    from pipelines.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipeline):
    """The tiny model written once per session in diffusers' save_pretrained layout."""
    path = tmp_path_factory.mktemp("tiny-svd")
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_t2i_model_dir(tmp_path_factory):
    """The tiny random-weight SDXL-shaped text-to-image model, written once per session."""
    from pipelines.tiny_t2i import write_tiny_text_to_image_model

    return write_tiny_text_to_image_model(tmp_path_factory.mktemp("tiny-t2i"))


# The moto S3 server fixtures live in their own module (tests/ is on sys.path under pytest's
# default import mode); importing them here makes them available to every test module.
from fixtures_s3 import moto_s3_endpoint, s3_bucket, s3_env  # noqa: E402,F401
from fixtures_local import local_service  # noqa: E402,F401
