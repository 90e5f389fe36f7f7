"""The HTTP API without Ray: admission, validation, the error schema, tenancy, idempotency.

The FastAPI app runs in process over a real SQLite job store and a real local storage
directory. Jobs are moved through their states with the job store's own API (what the runner
does), so every endpoint is exercised in every state.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures_api import make_api
from PIL import Image

from pipelines.params import GenerationParams
from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.forms import MAX_FORM_FIELDS
from serve.jobstore import JobError, JobOutput
from serve.tenants import add_tenant

PNG = Path(SAMPLE_IMAGE_PATH).read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture
def api(tmp_path):
    return make_api(tmp_path, url_allowlist=["127.0.0.2"])


def h(api, tenant="alice", **extra):
    return {"Authorization": f"Bearer {api.keys[tenant]}", **extra}


def submit(api, tenant="alice", **body):
    return api.post("/v1/videos", headers=h(api, tenant), json={"image_url": DATA_URL, **SMALL, **body})


def assert_error(response, status, code, contains=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert contains in body["error"]["message"]
    assert "Traceback" not in response.text and "Error:" not in body["error"]["message"]


def finish(api, job_id, data=b"\x00\x00\x00\x18ftypisom fake mp4"):
    """Drive a job to completed the way the runner does."""
    store, storage = api.service.store, api.service.storage
    job = store.claim(job_id, owner="test-runner", lease_s=30)
    key = job.output_key
    stored = storage.put(key, data, content_type="video/mp4")
    store.complete(job_id, owner="test-runner", timings={"total": 0.1},
                   output=JobOutput(key=key, content_type="video/mp4", file_name=f"{job_id}.mp4", file_size=stored.size))


def test_submit_returns_202_with_resolved_params_and_queue_position(api):
    response = submit(api, cond_aug=0.1)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/videos/{job['id']}"
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert 0 <= job["params"]["seed"] <= 2**32 - 2
    assert job["params"]["noise_aug_strength"] == 0.1 and job["params"]["num_frames"] == 4
    second = submit(api).json()
    assert second["queue_position"] == 1
    assert api.get(f"/v1/videos/{job['id']}", headers=h(api)).json()["params"] == job["params"]


def test_default_frames_come_from_the_model(api):
    job = submit(api, num_frames=None).json()
    assert job["params"]["num_frames"] == 14


def test_multipart_upload_with_params_field(api):
    response = api.post("/v1/videos", headers=h(api), files={"image": ("x.png", PNG, "image/png")},
                        data={"params": '{"seed": 7, "width": 64, "height": 64}'})
    assert response.status_code == 202, response.text
    assert response.json()["params"]["seed"] == 7
    assert_error(api.post("/v1/videos", headers=h(api), files={"image": ("x.png", PNG)}, data={"params": "{"}),
                 422, "invalid_input", "params: not valid JSON")
    assert_error(api.post("/v1/videos", headers=h(api), files={"other": ("x.png", PNG)}),
                 422, "invalid_input", "named 'image'")


def test_webhook_events_without_a_webhook_url_are_refused_not_dropped(api):
    assert_error(upload(api, {"webhook_events": "progress"}), 422, "invalid_input", "without a webhook_url")
    assert_error(api.post("/v1/videos", headers=h(api), json={"image_url": DATA_URL, "webhook_events": ["progress"]}),
                 422, "invalid_input", "without a webhook_url")


def upload(api, data=None, files=None):
    """A multipart submit with the sample image, as ``curl -F image=@x.png -F seed=5`` sends it."""
    return api.post("/v1/videos", headers=h(api), files=files or {"image": ("x.png", PNG, "image/png")}, data=data)


def test_multipart_flat_fields_are_the_generation_parameters(api):
    response = upload(api, {"seed": "5", "motion_bucket_id": "40", "num_frames": "4", "fps": "6",
                            "cond_aug": "0.1", "min_guidance_scale": "1.5", "output_format": "webm",
                            "width": "64", "height": "64"})
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert params["seed"] == 5 and params["motion_bucket_id"] == 40 and params["num_frames"] == 4
    assert params["fps"] == 6 and params["noise_aug_strength"] == 0.1 and params["min_guidance_scale"] == 1.5
    assert params["output_format"] == "webm" and (params["width"], params["height"]) == (64, 64)
    assert api.get(f"/v1/videos/{response.json()['id']}", headers=h(api)).json()["params"] == params
    # Flat fields and the params object combine; the field name works as well as the alias.
    both = upload(api, {"noise_aug_strength": "0.3", "aspect_ratio": "1:1", "params": '{"seed": 9, "num_frames": 4}'})
    assert both.status_code == 202, both.text
    assert both.json()["params"]["seed"] == 9 and both.json()["params"]["noise_aug_strength"] == 0.3
    assert both.json()["params"]["aspect_ratio"] == "1:1"


@pytest.mark.parametrize("field, value", [
    ("motion_bucket_id", 300), ("width", 100), ("seed", "abc"), ("output_format", "avi"), ("frames", 3),
])
def test_multipart_fields_fail_with_the_json_message(api, field, value):
    as_json = submit(api, **{field: value})
    assert as_json.status_code == 422, as_json.text
    as_form = upload(api, {**{k: str(v) for k, v in SMALL.items()}, field: str(value)})
    assert_error(as_form, 422, "invalid_parameter", field)
    assert as_form.json() == as_json.json()


def test_multipart_parameters_are_given_once(api):
    assert_error(upload(api, {"seed": "5", "params": '{"seed": 6}'}), 422, "invalid_parameter", "seed: given twice")
    assert_error(upload(api, {"cond_aug": "0.1", "params": '{"noise_aug_strength": 0.2}'}),
                 422, "invalid_parameter", "noise_aug_strength: given twice")
    assert_error(upload(api, {"cond_aug": "0.1", "noise_aug_strength": "0.2"}),
                 422, "invalid_parameter", "noise_aug_strength: given twice")
    assert_error(upload(api, {"seed": ["5", "5"]}), 422, "invalid_parameter", "seed: given more than once")
    assert_error(upload(api, {"webhook_url": ["https://a.example", "https://b.example"]}),
                 422, "invalid_parameter", "webhook_url: given more than once")
    assert_error(upload(api, {"webhook": "https://a.example"}), 422, "invalid_parameter", "webhook: unknown parameter")
    extra_file = [("image", ("x.png", PNG)), ("params", ("p.json", b"{}"))]
    assert_error(upload(api, files=extra_file), 422, "invalid_input", "one file")
    assert api.get("/v1/videos", headers=h(api)).json()["data"] == []


def test_multipart_field_count_is_capped_in_the_error_shape(api):
    # + image, input_reference (file, [image_url], [file_id]), params, webhook_url, webhook_events,
    # prompt, model, seconds, size
    assert MAX_FORM_FIELDS == len(GenerationParams.model_fields) + 11
    at_cap = upload(api, {f"field{i}": "1" for i in range(MAX_FORM_FIELDS)})
    assert_error(at_cap, 422, "invalid_parameter", "field0: unknown parameter")  # parsed, then refused by name
    over = upload(api, {f"field{i}": "1" for i in range(MAX_FORM_FIELDS + 1)})
    assert_error(over, 422, "too_many_fields", f"more than {MAX_FORM_FIELDS} form fields")


def test_multipart_schema_lists_every_parameter(api):
    body = api.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    expected = set(GenerationParams.model_json_schema()["properties"]) | {
        "image", "params", "webhook_url", "webhook_events",
        "input_reference", "input_reference[image_url]", "prompt", "model", "seconds", "size"}
    assert set(form["properties"]) == expected and "cond_aug" in form["properties"]
    assert form["properties"]["output_format"]["enum"] == ["mp4", "webm", "gif"]
    assert "$ref" not in str(form) and "required" not in form  # one of image, input_reference, its URL
    as_json = body["application/json"]["schema"]["properties"]
    assert {"image_url", "input_reference", "prompt", "model", "seconds", "size"} <= set(as_json)


@pytest.mark.parametrize("headers, message", [
    ({}, "missing Authorization header"),
    ({"Authorization": "Basic abc"}, "must be 'Bearer <API key>'"),
    ({"Authorization": "Bearer svd_wrong"}, "invalid API key"),
])
def test_every_v1_endpoint_requires_a_valid_key(api, headers, message):
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/vid_x"),
                         ("GET", "/v1/videos/vid_x/content"), ("GET", "/v1/videos/vid_x/events"),
                         ("POST", "/v1/videos/vid_x/cancel"), ("DELETE", "/v1/videos/vid_x")]:
        response = api.request(method, path, headers=headers, json={})
        assert_error(response, 401, "unauthorized", message)
        assert response.headers["www-authenticate"] == "Bearer"


def test_parameter_errors_name_the_field_and_range(api):
    assert_error(submit(api, motion_bucket_id=300), 422, "invalid_parameter",
                 "motion_bucket_id: 300 is out of range (allowed: 1 to 255)")
    assert_error(submit(api, width=100, height=64), 422, "invalid_parameter", "a multiple of 8")
    assert_error(submit(api, frames=3), 422, "invalid_parameter", "frames: unknown parameter")
    assert_error(api.post("/v1/videos", headers=h(api), json={**SMALL}), 422, "invalid_parameter", "image_url")
    assert_error(api.post("/v1/videos", headers={**h(api), "Content-Type": "application/json"}, content=b"{nope"),
                 422, "invalid_input", "not valid JSON")
    assert_error(api.post("/v1/videos", headers={**h(api), "Content-Type": "text/plain"}, content=b"x"),
                 415, "unsupported_media_type")


def test_bad_images_are_rejected_at_admission(api):
    not_image = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    assert_error(submit(api, image_url=not_image), 422, "invalid_image")
    truncated = "data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode()
    assert_error(submit(api, image_url=truncated), 422, "invalid_image")
    assert_error(submit(api, image_url="data:image/png,plain"), 422, "invalid_image", "base64")
    assert_error(submit(api, image_url="data:image/png;base64,@@@"), 422, "invalid_image", "not valid base64")
    # Nothing was admitted.
    assert api.get("/v1/videos", headers=h(api)).json()["data"] == []


def test_oversized_bodies_and_images_get_413(api):
    big = io.BytesIO()
    Image.effect_noise((400, 400), 100).convert("RGB").save(big, format="PNG")  # ~480 KB of noise
    assert len(big.getvalue()) > 256 * 1024
    response = api.post("/v1/videos", headers=h(api), files={"image": ("big.png", big.getvalue())})
    assert response.status_code == 413
    assert response.json()["error"]["code"] in {"request_too_large", "image_too_large"}
    huge = api.post("/v1/videos", headers=h(api), files={"image": ("big.png", big.getvalue() * 2)})
    assert_error(huge, 413, "request_too_large")
    truncated = submit(api, image_url="data:image/png;base64," + base64.b64encode(big.getvalue()[:200_000]).decode())
    assert_error(truncated, 422, "invalid_image")


def test_private_image_urls_are_refused_and_allowlisted_hosts_work(api):
    assert_error(submit(api, image_url="http://127.0.0.1:9/x.png"), 422, "url_not_allowed", "private")
    assert_error(submit(api, image_url="http://169.254.169.254/latest/meta-data"), 422, "url_not_allowed")
    assert_error(submit(api, image_url="file:///etc/passwd"), 422, "url_not_allowed", "only http and https")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")  # the bytes decide, not the header
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        response = submit(api, image_url=f"http://127.0.0.2:{server.server_address[1]}/sample.png")
        assert response.status_code == 202, response.text
    finally:
        server.shutdown()


def test_idempotency_key_returns_the_same_job(api):
    first = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "req-1"}), json={"image_url": DATA_URL, **SMALL})
    again = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "req-1"}), json={"image_url": DATA_URL, **SMALL})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert len(api.get("/v1/videos", headers=h(api)).json()["data"]) == 1
    different = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "req-1"}),
                         json={"image_url": DATA_URL, **SMALL, "seed": 5})
    assert_error(different, 409, "idempotency_key_reused")
    # Keys are per tenant.
    other = api.post("/v1/videos", headers=h(api, "bob", **{"Idempotency-Key": "req-1"}),
                     json={"image_url": DATA_URL, **SMALL})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_list_is_newest_first_and_paginates(api):
    ids = [submit(api).json()["id"] for _ in range(5)]
    page1 = api.get("/v1/videos?limit=2", headers=h(api)).json()
    page2 = api.get(f"/v1/videos?limit=2&cursor={page1['next_cursor']}", headers=h(api)).json()
    page3 = api.get(f"/v1/videos?limit=2&cursor={page2['next_cursor']}", headers=h(api)).json()
    seen = [j["id"] for page in (page1, page2, page3) for j in page["data"]]
    assert seen == list(reversed(ids)) and page3["has_more"] is False
    assert_error(api.get("/v1/videos?limit=0", headers=h(api)), 422, "invalid_parameter", "limit")
    assert_error(api.get("/v1/videos?cursor=garbage", headers=h(api)), 422, "invalid_input", "cursor")


def test_job_lifecycle_cancel_delete_and_content(api):
    queued = submit(api).json()
    assert_error(api.get(f"/v1/videos/{queued['id']}/content", headers=h(api)), 409, "not_ready")
    assert_error(api.delete(f"/v1/videos/{queued['id']}", headers=h(api)), 409, "job_running", "cancel it first")
    cancelled = api.post(f"/v1/videos/{queued['id']}/cancel", headers=h(api)).json()
    assert cancelled["status"] == "cancelled"
    deleted = api.delete(f"/v1/videos/{queued['id']}", headers=h(api))
    assert deleted.status_code == 200 and deleted.json() == {"id": queued["id"], "object": "video.deleted",
                                                             "deleted": True}
    assert_error(api.get(f"/v1/videos/{queued['id']}", headers=h(api)), 404, "not_found")

    done = submit(api).json()
    finish(api, done["id"], data=b"MP4 bytes" * 100)
    view = api.get(f"/v1/videos/{done['id']}", headers=h(api)).json()
    assert view["status"] == "completed" and view["progress"] == 100 and view["progress_detail"]["percent"] == 100.0
    assert view["output"]["url"].endswith(f"/v1/videos/{done['id']}/content")
    assert view["output"]["file_size"] == 900
    content = api.get(f"/v1/videos/{done['id']}/content", headers=h(api))
    assert content.status_code == 200 and content.content == b"MP4 bytes" * 100
    assert content.headers["content-type"] == "video/mp4"
    assert f'filename="{done["id"]}.mp4"' in content.headers["content-disposition"]
    assert_error(api.post(f"/v1/videos/{done['id']}/cancel", headers=h(api)), 409, "already_finished")
    assert api.delete(f"/v1/videos/{done['id']}", headers=h(api)).json()["deleted"] is True
    assert not any(Path(api.service.config.storage.local_dir).rglob(f"*{done['id']}*"))


def test_failed_job_is_data_not_an_http_error(api):
    job = submit(api).json()
    store = api.service.store
    store.claim(job["id"], owner="r", lease_s=30)
    store.fail(job["id"], owner="r", error=JobError(code="internal_error", message="generation failed"))
    view = api.get(f"/v1/videos/{job['id']}", headers=h(api))
    assert view.status_code == 200
    assert view.json()["status"] == "failed" and view.json()["error"] == {"code": "internal_error",
                                                                         "message": "generation failed"}


def test_events_stream_ends_at_a_terminal_state(api):
    job = submit(api).json()
    api.post(f"/v1/videos/{job['id']}/cancel", headers=h(api))
    with api.stream("GET", f"/v1/videos/{job['id']}/events", headers=h(api)) as stream:
        lines = list(stream.iter_lines())
    assert "event: status" in lines and any('"status":"cancelled"' in line for line in lines)


def test_tenants_are_isolated_on_every_endpoint(api):
    mine = submit(api).json()
    finish(api, mine["id"])
    for method, path in [("GET", ""), ("GET", "/content"), ("GET", "/events"), ("POST", "/cancel"), ("DELETE", "")]:
        assert_error(api.request(method, f"/v1/videos/{mine['id']}{path}", headers=h(api, "bob")), 404, "not_found")
    assert api.get("/v1/videos", headers=h(api, "bob")).json()["data"] == []
    assert api.get(f"/v1/videos/{mine['id']}", headers=h(api)).status_code == 200


def test_revoked_key_stops_working_without_restart(api, tmp_path):
    from serve.tenants import read_tenants, write_tenants

    assert api.get("/v1/videos", headers=h(api)).status_code == 200
    tenants = read_tenants(tmp_path / "tenants.yaml")
    tenants["alice"].key_hashes.clear()
    write_tenants(tmp_path / "tenants.yaml", tenants)
    import time

    time.sleep(1.1)  # the registry re-checks the file at most once a second
    assert_error(api.get("/v1/videos", headers=h(api)), 401, "unauthorized")


def test_health_readiness_and_openapi(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    schema = api.get("/openapi.json").json()
    assert {"/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/v1/videos/{job_id}/events",
            "/v1/videos/{job_id}/cancel"} <= set(schema["paths"])
    assert api.get("/docs").status_code == 200
    assert_error(api.get("/nope"), 404, "not_found")


def test_api_layer_imports_no_ray():
    code = "import sys, serve.api.app, serve.api.service; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- OpenAI Videos on the same paths (docs/compatibility.md) ----------------------------------------


def test_the_job_object_is_openai_video_plus_native_fields(api):
    job = submit(api, prompt="a lighthouse at dusk").json()
    openai_fields = {"id", "object", "status", "model", "prompt", "progress", "seconds", "size", "created_at",
                     "completed_at", "expires_at", "error"}
    native_fields = {"started_at", "finished_at", "timestamps", "params", "queue_position", "progress_detail",
                     "timings", "output", "webhook_url", "webhook", "model_version"}
    assert set(job) == openai_fields | native_fields
    assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0
    assert job["model"] == api.service.config.model.source and job["prompt"] == "a lighthouse at dusk"
    assert job["seconds"] == "0.57" and job["size"] == "64x64"  # 4 frames at 7 fps, width x height
    assert isinstance(job["created_at"], int) and job["completed_at"] is job["finished_at"] is job["started_at"] is None
    precise = datetime.fromisoformat(job["timestamps"]["created_at"])
    assert job["created_at"] == int(precise.timestamp()) and job["expires_at"] > job["created_at"]
    assert job["progress_detail"] == {"stage": None, "step": 0, "total_steps": 0, "percent": 0.0, "updated_at": None,
                                      "segments_done": None, "segments": None}
    assert submit(api, num_frames=None, width=None, height=None).json()["size"] == "1024x576"  # the 16:9 default


def test_terminal_jobs_report_completed_at_and_cancelled_has_an_error_code(api):
    queued = submit(api).json()
    cancelled = api.post(f"/v1/videos/{queued['id']}/cancel", headers=h(api)).json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert cancelled["finished_at"] >= cancelled["created_at"] and cancelled["timestamps"]["finished_at"]
    assert cancelled["completed_at"] is None  # OpenAI's completed_at: only for status completed
    done = submit(api).json()
    finish(api, done["id"])
    view = api.get(f"/v1/videos/{done['id']}", headers=h(api)).json()
    assert view["error"] is None and view["started_at"] <= view["completed_at"] == view["finished_at"]
    assert view["output"]["thumbnail_url"].endswith(f"/v1/videos/{done['id']}/content?variant=thumbnail")


def test_poll_after_header_while_the_job_has_not_ended(api):
    created = submit(api)
    assert created.headers["openai-poll-after-ms"] == "1000"
    job_id = created.json()["id"]
    assert api.get(f"/v1/videos/{job_id}", headers=h(api)).headers["openai-poll-after-ms"] == "1000"
    api.service.store.claim(job_id, owner="r", lease_s=30)
    assert api.get(f"/v1/videos/{job_id}", headers=h(api)).headers["openai-poll-after-ms"] == "500"
    api.service.store.fail(job_id, owner="r", error=JobError(code="internal_error", message="boom"))
    assert "openai-poll-after-ms" not in api.get(f"/v1/videos/{job_id}", headers=h(api)).headers


def _form_body(fields: dict[str, str], boundary: str = "b") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def openai_form(api, data, files=None, tenant="alice"):
    """A multipart submit shaped as the OpenAI SDK sends it (input_reference file, prompt, seconds, size)."""
    return api.post("/v1/videos", headers=h(api, tenant), data={"prompt": "waves", **data},
                    files=files or {"input_reference": ("ref.png", PNG, "image/png")})


@pytest.mark.parametrize("size, expected", [
    ("720x1280", (576, 1024)), ("1280x720", (1024, 576)), ("1024x1792", (576, 1024)), ("1792x1024", (1024, 576)),
    ("256x128", (256, 128)), ("768x768", (768, 768)),
])
def test_size_maps_by_the_documented_table(api, size, expected):
    response = openai_form(api, {"size": size, "num_frames": "4"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["params"]["width"], job["params"]["height"]) == expected and job["size"] == "%dx%d" % expected
    as_json = submit(api, size=size, width=None, height=None)
    assert as_json.status_code == 202 and as_json.json()["size"] == job["size"]


def test_sizes_the_table_cannot_map_are_named(api):
    for size in ("1004x1000", "1920x1080", "1536x1536", "big", "0x64"):
        assert_error(openai_form(api, {"size": size}), 422, "invalid_parameter", f"size: '{size}' cannot be mapped")
    assert_error(openai_form(api, {"size": "1280x720", "width": "64", "height": "64"}), 422, "invalid_parameter",
                 "size: give size or width and height, not both")
    assert_error(submit(api, size="1280x720", aspect_ratio="1:1", width=None, height=None), 422,
                 "invalid_parameter", "size: give size or aspect_ratio, not both")


@pytest.mark.parametrize("seconds, extra, frames", [
    ("4", {}, 28), ("8", {}, 56), ("12", {}, 64),           # 84 frames at 7 fps: the model's 64-frame cap
    ("2", {"output_fps": "10"}, 20), ("1.5", {"fps": "6"}, 9), (4, {}, 28),
])
def test_seconds_become_frames_at_the_output_fps(api, seconds, extra, frames):
    response = openai_form(api, {"seconds": str(seconds), "size": "256x128", **extra})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"]["num_frames"] == frames
    fps = job["params"]["output_fps"] or job["params"]["fps"]
    assert float(job["seconds"]) == pytest.approx(frames / fps, abs=0.005)
    as_json = submit(api, seconds=seconds, num_frames=None, **{k: int(v) for k, v in extra.items()})
    assert as_json.status_code == 202 and as_json.json()["params"]["num_frames"] == frames


def test_seconds_are_capped_by_the_tenant_and_checked(api, tmp_path):
    import time

    api.keys["short"] = add_tenant(tmp_path / "tenants.yaml", "short", max_num_frames=16)
    time.sleep(1.1)  # the registry re-checks the file at most once a second
    capped = openai_form(api, {"seconds": "8", "size": "256x128"}, tenant="short")
    assert capped.status_code == 202 and capped.json()["params"]["num_frames"] == 16
    assert capped.json()["seconds"] == "2.29"
    assert_error(openai_form(api, {"seconds": "4", "num_frames": "8"}), 422, "invalid_parameter",
                 "seconds: give seconds or num_frames, not both")
    assert_error(openai_form(api, {"seconds": "four"}), 422, "invalid_parameter", "seconds: 'four' is not a number")
    assert_error(openai_form(api, {"seconds": "-1"}), 422, "invalid_parameter", "seconds")
    assert_error(openai_form(api, {"seconds": "0.1"}), 422, "invalid_parameter", "at least 2 frames")


def test_model_must_name_the_deployed_model(api):
    source = api.service.config.model.source
    for name in (source, source.rsplit("/", 1)[-1]):
        assert openai_form(api, {"model": name, "num_frames": "4", "size": "256x128"}).status_code == 202
    assert_error(openai_form(api, {"model": "sora-2"}), 404, "model_not_found", "model 'sora-2' not found")
    assert_error(submit(api, model="sora-2"), 404, "model_not_found", "model 'sora-2' not found")
    assert_error(submit(api, model=" "), 422, "invalid_parameter", "model: a model id")
    assert api.service.store.queue_depth() == 2  # the two accepted above, none of the refused


def test_the_image_arrives_under_any_of_its_names_exactly_once(api):
    # As the SDK flattens input_reference={"image_url": ...} into a form (multipart, no file).
    by_url = api.post("/v1/videos", headers={**h(api), "Content-Type": "multipart/form-data; boundary=b"},
                      content=_form_body({"prompt": "p", "input_reference[image_url]": DATA_URL, "num_frames": "4",
                                          "size": "256x128"}))
    assert by_url.status_code == 202, by_url.text
    as_json = api.post("/v1/videos", headers=h(api), json={**SMALL, "input_reference": {"image_url": DATA_URL}})
    assert as_json.status_code == 202, as_json.text
    text_to_video = api.post("/v1/videos", headers=h(api), json={**SMALL, "prompt": "a cat"})  # no image
    assert text_to_video.status_code == 202 and text_to_video.json()["params"]["prompt"] == "a cat"
    assert_error(api.post("/v1/videos", headers=h(api), json={**SMALL, "image_url": DATA_URL,
                                                              "input_reference": {"image_url": DATA_URL}}),
                 422, "invalid_parameter", "not both")
    assert_error(api.post("/v1/videos", headers=h(api), json={**SMALL, "input_reference": {"file_id": "file_1"}}),
                 422, "invalid_parameter", "file ids are not supported")
    assert_error(openai_form(api, {"input_reference[image_url]": DATA_URL}), 422, "invalid_parameter",
                 "not both")
    assert_error(openai_form(api, {"input_reference[file_id]": "file_1"}), 422, "invalid_parameter",
                 "file ids are not supported")
    as_form = api.post("/v1/videos", headers={**h(api), "Content-Type": "multipart/form-data; boundary=b"},
                       content=_form_body({"prompt": "a cat", **{k: str(v) for k, v in SMALL.items()}}))
    assert as_form.status_code == 202 and as_form.json()["params"]["prompt"] == "a cat"
    assert_error(api.post("/v1/videos", headers={**h(api), "Content-Type": "multipart/form-data; boundary=b"},
                          content=_form_body({"seed": "1"})), 422, "invalid_input", "or a prompt alone")
    assert_error(openai_form(api, {"prompt": "x" * 4001}), 422, "invalid_parameter", "prompt: at most")


def test_the_prompt_is_part_of_an_idempotent_request(api):
    first = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "k"}),
                     json={"image_url": DATA_URL, **SMALL, "prompt": "one"})
    again = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "k"}),
                     json={"image_url": DATA_URL, **SMALL, "prompt": "one"})
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
    other = api.post("/v1/videos", headers=h(api, **{"Idempotency-Key": "k"}),
                     json={"image_url": DATA_URL, **SMALL, "prompt": "two"})
    assert_error(other, 409, "idempotency_key_reused")


def test_list_takes_openai_pagination_after_limit_order(api):
    ids = [submit(api).json()["id"] for _ in range(5)]
    submit(api, "bob")
    first = api.get("/v1/videos?limit=2", headers=h(api)).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    assert first["first_id"] == ids[4] and first["last_id"] == ids[3] and first["has_more"] is True
    seen, after = [], None
    while True:
        page = api.get("/v1/videos", params={"limit": 2, "order": "asc", **({"after": after} if after else {})},
                       headers=h(api)).json()
        seen += [j["id"] for j in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == ids
    by_cursor = api.get("/v1/videos", params={"limit": 3, "order": "asc"}, headers=h(api)).json()
    rest = api.get("/v1/videos", params={"order": "asc", "cursor": by_cursor["next_cursor"]}, headers=h(api)).json()
    assert [j["id"] for j in by_cursor["data"] + rest["data"]] == ids
    assert rest["has_more"] is False and rest["next_cursor"] is None
    newest_after = api.get("/v1/videos", params={"after": ids[2]}, headers=h(api)).json()
    assert [j["id"] for j in newest_after["data"]] == ids[:2][::-1]
    empty = api.get("/v1/videos", params={"after": ids[4], "order": "asc"}, headers=h(api)).json()
    assert empty["data"] == [] and empty["first_id"] is None and empty["last_id"] is None and not empty["has_more"]
    bobs = api.get("/v1/videos", headers=h(api, "bob")).json()["data"][0]["id"]
    for unknown in (bobs, "vid_missing"):  # another tenant's id is a missing one
        assert_error(api.get("/v1/videos", params={"after": unknown}, headers=h(api)), 404, "not_found",
                     f"after: video '{unknown}' not found")
    assert_error(api.get("/v1/videos", params={"after": ids[0], "cursor": first["next_cursor"]}, headers=h(api)),
                 422, "invalid_input", "not both")
    assert_error(api.get("/v1/videos?order=sideways", headers=h(api)), 422, "invalid_parameter", "order")


def test_thumbnail_variant_serves_the_stored_first_frame(api):
    from serve.jobstore import thumbnail_key_for

    done = submit(api).json()
    finish(api, done["id"])
    assert_error(api.get(f"/v1/videos/{done['id']}/content?variant=thumbnail", headers=h(api)), 404, "not_found",
                 "no thumbnail")
    job = api.service.store.get(done["id"], tenant="alice")
    assert job.output.thumbnail_key == thumbnail_key_for(job.output_key)
    assert job.output.thumbnail_key.rsplit("/", 1)[0] == job.output_key.rsplit("/", 1)[0]  # beside the clip
    api.service.storage.put(job.output.thumbnail_key, b"\xff\xd8\xff\xe0 jpeg", content_type="image/jpeg")
    thumbnail = api.get(f"/v1/videos/{done['id']}/content?variant=thumbnail", headers=h(api))
    assert thumbnail.status_code == 200 and thumbnail.content == b"\xff\xd8\xff\xe0 jpeg"
    assert thumbnail.headers["content-type"] == "image/jpeg" and thumbnail.headers["content-length"] == "9"
    video = api.get(f"/v1/videos/{done['id']}/content?variant=video", headers=h(api))
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert_error(api.get(f"/v1/videos/{done['id']}/content?variant=spritesheet", headers=h(api)), 422,
                 "invalid_parameter", "variant: 'spritesheet' is not available")
    assert_error(api.get(f"/v1/videos/{done['id']}/content?variant=thumbnail", headers=h(api, "bob")), 404,
                 "not_found")
    api.delete(f"/v1/videos/{done['id']}", headers=h(api))
    assert not api.service.storage.exists(job.output.thumbnail_key)


def test_hostile_values_found_in_review_are_4xx(api):
    import base64 as b64

    assert_error(api.post("/v1/videos", headers=h(api), json={"image_url": DATA_URL, "seconds": 1e308}),
                 422, "invalid_parameter", "seconds")
    huge_cursor = b64.urlsafe_b64encode(b"99999999999999999999999999|x").decode()
    assert api.get(f"/v1/videos?cursor={huge_cursor}", headers=h(api)).status_code == 422
    long_key = "k" * 100_000
    response = api.post("/v1/videos", headers=h(api), json={"image_url": DATA_URL, long_key: 1})
    assert response.status_code == 422 and len(response.content) < 2_000


def test_an_oversized_chunked_body_is_413_on_every_api(api):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # no Content-Length: the limit is enforced while it streams in

    for path, kind in (("/v1/videos", "application/json"), ("/v1/video/generations", "application/json"),
                       ("/fal-ai/stable-video", "application/json"),
                       ("/v2beta/image-to-video", "multipart/form-data; boundary=x")):
        response = api.post(path, headers={**h(api), "Content-Type": kind}, content=chunks())
        assert response.status_code == 413, (path, response.status_code, response.text[:200])
