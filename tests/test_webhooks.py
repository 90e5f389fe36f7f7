"""Webhooks: the signature scheme (re-implemented here from the documented algorithm), delivery to
a real HTTP receiver on 127.0.0.1 with retries, backoff, Retry-After, timeouts and the bounded
retry window, the SSRF guard (refusals without any connection), no redirects, and the verification
snippet of docs/webhooks.md run against a real signed delivery.

Backoffs are tiny through the config, so the whole module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from pipelines.urls import redact_url
from serve.config import WebhookConfig
from serve import webhooks
from serve.urlguard import BlockedURLError
from serve.webhooks import (
    EVENT_COMPLETED,
    EVENT_FAILED,
    EVENT_PROGRESS,
    WebhookSender,
    check_webhook_url,
    event_type_for,
    job_recorder,
    normalize_events,
    retry_after_seconds,
    sign,
    verify,
    wants_event,
)

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec_test-secret-0123456789"
ALLOW = ["127.0.0.1"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "webhooks.md"
PAYLOAD = {
    "id": "vid_abc",
    "object": "video.job",
    "status": "completed",
    "created_at": "2025-01-01T00:00:00Z",
    "params": {"seed": 1},
    "progress": {"stage": "store", "step": 4, "total_steps": 4, "percent": 100.0},
    "timings": {"total": 1.5},
    "error": None,
    "output": {"url": "http://api/v1/videos/vid_abc/content", "content_type": "video/mp4",
               "file_name": "vid_abc.mp4", "file_size": 10},
    "webhook_url": None,
}


def expected_signature(secret: str, timestamp: str | int, body: bytes) -> str:
    """The documented scheme, from scratch: v1=hex(HMAC-SHA256(utf8(secret), f"{ts}." + body))."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"Webhook-Id": "evt_1", "Webhook-Timestamp": str(timestamp),
            "Webhook-Signature": expected_signature(secret, timestamp, body)}


# -- a real receiver --------------------------------------------------------------------------


