"""Listing order and page cursors: how :meth:`JobStore.list <serve.jobstore.base.JobStore.list>`
pages through a tenant's jobs by ``(created_at, id)``."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from serve.jobstore.models import Job, dt_to_us

#: Listing order by ``(created_at, id)``: newest first (``desc``, the default) or oldest first.
ListOrder = Literal["desc", "asc"]
LIST_ORDERS = ("desc", "asc")


def encode_cursor(job: Job) -> str:
    raw = f"{dt_to_us(job.created_at)}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(created_at in epoch microseconds, job id)`` of the last job of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        us, job_id = raw.split("|", 1)
        if not 0 <= int(us) < 2**63:  # an index column holds 64-bit integers
            raise ValueError("out of range")
        return int(us), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
