"""The web playground (``GET /``, serve/api/static/): its files and headers, then the page itself in a
real headless Chromium (Debian's ``chromium`` driven by Playwright, no browser download) against
``make serve``'s local deployment: type a key, upload the sample image, watch the job over SSE,
play the clip; then paste the image as a (data) URL for a longer job and cancel it.

The screenshot of the playing clip is written to the test's tmp dir and to ``out/playground.png``.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.params import GenerationParams
from pipelines.sample_image import SAMPLE_IMAGE_PATH
from serve.api.playground import ASSET_PREFIX, ASSETS, STATIC_DIR, playground_router

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY_STORAGE = "svd-serve.api-key"
SMALL = {"num_frames": 6, "num_inference_steps": 2, "width": 64, "height": 64}
PLAYING = """() => { const v = document.getElementById('clip');
                     return !!v && !v.paused && v.readyState >= 2 && v.currentTime > 0; }"""


def assert_locked_down(headers) -> None:
    directives = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert directives["default-src"] == directives["script-src"] == directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["object-src"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"
    assert all("unsafe" not in value and "http" not in value for value in directives.values())
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def page_state(page) -> dict:
    texts = {id_: page.text_content(f"#{id_}") for id_ in
             ("job-id", "job-status", "job-queue", "job-detail", "job-error", "form-error", "recent-error")}
    return {**texts, "video": page.evaluate("""() => { const v = document.getElementById('clip');
        return {hidden: v.hidden, paused: v.paused, readyState: v.readyState, time: v.currentTime,
                error: v.error && v.error.message}; }""")}


# -- the files, without Ray ---------------------------------------------------------------------------


@pytest.fixture
def client():
    app = FastAPI()
    app.include_router(playground_router())
    return TestClient(app)


def test_page_and_assets_are_served_with_a_strict_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_locked_down(page.headers)
    for name, media_type in ASSETS.items():
        assert f'"{ASSET_PREFIX}/{name}"' in page.text
        asset = client.get(f"{ASSET_PREFIX}/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"] == media_type
        assert_locked_down(asset.headers)
    assert client.get(f"{ASSET_PREFIX}/index.html").status_code == 404
    assert not any(route.include_in_schema for route in playground_router().routes)


def test_static_files_need_no_build_no_network_and_no_inline_code():
    html = (STATIC_DIR / "index.html").read_text()
    js = re.sub(r"^\s*//.*$", "", (STATIC_DIR / "playground.js").read_text(), flags=re.M)  # code, not comments
    css = (STATIC_DIR / "playground.css").read_text()
    assert sorted(path.name for path in STATIC_DIR.iterdir()) == sorted(["index.html", *ASSETS])
    assert re.findall(r"<script\b[^>]*>", html) == [f'<script src="{ASSET_PREFIX}/playground.js" defer>']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in css and "url(" not in css
    # The key: sessionStorage only. Server data: text only.
    for banned in ("localStorage", "document.cookie", "innerHTML", "outerHTML", "insertAdjacentHTML",
                   "document.write", "eval(", "new Function", "EventSource", "http://", "https://"):
        assert banned not in js, banned


# -- the page in headless Chromium ------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_playground_in_headless_chromium(local_service, tmp_path):
    from playwright.sync_api import sync_playwright

    base, key = local_service.url, local_service.keys["alice"]
    assert_locked_down(httpx.get(f"{base}/", timeout=30).headers)
    requests, problems, failed = [], [], []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100})
        try:
            page = context.new_page()
            page.on("request", lambda request: requests.append(request))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(message.text) if message.type == "error"
                    and not message.text.startswith("Failed to load resource") else None)  # in `failed`
            page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
            response = page.goto(f"{base}/")
            assert response.ok
            assert_locked_down(response.headers)

            # The form comes from /openapi.json: GenerationParams' defaults, ranges and enums.
            page.fill("#api-key", key)
            steps = page.locator('#param-fields input[name="num_inference_steps"]')
            steps.wait_for()
            fields = page.eval_on_selector_all("#param-fields [name]", "nodes => nodes.map(node => node.name)")
            # (prompt is the "Describe it" source, not a parameter field)
            assert fields == [name for name in GenerationParams.model_json_schema(by_alias=True)["properties"]
                              if name != "prompt"]
            assert (steps.input_value(), steps.get_attribute("min"), steps.get_attribute("max")) == ("25", "1", "150")
            assert page.locator('#param-fields input[name="width"]').get_attribute("step") == "8"
            assert page.locator('#param-fields input[name="num_frames"]').input_value() == ""  # model default
            formats = page.locator('#param-fields select[name="output_format"]')
            assert formats.locator("option").all_inner_texts() == ["mp4", "webm", "gif"]
            assert formats.input_value() == "mp4"

            page.set_input_files("#image-file", SAMPLE_IMAGE_PATH)
            page.locator("#preview").wait_for()
            for name, value in SMALL.items():
                page.fill(f'#param-fields [name="{name}"]', str(value))
            page.evaluate("""() => { window.seenStatuses = [];
                const status = document.getElementById('job-status');
                new MutationObserver((records) => records.forEach((record) =>
                        record.addedNodes.forEach((node) => window.seenStatuses.push(node.textContent))))
                    .observe(status, {childList: true, characterData: true, subtree: true}); }""")
            page.click("#submit")
            try:
                page.wait_for_function(PLAYING, timeout=180_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
                raise AssertionError(f"the clip never played: {page_state(page)}, console: {problems}") from None
            job_id = page.text_content("#job-id")
            page.wait_for_selector(f'#recent-jobs tr[data-id="{job_id}"] td.status-completed', timeout=30_000)
            assert page.text_content("#job-status") == "completed"
            download = page.locator("#download")
            assert download.get_attribute("href").startswith("blob:")
            assert download.get_attribute("download").startswith(job_id)
            page.locator("#clip").scroll_into_view_if_needed()
            shot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            (ROOT / "out").mkdir(exist_ok=True)
            (ROOT / "out" / "playground.png").write_bytes(shot)

            seen = page.evaluate("window.seenStatuses")
            assert seen[0] == "queued" and seen[-1] == "completed", seen  # the POST's answer, then the events
            video = page.evaluate("""() => { const v = document.getElementById('clip');
                return {w: v.videoWidth, h: v.videoHeight, src: v.currentSrc, muted: v.muted, loop: v.loop}; }""")
            assert (video["w"], video["h"], video["muted"], video["loop"]) == (64, 64, True, True)
            assert video["src"].startswith("blob:")

            # The key: in this tab's sessionStorage, nowhere else, and only ever in the header.
            assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == key
            local = page.evaluate("JSON.stringify(Object.entries(localStorage))")
            assert key not in local and key not in page.evaluate("document.cookie")
            assert not any(key in json.dumps(cookie) for cookie in context.cookies())
            api_calls = [request for request in requests if "/v1/" in request.url]
            assert {request.url.removeprefix(base).split("?")[0] for request in api_calls} >= {
                "/v1/videos", f"/v1/videos/{job_id}/events", f"/v1/videos/{job_id}/content"}
            for request in requests:
                assert key not in request.url, request.url
                assert request.url.startswith((f"{base}/", "blob:")), request.url
                expected = f"Bearer {key}" if "/v1/" in request.url else None
                assert request.headers.get("authorization") == expected, request.url

            # A pasted image URL (a JSON submit) and a longer job, stopped by Cancel.
            page.check('input[name="source"][value="url"]')
            data_url = f"data:image/png;base64,{base64.b64encode(SAMPLE_IMAGE_PATH.read_bytes()).decode()}"
            page.fill("#image-url", data_url)
            page.fill('#param-fields [name="num_inference_steps"]', "150")
            page.fill('#param-fields [name="num_frames"]', "14")
            page.click("#submit")
            try:
                page.wait_for_function("id => document.getElementById('job-id').textContent !== id", arg=job_id)
            except Exception:
                raise AssertionError(f"the URL submit did not start a job: {page_state(page)}") from None
            page.wait_for_selector("#cancel:enabled")
            page.click("#cancel")
            page.wait_for_selector("#job-status.status-cancelled", timeout=60_000)
            second = page.text_content("#job-id")
            page.wait_for_selector(f'#recent-jobs tr[data-id="{second}"] td.status-cancelled', timeout=30_000)
            assert page.locator("#clip").is_hidden()

            # Text-to-video: a prompt and no image; the clip plays like any other.
            page.check('input[name="source"][value="prompt"]')
            assert page.locator("#image-url").is_hidden() and page.locator("#prompt-text").is_visible()
            page.fill("#prompt-text", "a lighthouse at dusk")
            page.fill('#param-fields [name="num_inference_steps"]', "2")
            page.fill('#param-fields [name="num_frames"]', "6")
            page.fill('#param-fields [name="t2i_num_inference_steps"]', "2")
            page.click("#submit")
            page.wait_for_function("id => document.getElementById('job-id').textContent !== id", arg=second)
            try:
                page.wait_for_function(PLAYING, timeout=180_000)
            except Exception:
                raise AssertionError(f"the text-to-video clip never played: {page_state(page)}") from None
            third = page.text_content("#job-id")
            made = httpx.get(f"{base}/v1/videos/{third}", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            assert made["params"]["prompt"] == "a lighthouse at dusk" and "text_to_image" in made["timings"]
            assert not problems, problems
            assert set(failed) <= {f"{base}/favicon.ico"}, failed
        finally:
            context.close()
