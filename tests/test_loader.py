"""pipelines.loader: local directories, S3 (a real moto server over HTTP) and the Hub's error paths.

Hub checks run in a subprocess because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when
it is imported; they talk to a closed port or to a small local HTTP server that answers like the Hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from fixtures_s3 import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
from pipelines.errors import ModelLoadError
from pipelines.loader import (
    DEFAULT_MODEL_ID,
    ModelSpec,
    load_components,
    load_pipeline,
    resolve_model_dir,
    sync_s3,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_HF_TOKEN = "hf_svdServeTestToken0123456789abcdef"


def _assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def _config(model) -> dict:
    # Tuples become lists in a JSON round trip; private keys record where/how a config was made.
    return {k: v for k, v in json.loads(json.dumps(dict(model.config))).items() if not k.startswith("_")}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# Local directories
# ------------------------------------------------------------------------------------------


def test_spec_defaults():
    spec = ModelSpec()
    assert (spec.source, spec.dtype, spec.device, spec.variant) == (DEFAULT_MODEL_ID, "fp16", "auto", "auto")
    with pytest.raises(ValueError):
        ModelSpec(device="gpu")


def test_local_dir_loads_pipeline(tiny_model_dir, tiny_pipeline):
    spec = ModelSpec(source=str(tiny_model_dir), dtype="fp32", device="cpu")
    assert resolve_model_dir(spec) == tiny_model_dir

    pipe = load_pipeline(spec)

    assert type(pipe).__name__ == "StableVideoDiffusionPipeline"
    assert _config(pipe.unet) == _config(tiny_pipeline.unet)
    assert not pipe.unet.training and not pipe.vae.training and not pipe.image_encoder.training
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    expected = tiny_pipeline.unet.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in pipe.unet.state_dict().items())


def test_load_components_loads_only_the_named_parts(tiny_model_dir, tmp_path):
    # A copy without the image encoder and the VAE: the sampler's parts must load without them.
    partial = tmp_path / "sampler-only"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "model_index.json", partial)
    for name in ("unet", "scheduler"):
        shutil.copytree(tiny_model_dir / name, partial / name)

    parts = load_components(ModelSpec(source=str(partial), dtype="fp32", device="cpu"), ("unet", "scheduler"))

    assert set(parts) == {"unet", "scheduler"}
    assert type(parts["unet"]).__name__ == "UNetSpatioTemporalConditionModel"
    assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ModelLoadError, match="no vae/ folder"):
        load_components(ModelSpec(source=str(partial), dtype="fp32", device="cpu"), ("vae",))
    with pytest.raises(ModelLoadError, match="has no component 'text_encoder'"):
        load_components(ModelSpec(source=str(partial), dtype="fp32", device="cpu"), ("text_encoder",))


def test_fp16_on_cpu_falls_back_to_fp32(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.loader"):
        parts = load_components(ModelSpec(source=str(tiny_model_dir), dtype="fp16", device="cpu"), ("vae",))
    assert parts["vae"].dtype == torch.float32
    assert "fp16 is not supported on CPU" in caplog.text


@pytest.fixture(scope="module")
def both_variants_dir(tmp_path_factory):
    """Full-precision files from seed 0 and fp16 variant files from seed 1: the weights tell which loaded."""
    from pipelines.tiny import build_tiny_pipeline, write_tiny_model

    model_dir = write_tiny_model(tmp_path_factory.mktemp("both-variants"))
    build_tiny_pipeline(seed=1).to(torch.float16).save_pretrained(model_dir, variant="fp16")
    return model_dir


def test_fp16_variant_files_are_preferred_for_half_precision(both_variants_dir, tmp_path):
    from pipelines.tiny import build_tiny_pipeline, write_tiny_model

    model_dir = both_variants_dir
    assert (model_dir / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    full = load_components(
        ModelSpec(source=str(write_tiny_model(tmp_path / "full")), dtype="fp32", device="cpu"), ("vae",)
    )
    fp16_ref = build_tiny_pipeline(seed=1).vae.to(torch.float16).to(torch.bfloat16)

    def vae(**kwargs):
        return load_components(ModelSpec(source=str(model_dir), device="cpu", **kwargs), ("vae",))["vae"]

    def same(a, b):
        sb = b.state_dict()
        return all(torch.equal(v, sb[k].to(v.dtype)) for k, v in a.state_dict().items())

    bf16 = vae(dtype="bf16")  # auto + half precision -> the fp16 files
    assert bf16.dtype == torch.bfloat16 and same(bf16, fp16_ref)
    assert not same(bf16, full["vae"])  # the two weight sets really differ
    assert same(vae(dtype="fp32"), full["vae"])  # auto + fp32 -> the full files
    assert same(vae(dtype="bf16", variant="none"), full["vae"].to(torch.bfloat16))
    with pytest.raises(ModelLoadError, match="no fp16 weight files"):
        load_components(ModelSpec(source=str(tmp_path / "full"), device="cpu", variant="fp16"), ("vae",))


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir(ModelSpec(source=str(missing)))
    assert str(info.value) == f"Model directory {missing} does not exist"


def test_directory_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(ModelSpec(source=str(tmp_path), device="cpu"))
    message = str(info.value)
    _assert_one_line(message)
    assert message == (
        f"Model directory {tmp_path} has no model_index.json: it is not a diffusers save_pretrained layout"
    )


def test_revision_is_rejected_for_a_local_directory(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="revision is only meaningful"):
        resolve_model_dir(ModelSpec(source=str(tiny_model_dir), revision="v1"))


# ------------------------------------------------------------------------------------------
# S3 (moto server over HTTP)
# ------------------------------------------------------------------------------------------

PREFIX = "models/svd-tiny"


def _upload_dir(client, bucket: str, root: Path, prefix: str) -> int:
    files = _files(root)
    for rel, body in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
    return len(files)


def _mtimes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_s3_sync_downloads_once_and_only_what_changed(
    s3_bucket, moto_s3_endpoint, tiny_model_dir, tiny_pipeline, tmp_path
):
    client, bucket = s3_bucket
    count = _upload_dir(client, bucket, tiny_model_dir, PREFIX)
    # A console-style "folder" marker and a sibling prefix sharing the name's start must be ignored.
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}-old/model_index.json", Body=b"{}")
    spec = ModelSpec(
        source=f"s3://{bucket}/{PREFIX}",
        cache_dir=str(tmp_path / "cache"),
        s3_endpoint_url=moto_s3_endpoint,
        dtype="fp32",
        device="cpu",
    )

    first = sync_s3(spec)
    assert first.local_dir == tmp_path / "cache" / "s3" / bucket / PREFIX
    assert len(first.downloaded) == count and first.reused == 0
    assert {k: v for k, v in _files(first.local_dir).items() if not k.startswith(".")} == _files(
        tiny_model_dir
    )

    before = _mtimes(first.local_dir)
    second = sync_s3(spec)
    assert second.downloaded == () and second.reused == count and second.removed == ()
    assert _mtimes(second.local_dir) == before  # nothing was rewritten

    # A changed object and a new one are fetched; nothing else is. A deleted object's copy goes away.
    config = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    config["steps_offset"] = 1
    client.put_object(
        Bucket=bucket, Key=f"{PREFIX}/scheduler/scheduler_config.json", Body=json.dumps(config).encode()
    )
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/README.md", Body=b"extra")
    third = sync_s3(spec)
    assert sorted(third.downloaded) == ["README.md", "scheduler/scheduler_config.json"]
    assert third.reused == count - 1
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/README.md")
    fourth = sync_s3(spec)
    assert fourth.removed == ("README.md",) and fourth.downloaded == ()
    assert not (fourth.local_dir / "README.md").exists()
    # A local copy damaged behind the manifest's back (here: truncated) is fetched again.
    (fourth.local_dir / "vae" / "config.json").write_text("{")
    assert sync_s3(spec).downloaded == ("vae/config.json",)

    # Leftovers of a killed download are cleaned up, and the mirror loads as a pipeline.
    stale = fourth.local_dir / "unet" / ".diffusion_pytorch_model.safetensors.abc.svd-part"
    stale.write_bytes(b"partial")
    pipe = load_pipeline(spec)
    assert not stale.exists()
    assert _config(pipe.unet) == _config(tiny_pipeline.unet)
    assert pipe.scheduler.config.steps_offset == 1


def test_s3_partial_sync_for_one_stage(s3_bucket, moto_s3_endpoint, tiny_model_dir, monkeypatch, tmp_path):
    client, bucket = s3_bucket
    _upload_dir(client, bucket, tiny_model_dir, PREFIX)
    # Endpoint and cache root from the environment instead of the spec.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3_endpoint)
    monkeypatch.setenv("SVD_SERVE_CACHE_DIR", str(tmp_path / "env-cache"))
    spec = ModelSpec(source=f"s3://{bucket}/{PREFIX}/", dtype="fp32", device="cpu")

    parts = load_components(spec, ("vae",))

    local = tmp_path / "env-cache" / "s3" / bucket / PREFIX
    assert set(parts) == {"vae"}
    assert sorted(p.parent.name for p in local.glob("*/*") if p.is_file()) == ["vae", "vae"]


def test_s3_missing_bucket_and_empty_prefix(s3_bucket, moto_s3_endpoint, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="other/model_index.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="weights-only/unet/config.json", Body=b"{}")

    def error(source: str) -> str:
        spec = ModelSpec(source=source, cache_dir=str(tmp_path), s3_endpoint_url=moto_s3_endpoint)
        with pytest.raises(ModelLoadError) as info:
            resolve_model_dir(spec)
        message = str(info.value)
        _assert_one_line(message)
        assert TEST_SECRET_ACCESS_KEY not in message and TEST_ACCESS_KEY_ID not in message
        return message

    host = moto_s3_endpoint.removeprefix("http://")
    assert (
        error("s3://svd-no-such-bucket/models")
        == f"S3 bucket 'svd-no-such-bucket' does not exist at http://{host}"
    )
    assert (
        error(f"s3://{bucket}/nothing/here")
        == f"No objects under s3://{bucket}/nothing/here/: check the bucket and prefix"
    )
    assert "has no model_index.json" in error(f"s3://{bucket}/weights-only")


@contextmanager
def _http_server(handler_cls):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _DenyAllS3(BaseHTTPRequestHandler):
    """An S3 endpoint whose policy denies everything, answering as S3 does."""

    def do_GET(self):  # noqa: N802 - http.server API
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>'
            b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_s3_access_denied(s3_env, tmp_path):
    with _http_server(_DenyAllS3) as endpoint:
        spec = ModelSpec(source="s3://private-bucket/svd", cache_dir=str(tmp_path), s3_endpoint_url=endpoint)
        with pytest.raises(ModelLoadError) as info:
            resolve_model_dir(spec)
    message = str(info.value)
    assert (
        message
        == "Access denied to list s3://private-bucket/svd/: check the credentials and the bucket policy"
    )
    assert TEST_SECRET_ACCESS_KEY not in message


# ------------------------------------------------------------------------------------------
# Hugging Face Hub (subprocesses; no real network)
# ------------------------------------------------------------------------------------------

_RESOLVE_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.DEBUG)
from pipelines.errors import ModelLoadError
from pipelines.loader import ModelSpec, resolve_model_dir
try:
    path = resolve_model_dir(ModelSpec(**json.loads(sys.argv[1])))
except ModelLoadError as err:
    print("ModelLoadError:", err)
    sys.exit(3)
print(path)
"""


