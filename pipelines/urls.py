"""URLs shown to people: the one redaction used by every log line, error message and ``repr``.

Lives in ``pipelines`` (the lowest layer: no ``serve``, no Ray) so that the image loader, the
SSRF guard, webhook delivery and the Redis clients all show URLs the same way.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["redact_url"]

MAX_SHOWN = 200


def redact_url(url: str) -> str:
    """``url`` for logs, error messages and ``repr``: scheme, host, port and path only.

    Credentials (``user:password@``), the query string and the fragment are dropped, since any of
    them may be secret (a pre-signed URL, a webhook token, a Redis password); at most 200
    characters are kept. ``"<invalid URL>"`` if the URL cannot be parsed.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if host:
        netloc = f"[{host}]" if ":" in host else host  # IPv6 literal
        if port is not None:
            netloc = f"{netloc}:{port}"
    else:  # e.g. unix:///run/redis.sock, a bare path: still no credentials
        netloc = parts.netloc.rpartition("@")[2]
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    after_scheme = url.split(":", 1)[1] if parts.scheme else url
    authority = f"//{netloc}" if netloc or after_scheme.startswith("//") else ""
    return f"{scheme}{authority}{parts.path}"[:MAX_SHOWN]
