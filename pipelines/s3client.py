"""How svd-serve builds a boto3 S3 client and reads a botocore error, in one place.

Two parts of the project talk to S3: the model weights mirror (:mod:`pipelines.loader.s3`) and
the object storage backend (:mod:`serve.storage.s3`). Each raises its own exception type with its
own wording, but they build their clients from the same recipe and agree on what a botocore
exception means (no credentials, unreachable endpoint, no such bucket, access denied, ...); both
live here. This module sits in ``pipelines`` because ``pipelines`` never imports ``serve``.

boto3 and botocore are imported only when a client is built or an error is read, so importing
this module costs nothing in processes that never touch S3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["NOT_FOUND_CODES", "S3Failure", "botocore_errors", "classify", "make_client"]

#: Codes S3 and compatible stores answer for a missing object (a HEAD gets a bare "404").
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

_BAD_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
_ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})

FailureKind = Literal[
    "no_credentials",  # boto3 found no (or only part of the) credentials
    "unreachable",  # nothing answered at the endpoint
    "invalid_request",  # botocore refused the parameters before sending anything
    "no_such_bucket",
    "bad_credentials",  # the store rejected the key, the signature or the session token
    "access_denied",
    "not_found",  # a missing object
    "client_error",  # any other error answer from the store
    "other",  # any other botocore (or unexpected) failure
]


def make_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    max_attempts: int,
    read_timeout: float,
    compatible_stores: bool = True,
) -> Any:
    """A boto3 S3 client for ``endpoint_url`` (None: boto3's default, which honours
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) and ``region`` (None: boto3's default).

    Credentials are never passed here: boto3 finds them in the environment, the shared config or
    the instance / workload identity. Retries are few and the connect timeout short, so a wrong
    endpoint fails in seconds, not minutes. ``compatible_stores`` adds what the storage backend
    sets for S3-compatible stores and presigned URLs (SigV4, path-style addressing and checksums
    only where required when an endpoint is given); the weights mirror has never set them.
    """
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "retries": {"max_attempts": max_attempts, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": read_timeout,
    }
    if compatible_stores:
        options["signature_version"] = "s3v4"
        # S3-compatible stores need path-style (http://host/bucket/key) addressing.
        options["s3"] = {"addressing_style": "path" if endpoint_url else "auto"}
        if endpoint_url:
            # boto3 >= 1.36 adds CRC checksums to every upload by default; many S3-compatible
            # stores reject them. Only send checksums where the S3 API requires one.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
    try:
        config = Config(**options)
    except TypeError:  # older botocore without the checksum options
        options.pop("request_checksum_calculation", None)
        options.pop("response_checksum_validation", None)
        config = Config(**options)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def botocore_errors() -> tuple[type[Exception], ...]:
    """``(BotoCoreError, ClientError)``: everything a client call raises on purpose."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


@dataclass(frozen=True)
class S3Failure:
    """What a botocore exception means, for a caller to word in its own exception type."""

    kind: FailureKind
    #: Whether the store answered with an error (a ``ClientError``) rather than failing to ask.
    answered: bool = False
    #: The store's error code ("NoSuchKey", "AccessDenied", "404", ...); "" when there is none.
    code: str = ""
    #: The HTTP status of the store's answer, when there was one.
    status: int | None = None
    #: The store's own message, "" when it gave none. It may echo request details: clean it.
    message: str = ""


def classify(err: BaseException) -> S3Failure:
    """Read ``err`` (from a boto3 S3 call) as one :class:`S3Failure`; never raises."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return S3Failure("no_credentials")
    if isinstance(err, EndpointConnectionError):
        return S3Failure("unreachable")
    if isinstance(err, ParamValidationError):
        return S3Failure("invalid_request")
    if not isinstance(err, ClientError):
        return S3Failure("other")
    error = err.response.get("Error") or {}
    code = str(error.get("Code") or "")
    status = (err.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    message = str(error.get("Message") or "")
    return S3Failure(_client_error_kind(code, status), answered=True, code=code, status=status, message=message)


def _client_error_kind(code: str, status: int | None) -> FailureKind:
    # Order matters: a missing bucket is a 404 too.
    if code == "NoSuchBucket":
        return "no_such_bucket"
    if code in _BAD_CREDENTIAL_CODES:
        return "bad_credentials"
    if code in _ACCESS_DENIED_CODES or status == 403:
        return "access_denied"
    if code in NOT_FOUND_CODES or status == 404:
        return "not_found"
    return "client_error"
