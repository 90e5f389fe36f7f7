"""A real S3-compatible HTTP server for tests: moto in server mode on 127.0.0.1.

Code under test talks to it over HTTP through boto3 with ``endpoint_url``, exactly as it would
talk to MinIO or AWS; nothing in-process is patched. Import the fixtures from ``conftest.py``.
"""

from __future__ import annotations

import uuid

import pytest

#: Dummy credentials: moto accepts any; tests assert these never show up in messages.
TEST_ACCESS_KEY_ID = "AKIATESTSVDSERVE0001"
TEST_SECRET_ACCESS_KEY = "svd-serve-test-secret-0123456789abcdefghij"


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    """URL of a moto S3 server shared by the whole session (tests use their own buckets)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free port
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Isolate boto3 from the host's AWS config and give it dummy credentials through the environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_bucket(moto_s3_endpoint, s3_env):
    """``(boto3 client, bucket name)`` for a fresh, empty bucket on the moto server."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1")
    bucket = f"svd-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket
