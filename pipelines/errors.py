"""Domain errors raised by ``pipelines``.

Every error a caller can act on derives from :class:`SVDServeError`; the HTTP layer maps these
types to status codes in one table, and the CLI prints ``str(error)`` as a one-line message.
Messages are written for the person who sent the input: they name the field or file and say what
is allowed, and they never include secrets or stack traces.
"""

from __future__ import annotations


class SVDServeError(Exception):
    """Base class of every error raised on purpose by svd-serve."""

    #: Stable, machine-readable error code reported to API clients.
    code: str = "internal_error"


class InvalidInputError(SVDServeError, ValueError):
    """The request itself is wrong (bad parameter, unreadable image, ...): the client must fix it."""

    code = "invalid_input"


class InvalidImageError(InvalidInputError):
    """The conditioning image is missing, not an image, truncated, too large or of an unsupported mode."""

    code = "invalid_image"


class ImageTooLargeError(InvalidImageError):
    """The image (bytes or pixels) exceeds the configured limit."""

    code = "image_too_large"


class ModelLoadError(SVDServeError):
    """A model source could not be resolved or loaded (hub unreachable, gated repo, bad directory)."""

    code = "model_load_failed"


class JobCancelledError(SVDServeError):
    """Raised inside a stage when the job's cancellation check reports that it was cancelled."""

    code = "cancelled"
