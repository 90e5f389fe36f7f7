"""Token buckets: the arithmetic every backend shares for
:meth:`JobStore.take_token <serve.jobstore.base.JobStore.take_token>` (rate limits held in the store,
so they hold across every process that shares it)."""

from __future__ import annotations

_TOKEN_EPSILON = 1e-9


def check_bucket_args(bucket: str, rate_per_s: float, burst: float) -> None:
    if not bucket:
        raise ValueError("bucket must not be empty")
    if not rate_per_s > 0:
        raise ValueError("rate_per_s must be positive")
    if not burst >= 1:
        raise ValueError("burst must be at least 1")


def refill(tokens: float | None, updated: float | None, *, now: float, rate_per_s: float, burst: float
           ) -> tuple[float, float, float]:
    """The token-bucket step both backends share (Redis runs the same arithmetic in Lua):
    ``(tokens after, timestamp after, wait)``; ``wait`` is 0.0 when a token was taken."""
    if tokens is None or updated is None:
        tokens, updated = burst, now
    elapsed = max(0.0, now - updated)
    tokens = min(burst, tokens + elapsed * rate_per_s)
    updated = max(updated, now)
    if tokens >= 1.0 - _TOKEN_EPSILON:  # float refills land a hair short of a whole token
        return max(0.0, tokens - 1.0), updated, 0.0
    return tokens, updated, (1.0 - tokens) / rate_per_s
