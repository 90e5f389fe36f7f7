"""A webhook receiver for fault runs: a real HTTP server on loopback that refuses the first
delivery of every event (500, so each one waits in the retry backoff) and records what arrives,
de-duplicating on ``Webhook-Id`` as the documentation tells receivers to."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyReceiver:
    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.delivered: dict[str, tuple[str, str]] = {}  # Webhook-Id -> (job id, event type)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                event_id = self.headers.get("Webhook-Id", "")
                with receiver.lock:
                    receiver.attempts[event_id] = receiver.attempts.get(event_id, 0) + 1
                    first = receiver.attempts[event_id] == 1
                    if not first:
                        event = json.loads(body)
                        receiver.delivered.setdefault(event_id, (event["data"]["id"], event["type"]))
                self.send_response(500 if first else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def summary(self, completed_jobs: set[str]) -> dict:
        """Events delivered per (job, type): exactly one id each, and every completed job's."""
        ids_per_event: dict[tuple[str, str], set[str]] = {}
        for event_id, key in self.delivered.items():
            ids_per_event.setdefault(key, set()).add(event_id)
        completed_events = {job for (job, kind) in ids_per_event if kind == "video.completed"}
        return {"events_delivered": len(self.delivered),
                "events_with_two_ids": sum(1 for ids in ids_per_event.values() if len(ids) > 1),
                "completed_jobs_without_event": len(completed_jobs - completed_events),
                "attempts": sum(self.attempts.values())}

    def close(self) -> None:
        self.server.shutdown()
