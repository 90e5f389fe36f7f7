"""The SQLite side of the webhook delivery queue (:mod:`serve.jobstore.deliveries`): a table in the
job store's own file, so one node's runner processes share it exactly as they share the jobs.

``webhook_deliveries``: one row per pending event. ``data`` holds the fields fixed at enqueue (JSON,
body base64); ``attempts``, ``first_attempt_at``, ``due_at`` and ``lease_owner`` are columns
because claims and hand-backs change them. Every write is a ``BEGIN IMMEDIATE`` transaction, so a
claim (select due rows, stamp the lease) is atomic across threads and processes.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from serve.jobstore.counted import counted_errors
from serve.jobstore.deliveries import WEBHOOK_CHANNEL, DeliveryQueue, WebhookDelivery

DELIVERY_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    event_id         TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL,
    due_at           REAL NOT NULL,
    lease_owner      TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    data             TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (due_at, event_id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id);
"""

_SELECT = "SELECT data, attempts, first_attempt_at, due_at, lease_owner FROM webhook_deliveries"


def _delivery(row: tuple) -> WebhookDelivery:
    data, attempts, first, due, owner = row
    return WebhookDelivery.model_validate_json(data).model_copy(
        update={"attempts": attempts, "first_attempt_at": first, "due_at": due, "lease_owner": owner})


_translate = counted_errors(sqlite3.Error, backend="sqlite")  # JobStoreError, counted


class SqliteDeliveries(DeliveryQueue):
    """Mixed into :class:`serve.jobstore.sqlite.SqliteJobStore` (uses its ``_db``, ``_now``, ``changes``)."""

    _db: Any

    @staticmethod
    def _insert_delivery(conn: sqlite3.Connection, delivery: WebhookDelivery) -> bool:
        """Insert inside the caller's transaction (a terminal transition's, or :meth:`enqueue_webhook`'s);
        False if the event is already pending."""
        cursor = conn.execute(
            "INSERT OR IGNORE INTO webhook_deliveries (event_id, job_id, due_at, lease_owner, attempts, "
            "first_attempt_at, data) VALUES (?, ?, ?, NULL, ?, ?, ?)",
            (delivery.event_id, delivery.job_id, delivery.due_at, delivery.attempts, delivery.first_attempt_at,
             delivery.immutable_json()),
        )
        return cursor.rowcount == 1

    @_translate
    def enqueue_webhook(self, delivery: WebhookDelivery) -> bool:
        with self._db.transaction() as conn:
            added = self._insert_delivery(conn, delivery)
        if added:
            self.changes.publish(WEBHOOK_CHANNEL)
        return added

    @_translate
    def claim_webhooks(self, *, owner: str, lease_s: float, limit: int = 16,
                       now: float | None = None) -> list[WebhookDelivery]:
        if limit < 1:
            return []
        now = self._now() if now is None else float(now)
        until = now + lease_s
        with self._db.transaction() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT event_id FROM webhook_deliveries WHERE due_at <= ? ORDER BY due_at, event_id LIMIT ?",
                (now, limit)).fetchall()]
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            conn.execute(f"UPDATE webhook_deliveries SET lease_owner = ?, due_at = ? WHERE event_id IN ({marks})",
                         (owner, until, *ids))
            rows = conn.execute(f"{_SELECT} WHERE event_id IN ({marks}) ORDER BY event_id", ids).fetchall()
        by_id = {d.event_id: d for d in map(_delivery, rows)}
        return [by_id[i] for i in ids if i in by_id]

    @_translate
    def retry_webhook(self, event_id: str, *, owner: str, attempts: int, first_attempt_at: float | None,
                      due_at: float, body: bytes | None = None) -> bool:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT data FROM webhook_deliveries WHERE event_id = ? AND lease_owner = ?",
                               (event_id, owner)).fetchone()
            if row is None:
                return False
            data = row[0]
            if body is not None:
                data = WebhookDelivery.model_validate_json(data).model_copy(update={"body": body}).immutable_json()
            conn.execute(
                "UPDATE webhook_deliveries SET lease_owner = NULL, attempts = ?, first_attempt_at = ?, due_at = ?, "
                "data = ? WHERE event_id = ?",
                (attempts, first_attempt_at, due_at, data, event_id),
            )
        return True

    @_translate
    def set_webhook_body(self, event_id: str, body: bytes) -> bool:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT data FROM webhook_deliveries WHERE event_id = ?", (event_id,)).fetchone()
            if row is None:
                return False
            delivery = WebhookDelivery.model_validate_json(row[0])
            if delivery.body:
                return False
            conn.execute("UPDATE webhook_deliveries SET data = ? WHERE event_id = ?",
                         (delivery.model_copy(update={"body": body}).immutable_json(), event_id))
        return True

    @_translate
    def finish_webhook(self, event_id: str) -> bool:
        with self._db.transaction() as conn:
            cursor = conn.execute("DELETE FROM webhook_deliveries WHERE event_id = ?", (event_id,))
        return cursor.rowcount == 1

    @_translate
    def pending_webhooks(self, *, job_id: str | None = None, limit: int = 100) -> list[WebhookDelivery]:
        sql, args = _SELECT, []
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", [job_id]
        rows = self._db.conn().execute(sql + " ORDER BY due_at, event_id LIMIT ?", (*args, limit)).fetchall()
        return [_delivery(r) for r in rows]
