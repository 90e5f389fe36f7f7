"""Webhook signatures (Stripe / Standard Webhooks style; the scheme is in ``docs/webhooks.md``).

Every attempt carries ``Webhook-Id`` (the event id), ``Webhook-Timestamp`` (unix seconds when
*this attempt* was signed) and ``Webhook-Signature``: ``v1=`` + the lowercase hex HMAC-SHA256,
keyed with the tenant's webhook secret (its UTF-8 bytes), of ``f"{timestamp}.".encode() + body``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

HEADER_ID = "Webhook-Id"
HEADER_TIMESTAMP = "Webhook-Timestamp"
HEADER_SIGNATURE = "Webhook-Signature"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


def _digest(secret: str, timestamp: int | str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Webhook-Signature`` header value: ``"v1=" + hex(HMAC-SHA256(secret, f"{timestamp}." + body))``.

    ``secret`` is keyed as its UTF-8 bytes (a ``whsec_...`` secret is used whole, prefix
    included); ``timestamp`` is the integer unix time also sent as ``Webhook-Timestamp``.
    """
    if not secret:
        raise ValueError("a webhook secret is required to sign")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be integer unix seconds")
    return f"{SIGNATURE_VERSION}={_digest(secret, timestamp, body)}"


def signed_headers(secret: str, event_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three ``Webhook-*`` headers of one attempt, signed now (or at ``timestamp``)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {HEADER_ID: event_id, HEADER_TIMESTAMP: str(timestamp), HEADER_SIGNATURE: sign(secret, timestamp, body)}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    getter = getattr(headers, "get", None)
    value = getter(name) if getter is not None else None
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        wanted = name.lower()
        for key, candidate in headers.items():
            if key.lower() == wanted:
                return candidate
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True if ``headers`` carry a valid, fresh signature of ``body`` under ``secret``.

    Header names are matched case-insensitively. False (never an exception) when a header is
    missing or malformed, when the timestamp is more than ``tolerance_s`` away from ``now``
    (default: the current time) in either direction, or when no ``v1=`` signature matches
    (compared in constant time). Several space-separated entries may appear (secret rotation).
    """
    if not secret or not isinstance(body, (bytes, bytearray)):
        return False
    raw_ts = _header(headers, HEADER_TIMESTAMP)
    raw_sig = _header(headers, HEADER_SIGNATURE)
    if not raw_ts or not raw_sig or _header(headers, HEADER_ID) is None:
        return False
    raw_ts = raw_ts.strip()
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        return False
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, bytes(body))
    ok = False
    for entry in raw_sig.replace(",", " ").split():
        version, _, value = entry.partition("=")
        if version == SIGNATURE_VERSION and value:
            ok |= hmac.compare_digest(value.strip().lower().encode("ascii", "replace"), expected.encode("ascii"))
    return ok
