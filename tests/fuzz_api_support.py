"""What the API fuzz test (test_fuzz_api.py) runs against: the whole HTTP surface in process
(``create_api`` with the usage route, as the ingress mounts it; no Ray, no network), jobs ended
as the runner would end them, and the valid and hostile images generated requests carry."""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

from serve.api.app import create_api
from serve.api.service import VideoService
from serve.config import AppConfig
from serve.jobstore import THUMBNAIL_CONTENT_TYPE, JobError, JobOutput, make_job_store
from serve.metering import make_usage_ledger
from serve.metering.api import usage_router
from serve.storage import make_storage
from serve.tenants import TenantRegistry, add_tenant, rotate_webhook_secret
from serve.zoo import ModelCatalog, make_model_store

#: The model's own frame count as the fake model stage reports it.
MODEL_FRAMES = 14
#: Small enough that an oversized body is cheap to send, large enough for every image below.
MAX_UPLOAD_BYTES = 256 * 1024
#: A model of the zoo beside the default one: its id is a fal app id too (POST /acme/anime).
ZOO_MODEL = "acme/anime"


@dataclass
class FuzzAPI:
    app: FastAPI
    keys: dict[str, str]
    service: VideoService

    def settle(self, job_id: str, outcome: str, tenant: str = "alice") -> None:
        """End a queued job as the runner would (its event streams then end at once): ``cancelled``,
        ``failed`` (for its input: an error the adapters answer with a 4xx), ``completed`` (a clip
        and its thumbnail in storage) or ``gone`` (completed, then its clip deleted from storage)."""
        store, storage = self.service.store, self.service.storage
        if outcome == "cancelled":
            store.request_cancel(job_id, tenant=tenant)
            return
        job = store.claim(job_id, owner="fuzz-runner", lease_s=60)
        if outcome == "failed":
            store.fail(job_id, owner="fuzz-runner", error=JobError(code="invalid_image", message="unreadable image"))
            return
        stored = storage.put(job.output_key, FAKE_MP4, content_type="video/mp4")
        output = JobOutput(key=job.output_key, content_type="video/mp4", file_name=f"{job_id}.mp4",
                           file_size=stored.size, num_frames=MODEL_FRAMES, fps=7.0, width=64, height=36)
        storage.put(output.thumbnail_key, THUMBNAIL, content_type=THUMBNAIL_CONTENT_TYPE)
        store.complete(job_id, owner="fuzz-runner", output=output, timings={"sampling": 0.1})
        if outcome == "gone":
            storage.delete(output.key)


def build_fuzz_api(tmp_path: Path) -> FuzzAPI:
    """Every route of the ingress over SQLite and local storage under ``tmp_path``. Tenants:
    ``alice`` (no quotas, and a webhook secret, so webhook URLs get as far as their checks) and
    ``bob`` (one submission a minute).
    POST /v1/video/generations never waits (``generations_wait_s`` 0): no runner ends a job
    (:meth:`FuzzAPI.settle` does)."""
    config = AppConfig.model_validate({
        "storage": {"local_dir": str(tmp_path / "outputs")},
        "job_store": {"sqlite_path": str(tmp_path / "jobs.sqlite3")},
        "max_upload_bytes": MAX_UPLOAD_BYTES,
        "generations_wait_s": 0,
        "models": [{"id": ZOO_MODEL, "source": "acme/svd-anime-weights"}],
    })
    tenants_file = tmp_path / "tenants.yaml"
    # alice submits without quotas (admissions all the way); bob is rate limited at once (429s).
    keys = {"alice": add_tenant(tenants_file, "alice", rate_limit_per_minute=None, max_queued_jobs=None),
            "bob": add_tenant(tenants_file, "bob", rate_limit_per_minute=1, burst=1)}
    rotate_webhook_secret(tenants_file, "alice")

    async def model_info(model_id=None):
        return {"num_frames": MODEL_FRAMES}

    service = VideoService(config, store=make_job_store(config.job_store), storage=make_storage(config.storage),
                           model_info=model_info,
                           catalog=ModelCatalog(config, make_model_store(config.job_store)))
    tenants = TenantRegistry(tenants_file)
    ledger = make_usage_ledger(config.job_store)
    app = create_api(service, tenants, routers=[usage_router(ledger, tenants.authenticate)])
    return FuzzAPI(app=app, keys=keys, service=service)


def no_dns(host, *args, **kwargs):
    """``socket.getaddrinfo`` for the fuzz run: no name resolves and nothing is connected to, so a
    generated URL (image_url, webhook_url) is refused at once and never reaches the network."""
    raise socket.gaierror(socket.EAI_NONAME, "name resolution is off in the fuzz test")


def png(width: int, height: int, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk(image: bytes, kind: bytes, data: bytes) -> bytes:
    """``image`` (a PNG) with one more chunk right after its header chunk."""
    after_header = 8 + 4 + 4 + 13 + 4  # signature, IHDR's length, type, data and CRC
    return image[:after_header] + png_chunk(kind, data) + image[after_header:]


def with_size(image: bytes, width: int, height: int) -> bytes:
    """``image`` (a PNG) whose header claims another size (the pixel data does not match it)."""
    header = struct.pack(">II", width, height) + image[24:29]
    return image[:8] + png_chunk(b"IHDR", header) + image[33:]


#: Valid conditioning images: small, and of the sizes Stability's API accepts (it takes no other).
SMALL_PNG = png(64, 36)
STABILITY_PNGS = (png(1024, 576), png(576, 1024), png(768, 768))
IMAGES = (SMALL_PNG, *STABILITY_PNGS)

#: What a completed job's clip and thumbnail hold (nothing reads them as media).
FAKE_MP4 = b"\x00\x00\x00\x18ftypisom fake mp4"
THUMBNAIL = b"\xff\xd8\xff\xe0 fake jpeg"

#: A few kilobytes that inflate to 4 MiB: over Pillow's limit for a text or colour-profile chunk.
_BOMB = zlib.compress(bytes(4 << 20), 9)
#: Images that must be refused (413 or 422), never a 5xx: empty, not an image, cut short, a huge
#: compressed text (zTXt, iTXt) or colour profile (iCCP) chunk, a header claiming 60000x60000 pixels.
HOSTILE_IMAGES = (
    b"",
    b"GIF89a not really",
    SMALL_PNG[: len(SMALL_PNG) // 2],
    with_chunk(SMALL_PNG, b"zTXt", b"Comment\0\0" + _BOMB),
    with_chunk(SMALL_PNG, b"iTXt", b"Comment\0\x01\0\0\0" + _BOMB),
    with_chunk(SMALL_PNG, b"iCCP", b"icc\0\0" + _BOMB),
    with_size(SMALL_PNG, 60000, 60000),
)


def with_auth(headers: dict[str, Any] | None, value: str | None) -> dict[str, Any]:
    """``headers`` with its Authorization (any spelling) replaced by ``value`` (None: left as generated)."""
    headers = dict(headers or {})
    if value is None:
        return headers
    for name in [name for name in headers if name.lower() == "authorization"]:
        del headers[name]
    headers["Authorization"] = value
    return headers