def _hub_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The test's environment minus any Hub settings or token of the host, plus ``env``."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))
    }
    clean.update(
        HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT), **env
    )
    return clean


def _run_resolve(spec: dict, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """resolve_model_dir in a fresh interpreter (huggingface_hub reads its env at import)."""
    return subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT, json.dumps(spec)],
        env=_hub_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _resolve_in_subprocess(spec: dict, tmp_path: Path, **env: str) -> tuple[str, str]:
    """Run resolve_model_dir in a fresh interpreter; return (error message, all output)."""
    proc = _run_resolve(spec, tmp_path, **env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ModelLoadError: ")]
    assert len(lines) == 1, output
    return lines[0].removeprefix("ModelLoadError: "), output


def _resolve_ok_in_subprocess(spec: dict, tmp_path: Path, **env: str) -> str:
    """Run resolve_model_dir in a fresh interpreter and return the directory it printed."""
    proc = _run_resolve(spec, tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hub_unreachable_is_one_line(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    message, _ = _resolve_in_subprocess(
        {"source": "acme/svd", "device": "cpu"}, tmp_path, HF_ENDPOINT=endpoint
    )
    _assert_one_line(message)
    assert message.startswith(
        f"Cannot reach the Hugging Face Hub at {endpoint} (ConnectError) and 'acme/svd'"
    )
    assert "is not in the cache" in message


def test_hub_offline_with_empty_cache_is_one_line(tmp_path):
    spec = {"source": DEFAULT_MODEL_ID, "device": "cpu", "cache_dir": str(tmp_path / "empty-cache")}
    message, _ = _resolve_in_subprocess(spec, tmp_path, HF_HUB_OFFLINE="1")
    _assert_one_line(message)
    assert message == (
        f"HF_HUB_OFFLINE is set and '{DEFAULT_MODEL_ID}' (revision main) is not in the cache at "
        f"{tmp_path / 'empty-cache' / 'huggingface'}"
    )


FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


class _FakeHub(BaseHTTPRequestHandler):
    """Answers the Hub's HTTP API like huggingface.co for three repos.

    'acme/svd-tiny' serves ``repo_files`` at commit FAKE_SHA; 'acme/gated' is gated (401 with
    ``X-Error-Code: GatedRepo``); every other repo does not exist (404 ``RepoNotFound``).
    """

    repo_files: dict[str, bytes] = {}
    requests: list[tuple[str, str, str]] = []  # (method, path, Authorization header)
    outage = False  # answer every request with 503, as during a Hub incident

    def _send(self, status: int, body: bytes, headers: dict[str, str]):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _answer(self):
        path = unquote(urlsplit(self.path).path)
        type(self).requests.append((self.command, path, self.headers.get("Authorization", "")))
        if type(self).outage:
            return self._send(503, b"Service Unavailable", {"Content-Type": "text/plain"})
        repo, files = "acme/svd-tiny", type(self).repo_files
        if path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/main"):
            return self._json(
                {"id": repo, "sha": FAKE_SHA, "siblings": [{"rfilename": name} for name in files]}
            )
        if path == f"/api/models/{repo}/tree/{FAKE_SHA}":
            return self._json(
                [
                    {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                    for name, body in files.items()
                ]
            )
        resolve = f"/{repo}/resolve/{FAKE_SHA}/"
        if path.startswith(resolve) and path[len(resolve) :] in files:
            body = files[path[len(resolve) :]]
            return self._send(
                200, body, {"X-Repo-Commit": FAKE_SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
            )
        if "/acme/gated" in path:
            status, code = 401, "GatedRepo"
            message = (
                "Access to model acme/gated is restricted. You must have access to it and be authenticated."
            )
        else:
            status, code, message = 404, "RepoNotFound", "Repository not found"
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(status, json.dumps({"error": message}).encode(), headers)

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_hub_gated_and_missing_repos(tmp_path):
    _FakeHub.requests = []
    with _http_server(_FakeHub) as endpoint:
        spec = {"source": "acme/gated", "device": "cpu"}
        message, _ = _resolve_in_subprocess(spec, tmp_path, HF_ENDPOINT=endpoint)
        assert message == "Model repo 'acme/gated' is gated: accept its licence on the Hub and set HF_TOKEN"

        message, output = _resolve_in_subprocess(spec, tmp_path, HF_ENDPOINT=endpoint, HF_TOKEN=FAKE_HF_TOKEN)
        _assert_one_line(message)
        assert "is gated" in message and "HF_TOKEN" in message
        assert FAKE_HF_TOKEN not in output  # not in the message, nor in any (debug) log line

        message, _ = _resolve_in_subprocess(
            {"source": "acme/missing", "device": "cpu"}, tmp_path, HF_ENDPOINT=endpoint
        )
        assert message == (
            "Model repo 'acme/missing' was not found on the Hub (set HF_TOKEN if it is private), "
            "and no local directory has that name"
        )
    assert f"Bearer {FAKE_HF_TOKEN}" in {auth for _, _, auth in _FakeHub.requests}  # HF_TOKEN was sent


def test_hub_download_fetches_only_needed_files_then_works_offline(both_variants_dir, tmp_path):
    files = _files(both_variants_dir)
    files["svd_tiny.safetensors"] = b"single-file checkpoint that the pipeline never needs"
    _FakeHub.repo_files, _FakeHub.requests = files, []
    cache = tmp_path / "cache"
    spec = {"source": "acme/svd-tiny", "dtype": "bf16", "device": "cpu", "cache_dir": str(cache)}
    with _http_server(_FakeHub) as endpoint:
        snapshot = Path(_resolve_ok_in_subprocess(spec, tmp_path, HF_ENDPOINT=endpoint))
        fetched = {
            path.split(f"/{FAKE_SHA}/", 1)[1]
            for method, path, _ in _FakeHub.requests
            if method == "GET" and "/resolve/" in path
        }
        _FakeHub.requests = []
        # Offline, the same spec resolves from the cache without a single request.
        assert _resolve_ok_in_subprocess(spec, tmp_path, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1") == str(
            snapshot
        )
        assert _FakeHub.requests == []
        # During a Hub outage (HTTP 503) the cached snapshot is used as well.
        _FakeHub.outage = True
        try:
            assert _resolve_ok_in_subprocess(spec, tmp_path, HF_ENDPOINT=endpoint) == str(snapshot)
        finally:
            _FakeHub.outage = False

    assert snapshot == cache / "huggingface" / "models--acme--svd-tiny" / "snapshots" / FAKE_SHA
    expected = {
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "image_encoder/config.json",
        "image_encoder/model.fp16.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }
    assert fetched == expected
    assert set(_files(snapshot)) == expected
    vae = load_components(ModelSpec(source=str(snapshot), dtype="bf16", device="cpu"), ("vae",))["vae"]
    assert vae.dtype == torch.bfloat16


def test_hub_file_selection_takes_one_weight_set_per_component():
    from pipelines.loader import _component_filter, _select_hub_files

    # The file list of stabilityai/stable-video-diffusion-img2vid-xt-1-1 (plus a .bin to ignore).
    repo_files = [
        ".gitattributes",
        "LICENSE",
        "README.md",
        "model_index.json",
        "svd_xt_1_1.safetensors",
        "feature_extractor/preprocessor_config.json",
        "image_encoder/config.json",
        "image_encoder/model.fp16.safetensors",
        "image_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    index = {
        "_class_name": "StableVideoDiffusionPipeline",
        **{n: ["x", "Y"] for n in ("feature_extractor", "image_encoder", "scheduler", "unet", "vae")},
    }
    everything = _component_filter(None)

    half = _select_hub_files(repo_files, index, True, "auto", everything, "r")
    assert sorted(half) == sorted(
        [
            "model_index.json",
            "feature_extractor/preprocessor_config.json",
            "image_encoder/config.json",
            "image_encoder/model.fp16.safetensors",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )
    full = _select_hub_files(repo_files, index, False, "auto", everything, "r")
    assert "unet/diffusion_pytorch_model.safetensors" in full and not any(
        ".fp16." in f or f.endswith(".bin") for f in full
    )
    sampler = _select_hub_files(
        repo_files, index, True, "auto", _component_filter(("unet", "scheduler")), "r"
    )
    assert sorted(sampler) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    # A repo without fp16 files falls back to the full ones under "auto" and is an error under "fp16".
    no_half = [f for f in repo_files if ".fp16." not in f]
    assert "vae/diffusion_pytorch_model.safetensors" in _select_hub_files(
        no_half, index, True, "auto", everything, "r"
    )
    with pytest.raises(ModelLoadError, match="r/image_encoder has no fp16 weight files"):
        _select_hub_files(no_half, index, True, "fp16", everything, "r")
