"""The two errors of the tenants package, kept apart so every module (and the API's error mapping)
can raise or catch them without importing the file, admin or registry code."""

from __future__ import annotations

from pipelines.errors import SVDServeError


class AuthenticationError(SVDServeError):
    """No, a malformed or an unknown API key (the API answers 401)."""

    code = "unauthorized"


class TenantsFileError(SVDServeError, ValueError):
    """The tenants file (or a change to it) is invalid; the message names the place, never a value."""

    code = "invalid_tenants_file"
