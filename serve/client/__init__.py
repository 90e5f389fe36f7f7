"""The Python client of the svd-serve API, sync and async (needs only httpx and pydantic: importing
it loads neither Ray nor torch)::

    from serve.client import Client

    with Client("http://localhost:8000", api_key="sk-...") as client:
        video = client.submit(image="cat.png", num_frames=14, num_inference_steps=25)
        video = client.wait(video.id)
        client.download(video.id, "cat.mp4")

``svd-serve client generate|status|cancel|list`` is its command line (:mod:`serve.client.cli`).
"""

from ._core import API_KEY_ENV, URL_ENV
from .client import AsyncClient, Client
from .errors import (APIConnectionError, APIResponseError, APIStatusError, APITimeoutError, AuthenticationError,
                     BadRequestError, ClientError, ConflictError, InvalidArgumentError, NotFoundError,
                     PermissionDeniedError, RateLimitError, RequestTooLargeError, ServerError,
                     ServiceUnavailableError, StreamInterruptedError, UnprocessableEntityError, WaitTimeoutError)
from .models import (Output, ProgressDetail, Timestamps, Video, VideoDeleted, VideoError, VideoEvent, VideoList,
                     VideoStatus)
from .retries import RetryPolicy

__all__ = [
    "API_KEY_ENV", "URL_ENV",
    "Client", "AsyncClient", "RetryPolicy",
    "Video", "VideoList", "VideoDeleted", "VideoEvent", "VideoError", "VideoStatus", "Output", "ProgressDetail",
    "Timestamps",
    "ClientError", "InvalidArgumentError", "APIConnectionError", "APITimeoutError", "StreamInterruptedError",
    "APIResponseError", "WaitTimeoutError", "APIStatusError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "RequestTooLargeError", "UnprocessableEntityError",
    "RateLimitError", "ServerError", "ServiceUnavailableError",
]