class Receiver:
    """A threaded HTTP server on 127.0.0.1 answering POSTs from a script of
    ``(status, headers, delay_s)`` steps (then 200 forever), recording every request."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str], float]] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"at": time.monotonic(), "path": self.path,
                                              "headers": dict(self.headers.items()), "body": body})
                    status, headers, delay = receiver.script.pop(0) if receiver.script else (200, {}, 0.0)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make_sender(**overrides) -> WebhookSender:
    options = dict(allow=ALLOW, timeout_s=2.0, initial_backoff_s=0.05, max_backoff_s=0.5, max_elapsed_s=10.0,
                   max_attempts=5)
    options.update(overrides)
    return WebhookSender(**options)


def deliver(sender: WebhookSender, url: str, event_type: str = EVENT_COMPLETED, payload=None, **kwargs):
    records: list[dict] = []
    result = asyncio.run(sender.deliver("vid_abc", url, SECRET, event_type, payload or PAYLOAD, records.append,
                                        **kwargs))
    return result, records


# -- signatures ---------------------------------------------------------------------------------


def test_sign_is_the_documented_hmac():
    body = b'{"type":"video.completed","data":{"id":"vid_x"}}'
    assert sign(SECRET, 1_700_000_000, body) == expected_signature(SECRET, 1_700_000_000, body)
    assert sign("unicode-sécret", 5, b"") == expected_signature("unicode-sécret", 5, b"")
    with pytest.raises(ValueError):
        sign("", 1, body)
    # The headers of one attempt, as the sender builds them.
    assert webhooks.signed_headers(SECRET, "evt_1", body, timestamp=1_700_000_000) == signed_headers(
        SECRET, 1_700_000_000, body)


def test_verify_accepts_valid_and_rejects_tampering():
    body = b'{"type":"video.failed"}'
    now = 1_700_000_000
    headers = signed_headers(SECRET, now, body)
    assert verify(SECRET, headers, body, now=now)
    assert verify(SECRET, {k.lower(): v for k, v in headers.items()}, body, now=now)  # names case-insensitive
    assert verify(SECRET, httpx.Headers(headers), body, now=now + 299)

    assert not verify(SECRET, headers, body + b" ", now=now)  # tampered body
    assert not verify(SECRET, {**headers, "Webhook-Timestamp": str(now + 1)}, body, now=now)  # tampered timestamp
    assert not verify("whsec_other", headers, body, now=now)  # wrong secret
    assert not verify(SECRET, {**headers, "Webhook-Signature": "v1=" + "0" * 64}, body, now=now)
    assert not verify(SECRET, {**headers, "Webhook-Signature": headers["Webhook-Signature"].replace("v1", "v0")},
                      body, now=now)
    assert not verify(SECRET, headers, body, now=now + 301)  # stale
    assert not verify(SECRET, headers, body, now=now - 301)  # from the future
    assert verify(SECRET, headers, body, now=now + 1000, tolerance_s=1000)
    for missing in headers:
        assert not verify(SECRET, {k: v for k, v in headers.items() if k != missing}, body, now=now)
    assert not verify(SECRET, {**headers, "Webhook-Timestamp": "12ab"}, body, now=now)
    # Several signatures (secret rotation): any one valid match is enough.
    rotated = {**headers, "Webhook-Signature": expected_signature("whsec_old", now, body) + " "
               + headers["Webhook-Signature"]}
    assert verify(SECRET, rotated, body, now=now)


def test_verify_uses_the_current_time_by_default():
    body = b"{}"
    assert verify(SECRET, signed_headers(SECRET, int(time.time()), body), body)
    assert not verify(SECRET, signed_headers(SECRET, int(time.time()) - 3600, body), body)


# -- delivery -----------------------------------------------------------------------------------


def test_retries_503_then_delivers_with_one_event_id_and_growing_backoff(receiver):
    receiver.script = [(503, {}, 0.0), (503, {}, 0.0)]
    sender = make_sender(initial_backoff_s=0.1, max_backoff_s=1.0)
    result, records = deliver(sender, receiver.url)

    assert result.delivered and result.outcome == "delivered" and result.status_code == 200
    assert len(receiver.requests) == 3
    assert [r["attempt"] for r in records] == [1, 2, 3]
    assert [r.get("status_code") for r in records] == [503, 503, 200]
    assert result.attempts == records
    assert records[-1]["next_retry_in_s"] is None
    for entry in records:
        assert set(entry) == {"event_id", "type", "attempt", "at", "status_code", "duration_ms", "next_retry_in_s"}
        assert entry["type"] == EVENT_COMPLETED and entry["event_id"] == result.event_id
        datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))
        json.dumps(entry)  # storable as job metadata

    ids = {r["headers"]["Webhook-Id"] for r in receiver.requests}
    assert ids == {result.event_id}
    assert len({r["body"] for r in receiver.requests}) == 1  # the same event every time
    for request in receiver.requests:  # each attempt signed with the documented algorithm
        headers = request["headers"]
        assert headers["Webhook-Signature"] == expected_signature(SECRET, headers["Webhook-Timestamp"], request["body"])
        assert abs(int(headers["Webhook-Timestamp"]) - time.time()) < 30
        assert headers["Content-Type"] == "application/json"
    body = json.loads(receiver.requests[0]["body"])
    assert body["type"] == EVENT_COMPLETED and body["data"] == PAYLOAD and body["id"] == result.event_id
    datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))

    # Backoff grows: planned waits double (+/-20% jitter), and the receiver saw the gaps grow.
    first, second = records[0]["next_retry_in_s"], records[1]["next_retry_in_s"]
    assert 0.08 <= first <= 0.12 and 0.16 <= second <= 0.24
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.requests, receiver.requests[1:])]
    assert gaps[0] >= first * 0.95 and gaps[1] >= second * 0.95
    assert gaps[1] > gaps[0]


def test_docs_snippet_verifies_a_real_delivery(receiver):
    text = DOC.read_text()
    match = re.search(r"<!-- verify-snippet:start -->\s*```python\n(.*?)```\s*<!-- verify-snippet:end -->", text, re.S)
    assert match, "docs/webhooks.md lost its verification snippet markers"
    snippet = match.group(1)
    imported = set(re.findall(r"^\s*(?:import|from)\s+([\w.]+)", snippet, re.M))
    assert imported <= {"hashlib", "hmac", "time"}, imported  # stdlib only
    namespace: dict = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)
    verify_webhook = namespace["verify_webhook"]

    result, _ = deliver(make_sender(), receiver.url, EVENT_FAILED)
    assert result.delivered
    request = receiver.requests[0]
    headers, body = request["headers"], request["body"]
    assert verify_webhook(SECRET, headers, body)
    assert verify(SECRET, headers, body)
    assert not verify_webhook(SECRET, headers, body.replace(b"vid_abc", b"vid_abd"))
    assert not verify_webhook("whsec_wrong", headers, body)
    assert not verify_webhook(SECRET, {**headers, "Webhook-Timestamp": str(int(time.time()) - 600)}, body)


def test_4xx_is_a_permanent_failure(receiver):
    receiver.script = [(400, {}, 0.0)]
    result, records = deliver(make_sender(), receiver.url)
    assert result.outcome == "rejected" and not result.delivered and result.status_code == 400
    assert len(receiver.requests) == 1 and len(records) == 1
    assert records[0]["status_code"] == 400 and records[0]["next_retry_in_s"] is None


def test_429_retry_after_is_honoured(receiver):
    receiver.script = [(429, {"Retry-After": "1"}, 0.0)]
    result, records = deliver(make_sender(initial_backoff_s=0.01, max_backoff_s=0.05), receiver.url)
    assert result.delivered and len(receiver.requests) == 2
    assert records[0]["status_code"] == 429 and records[0]["next_retry_in_s"] == 1.0
    assert receiver.requests[1]["at"] - receiver.requests[0]["at"] >= 0.95


def test_retry_after_beyond_the_window_gives_up(receiver):
    receiver.script = [(503, {"Retry-After": "3600"}, 0.0)]
    result, records = deliver(make_sender(max_elapsed_s=5.0), receiver.url)
    assert result.outcome == "exhausted" and len(receiver.requests) == 1
    assert records[0]["status_code"] == 503 and records[0]["next_retry_in_s"] is None


def test_timeout_is_recorded_and_retried(receiver):
    receiver.script = [(200, {}, 1.5)]  # answers only after the client gave up
    started = time.monotonic()
    result, records = deliver(make_sender(timeout_s=0.3), receiver.url)
    assert result.delivered and len(records) == 2
    assert "status_code" not in records[0] and records[0]["error"].startswith("timeout")
    assert 250 <= records[0]["duration_ms"] < 1400
    assert records[0]["next_retry_in_s"] is not None
    assert records[1]["status_code"] == 200
    assert time.monotonic() - started < 1.4  # did not wait for the slow answer


def test_connection_errors_are_retried():
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result, records = deliver(make_sender(max_attempts=2), f"http://127.0.0.1:{port}/hook")
    assert result.outcome == "exhausted" and len(records) == 2
    assert all("ConnectError" in r["error"] for r in records)
    assert records[0]["next_retry_in_s"] is not None and records[1]["next_retry_in_s"] is None


def test_a_name_that_does_not_resolve_now_is_retried(monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "hooks.down.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result, records = deliver(make_sender(max_attempts=2), "https://hooks.down.test/hook")
    assert result.outcome == "exhausted" and len(records) == 2
    assert all(r["error"] == "ConnectError: cannot resolve host 'hooks.down.test'" for r in records)
    assert records[0]["next_retry_in_s"] is not None


def test_max_attempts_stops_retries(receiver):
    receiver.script = [(500, {}, 0.0)] * 10
    result, records = deliver(make_sender(max_attempts=3), receiver.url)
    assert result.outcome == "exhausted" and result.status_code == 500
    assert len(receiver.requests) == 3 and len(records) == 3


def test_bounded_time_stops_retries(receiver):
    receiver.script = [(502, {}, 0.0)] * 100
    started = time.monotonic()
    result, records = deliver(
        make_sender(initial_backoff_s=0.1, max_backoff_s=0.2, max_elapsed_s=0.6, max_attempts=100), receiver.url)
    elapsed = time.monotonic() - started
    assert result.outcome == "exhausted"
    assert 2 <= len(records) < 10 and len(receiver.requests) == len(records)
    assert elapsed < 1.5
    assert all(r["next_retry_in_s"] is not None for r in records[:-1]) and records[-1]["next_retry_in_s"] is None
    assert sum(r["next_retry_in_s"] for r in records[:-1]) <= 0.6


def test_redirects_are_not_followed(receiver):
    receiver.script = [(302, {"Location": "/elsewhere"}, 0.0)]
    result, records = deliver(make_sender(), receiver.url)
    assert result.outcome == "rejected" and result.status_code == 302
    assert [r["path"] for r in receiver.requests] == ["/hook"] and len(records) == 1


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/hook",  # loopback, not allowlisted
    "http://localhost:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://10.0.0.7/hook",
    "ftp://example.com/hook",
])
def test_private_urls_are_refused_without_a_connection(receiver, monkeypatch, url):
    connections = []

    async def no_connection(self, request):
        connections.append(str(request.url))
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", no_connection)
    url = url.format(port=receiver.server.server_address[1])
    result, records = deliver(make_sender(allow=[]), url)
    assert result.outcome == "rejected"
    assert len(records) == 1 and records[0]["error"].startswith("url_not_allowed")
    assert records[0]["next_retry_in_s"] is None
    assert connections == [] and receiver.requests == []


def test_check_webhook_url():
    for url in ("http://127.0.0.1/", "http://localhost/x", "http://169.254.169.254/", "http://[fd00::1]/",
                "http://10.1.2.3/", "http://192.168.0.1/", "file:///etc/passwd", "gopher://example.com/",
                "http://user:pw@93.184.215.14/", "http://", "", "http://93.184.215.14/a b",
                "http://93.184.215.14/" + "a" * 2100):
        with pytest.raises(BlockedURLError):
            check_webhook_url(url, [])
    check_webhook_url("https://93.184.215.14/hooks?token=1")  # a public literal: no DNS needed
    check_webhook_url("http://127.0.0.1:8080/hook", ["127.0.0.1"])
    check_webhook_url("http://10.1.2.3/hook", ["10.0.0.0/8"])
    assert BlockedURLError.code == "url_not_allowed"


def test_secret_and_query_string_never_logged(receiver, caplog):
    caplog.set_level(logging.DEBUG, logger="ray.serve.svd_serve.webhooks")
    receiver.script = [(503, {}, 0.0), (404, {}, 0.0)]
    result, records = deliver(make_sender(), receiver.url + "?token=super-private")
    assert result.outcome == "rejected" and len(records) == 2
    text = caplog.text + json.dumps([r.__dict__ for r in caplog.records], default=str)
    assert "/hook" in text
    assert SECRET not in text and "super-private" not in text and "vid_abc.mp4" not in text
    assert "super-private" not in json.dumps(records)
    assert redact_url("https://u:p@h.example:8443/p/a?x=1#f") == "https://h.example:8443/p/a"


def test_config_validation_and_from_config():
    config = WebhookConfig()
    assert (config.timeout_s, config.max_elapsed_s, config.initial_backoff_s, config.max_backoff_s) == (10, 3600, 1, 300)
    for field_info in WebhookConfig.model_fields.values():
        assert field_info.description
    with pytest.raises(ValidationError, match="initial_backoff_s"):
        WebhookConfig(initial_backoff_s=10, max_backoff_s=5)
    with pytest.raises(ValidationError, match="max_backoff_s"):
        WebhookConfig(max_backoff_s=100, max_elapsed_s=50)
    with pytest.raises(ValidationError):
        WebhookConfig(timeout_s=0)
    with pytest.raises(ValidationError):
        WebhookConfig(max_attempts=0)
    with pytest.raises(ValidationError):
        WebhookConfig(unknown=1)
    with pytest.raises(ValidationError):
        WebhookSender(initial_backoff_s=5, max_backoff_s=1)
    sender = WebhookSender.from_config(WebhookConfig(max_attempts=7, jitter=0), allow=["10.0.0.0/8"])
    assert sender.config.max_attempts == 7 and sender.allow == ("10.0.0.0/8",)
    assert [sender.backoff_s(n) for n in (1, 2, 3, 9, 10)] == [1, 2, 4, 256, 300]


def test_retry_after_parsing():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0.0 and retry_after_seconds("nan") is None
    now = datetime(2025, 1, 1, 0, 0, 0, tzinfo=timezone.utc).timestamp()
    assert retry_after_seconds("Wed, 01 Jan 2025 00:00:30 GMT", now=now) == 30.0


def test_events_helpers_and_progress(receiver):
    assert event_type_for("completed") == EVENT_COMPLETED and event_type_for("cancelled") == "video.cancelled"
    with pytest.raises(ValueError):
        event_type_for("queued")
    assert normalize_events(["progress", "video.completed"]) == {EVENT_PROGRESS, EVENT_COMPLETED}
    with pytest.raises(ValueError, match="progress"):
        normalize_events(["bogus"])
    assert wants_event(EVENT_FAILED, None) and not wants_event(EVENT_PROGRESS, [])
    assert wants_event(EVENT_PROGRESS, {"progress"})

    sender = make_sender(progress_min_interval_s=5)
    assert sender.progress_due("vid_1", now=100.0)
    assert not sender.progress_due("vid_1", now=103.0)
    assert sender.progress_due("vid_2", now=103.0)
    assert sender.progress_due("vid_1", now=105.0)

    receiver.script = [(503, {}, 0.0)]
    result, records = deliver(sender, receiver.url, EVENT_PROGRESS)  # progress: one attempt by default
    assert result.outcome == "exhausted" and len(records) == 1
    with pytest.raises(ValueError):
        deliver(sender, receiver.url, "video.exploded")


def test_job_recorder_appends_attempts_to_the_job(receiver, tmp_path):
    from serve.jobstore import SqliteJobStore
    from serve.jobstore.models import Job, WebhookSubscription

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        job, _ = store.create(Job(tenant="acme", webhook=WebhookSubscription(url=receiver.url)))
        receiver.script = [(503, {}, 0.0)]
        result = asyncio.run(make_sender().deliver(job.id, receiver.url, SECRET, EVENT_COMPLETED, PAYLOAD,
                                                   job_recorder(store, job.id, keep=50)))
        assert result.delivered

        def stored() -> list[dict]:
            return [a.model_dump(exclude_none=True) for a in store.get(job.id, tenant="acme").webhook.deliveries]

        assert [a.get("status_code") for a in stored()] == [503, 200]
        assert stored() == [{k: v for k, v in a.items() if v is not None} for a in result.attempts]

        trimmed = job_recorder(store, job.id, keep=3)
        for n in range(3):
            trimmed({**result.attempts[-1], "attempt": 10 + n})
        assert [a["attempt"] for a in stored()] == [10, 11, 12]
        job_recorder(store, "vid_missing", keep=3)(result.attempts[0])  # a deleted job: no error
        with pytest.raises(ValueError):
            job_recorder(store, job.id, keep=0)
    finally:
        store.close()
