"""API keys and webhook secrets: how they are made, hashed and named.

API keys are 32 random bytes, so a plain SHA-256 is a safe one-way function for them (no
password-style stretching needed); the file keeps only the hash. This module is the one
generator of webhook signing secrets in the project: admin commands call
:func:`new_webhook_secret`, nothing else mints them.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "svd_"
WEBHOOK_SECRET_PREFIX = "whsec_"
#: Characters of the key hash shown as a key's id (``sha256:`` + 12 hex digits).
KEY_ID_CHARS = 12


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """A short, non-secret handle of a key: its hash's first hex digits (``revoke --key-hash``)."""
    return key_hash.removeprefix("sha256:")[:KEY_ID_CHARS]
