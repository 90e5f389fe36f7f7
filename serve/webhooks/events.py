"""Webhook events: their types, which ones a job gets, and the exact bytes POSTed for one.

A job gets ``video.completed``, ``video.failed`` or ``video.cancelled`` when it reaches a
terminal state, and ``video.progress`` while it runs if it listed ``"progress"`` in its
``webhook_events``. The body is compact JSON::

    {"id": "evt_...", "type": "video.completed", "created_at": "2025-01-01T00:00:00.000Z",
     "data": {...the job, exactly as GET /v1/videos/{id} shows it...}}
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timezone
from typing import Any

from pydantic import BaseModel

from serve.jobstore.deliveries import terminal_event_id as _terminal_event_id

EVENT_COMPLETED = "video.completed"
EVENT_FAILED = "video.failed"
EVENT_CANCELLED = "video.cancelled"
EVENT_PROGRESS = "video.progress"
TERMINAL_EVENT_TYPES = frozenset({EVENT_COMPLETED, EVENT_FAILED, EVENT_CANCELLED})
EVENT_TYPES = TERMINAL_EVENT_TYPES | {EVENT_PROGRESS}

#: Values a job may list in ``webhook_events`` to opt in to extra events. Terminal events are
#: always sent; naming them too is accepted and changes nothing.
SUBSCRIBABLE_EVENTS = frozenset({"progress"})


def new_event_id() -> str:
    """``evt_`` + 24 URL-safe random characters."""
    return "evt_" + secrets.token_urlsafe(18)


def terminal_event_id(job_id: str, event_type: str) -> str:
    """The id of a job's terminal event, derived from the job: the same however often (or by
    whichever replica) the event is announced, so a receiver de-duplicating on ``Webhook-Id``
    never sees one terminal event under two ids. The job store enqueues terminal events under it
    (:func:`serve.jobstore.deliveries.terminal_event_id`)."""
    if event_type not in TERMINAL_EVENT_TYPES:
        raise ValueError(f"{event_type!r} is not a terminal event")
    return _terminal_event_id(job_id, event_type)


def event_type_for(status: Any) -> str:
    """The terminal event type of a job status (a ``JobStatus`` or its string value)."""
    value = getattr(status, "value", status)
    event = f"video.{value}"
    if event not in TERMINAL_EVENT_TYPES:
        raise ValueError(f"status {value!r} has no terminal webhook event")
    return event


def normalize_events(events: Iterable[str] | None) -> frozenset[str]:
    """Validate a job's ``webhook_events`` and return them as full event types.

    Accepts ``"progress"`` (or ``"video.progress"``) and, harmlessly, the terminal ones
    (``"completed"``, ``"video.failed"``, ...). Raises ``ValueError`` naming the allowed values.
    """
    result = set()
    for raw in events or ():
        name = str(raw).strip().lower()
        full = name if name.startswith("video.") else f"video.{name}"
        if full not in EVENT_TYPES:
            allowed = ", ".join(sorted(SUBSCRIBABLE_EVENTS | {t.split(".", 1)[1] for t in TERMINAL_EVENT_TYPES}))
            raise ValueError(f"unknown webhook event {raw!r}; allowed: {allowed}")
        result.add(full)
    return frozenset(result)


def wants_event(event_type: str, events: Iterable[str] | None) -> bool:
    """Whether a job subscribed with ``events`` gets ``event_type``: terminal events always,
    ``video.progress`` only if it asked for ``"progress"``."""
    if event_type in TERMINAL_EVENT_TYPES:
        return True
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    return event_type in normalize_events(events)


def iso_utc(value: datetime) -> str:
    """``2025-01-01T00:00:00.000Z``: UTC, milliseconds (a naive datetime is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return iso_utc(value) if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_body(event_id: str, event_type: str, payload: Mapping[str, Any] | BaseModel, created_at: datetime) -> bytes:
    """The exact bytes POSTed (and signed): compact JSON ``{"id", "type", "created_at", "data"}``."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else dict(payload)
    envelope = {"id": event_id, "type": event_type, "created_at": iso_utc(created_at), "data": data}
    return json.dumps(envelope, separators=(",", ":"), default=_json_default).encode("utf-8")
