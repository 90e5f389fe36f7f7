"""``svd-serve client``: submit and follow jobs on a running service, with :class:`serve.client.Client`.

    svd-serve client generate --url http://localhost:8000 --key sk-... --image cat.png --out clip.mp4 \\
        --num-frames 14 --seed 7
    svd-serve client status VIDEO_ID [--json]
    svd-serve client cancel VIDEO_ID
    svd-serve client list [--limit 20] [--status queued] [--after VIDEO_ID] [--json]

``--url`` and ``--key`` default to ``$SVD_SERVE_URL`` and ``$SVD_SERVE_API_KEY``. ``generate``
uploads a file (or sends an http(s)/data: URL), shows the queue position while the job waits and
the stage and sampling step while it runs (on stderr; ``--quiet`` hides it), then downloads the clip.

Exit status: 0 done; 1 the job failed or was cancelled, or the service could not be reached,
answered 429 or 5xx, or the wait timed out; 2 bad input: arguments, the image, a parameter, or
another 4xx from the API (a wrong key, an unknown id, a job in the wrong state); 130 interrupted.
Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ..cli import CLIError, _add_generation_options, _infer_format, _params_from_args, _prepare_out
from ._core import API_KEY_ENV, URL_ENV
from .client import Client
from .errors import APIStatusError, ClientError, InvalidArgumentError, WaitTimeoutError
from .models import Video

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
URL_IMAGE = re.compile(r"(https?://|data:)", re.IGNORECASE)


class JobFailed(Exception):
    """The job ended without a clip: exit status 1."""


def _command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Runs a subcommand: every expected failure becomes one line on stderr and its exit status."""

    @functools.wraps(run)
    def handler(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (CLIError, InvalidArgumentError) as error:
            status, message = EXIT_BAD_INPUT, str(error)
        except APIStatusError as error:
            bad_input = 400 <= (error.status or 0) < 500 and error.status != 429
            status, message = (EXIT_BAD_INPUT if bad_input else EXIT_FAILED), str(error)
        except (ClientError, JobFailed) as error:
            status, message = EXIT_FAILED, str(error)
        print(f"svd-serve client {args.client_command}: {message}", file=sys.stderr)
        return status

    return handler


def _client(args: argparse.Namespace) -> Client:
    client = Client(args.url, args.key)
    if not (args.key or os.environ.get(API_KEY_ENV)):
        client.close()
        raise InvalidArgumentError(f"no API key: pass --key or set {API_KEY_ENV}")
    return client


# -- what is printed ----------------------------------------------------------------------------------


def describe(video: Video) -> str:
    """The job's state in a few words: ``queued, 2 ahead``, ``in_progress: sampling step 3/25 (40%)``."""
    if video.status == "queued":
        return "queued" + (f", {video.queue_position} ahead" if video.queue_position is not None else "")
    if video.status == "in_progress":
        detail = video.progress_detail
        step = f" step {detail.step}/{detail.total_steps}" if detail and detail.total_steps else ""
        stage = f" {detail.stage}" if detail and detail.stage else ""
        return f"in_progress:{stage}{step} ({video.percent:.0f}%)"
    if video.status == "failed" and video.error is not None:
        return f"failed: {video.error.message} ({video.error.code})"
    return str(video.status)


def _created(video: Video) -> str:
    if video.timestamps is not None and video.timestamps.created_at is not None:
        return video.timestamps.created_at.isoformat(timespec="seconds")
    return str(video.created_at or "-")


def _details(video: Video) -> list[tuple[str, str]]:
    rows = [("id", video.id), ("status", describe(video)), ("created", _created(video)),
            ("model", video.model or ""), ("size", video.size or ""), ("seconds", video.seconds or ""),
            ("params", " ".join(f"{name}={value}" for name, value in video.params.items() if value is not None))]
    if video.timings:
        rows.append(("timings", " ".join(f"{stage}={seconds:.2f}s" for stage, seconds in video.timings.items())))
    if video.output is not None:
        rows.append(("output", f"{video.output.url} ({video.output.file_size} bytes)"))
    return [(name, value) for name, value in rows if value]


class ProgressBar:
    """tqdm on stderr: the queue position while queued, the stage and its steps while running."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def update(self, video: Video) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
        detail = video.progress_detail
        if video.status == "queued":
            self.bar.set_description_str(describe(video), refresh=False)
        elif detail is not None:
            self.bar.set_description_str(detail.stage or str(video.status), refresh=False)
            if detail.total_steps and self.bar.total != detail.total_steps:
                self.bar.reset(total=detail.total_steps)
            self.bar.n = min(detail.step, detail.total_steps or detail.step)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- subcommands --------------------------------------------------------------------------------------


@_command
def cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is None and not args.no_wait:
        raise CLIError("--out is required (or --no-wait to submit only)")
    fmt = _infer_format(out) if out is not None else None
    if out is not None and fmt is None and args.output_format is None:
        raise CLIError(f"--out {out}: use a .mp4, .webm or .gif file name (or pass --output-format)")
    params = _params_from_args(args, **({"output_format": fmt} if fmt else {}))
    if fmt is not None and params.output_format.value != fmt:
        raise CLIError(f"--out {out} does not match --output-format {params.output_format.value}")
    if out is not None:
        _prepare_out(out)
    image: dict[str, Any] = {"image_url": args.image} if URL_IMAGE.match(args.image) else {"image": args.image}
    with _client(args) as client:
        video = client.submit(**image, idempotency_key=args.idempotency_key,
                              **params.model_dump(mode="json", exclude_unset=True))
        if args.no_wait:
            print(video.id)
            return 0
        if not args.quiet:
            print(f"submitted {video.id}", file=sys.stderr)
        progress = ProgressBar(enabled=not args.quiet)
        try:
            progress.update(video)
            video = client.wait(video.id, timeout=args.timeout, on_update=progress.update)
        except KeyboardInterrupt:
            progress.close()
            print(f"svd-serve client generate: interrupted; video {video.id} goes on "
                  f"(svd-serve client cancel {video.id})", file=sys.stderr)
            return EXIT_INTERRUPTED
        except WaitTimeoutError as error:
            raise JobFailed(f"{error}; it goes on (svd-serve client status {video.id})") from None
        finally:
            progress.close()
        if video.status != "completed":
            raise JobFailed(f"video {video.id} {describe(video)}")
        path = client.download(video.id, out)
    seed = video.params.get("seed")
    print(f"{path}: {video.id}, {video.size or '?'}, {video.seconds or '?'} s, seed {seed}, "
          f"{path.stat().st_size} bytes")
    return 0


@_command
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        video = client.get(args.video_id)
    if args.json:
        print(video.model_dump_json())
        return 0
    rows = _details(video)
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        print(f"{name + ':':<{width}} {value}")
    return 0


@_command
def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        video = client.cancel(args.video_id)
    print(f"{video.id}: {describe(video)}")
    return 0


@_command
def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(limit=args.limit, after=args.after, order=args.order, status=args.status)
    if args.json:
        print(page.model_dump_json())
        return 0
    for video in page.data:
        print(f"{video.id}  {_created(video)}  {video.size or '-':>9}  {describe(video)}")
    if not page.data:
        print("no videos", file=sys.stderr)
    if page.has_more:
        print(f"more: svd-serve client list --after {page.last_id}", file=sys.stderr)
    return 0


# -- registration -------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``client`` and its subcommands to the ``svd-serve`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"the service's base URL (default: ${URL_ENV})")
    common.add_argument("--key", default=None, help=f"API key (default: ${API_KEY_ENV})")

    client = subparsers.add_parser(
        "client", help="submit and follow jobs on a running service",
        description="The svd-serve API from the command line: generate a clip on a running service, show, "
                    "cancel and list jobs. Exit status: 1 a failed job or an unavailable service, 2 bad input.",
    )
    commands = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")

    generate = commands.add_parser("generate", parents=[common], help="submit an image, follow the job with a "
                                                                        "progress bar, download the clip")
    generate.add_argument("--image", required=True, help="a file path (uploaded) or an http(s) or data: URL")
    generate.add_argument("--out", default=None, help="where to write the clip: .mp4, .webm or .gif")
    generate.add_argument("--no-wait", action="store_true", help="submit, print the video id and exit")
    generate.add_argument("--timeout", type=float, default=None,
                          help="stop waiting after this many seconds (the job goes on)")
    generate.add_argument("--idempotency-key", default=None,
                          help="the submit's Idempotency-Key (default: a fresh UUID)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_generation_options(generate)
    generate.set_defaults(handler=cmd_generate)

    status = commands.add_parser("status", parents=[common], help="show a job")
    status.add_argument("video_id")
    status.add_argument("--json", action="store_true", help="print the video object as JSON")
    status.set_defaults(handler=cmd_status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("video_id")
    cancel.set_defaults(handler=cmd_cancel)

    listing = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--limit", type=int, default=None, help="jobs per page (server default: 20)")
    listing.add_argument("--after", default=None, metavar="VIDEO_ID", help="the page after this job")
    listing.add_argument("--order", choices=["desc", "asc"], default=None, help="by creation time (default: desc)")
    listing.add_argument("--status", default=None,
                         choices=["queued", "in_progress", "completed", "failed", "cancelled"])
    listing.add_argument("--json", action="store_true", help="print the page as JSON")
    listing.set_defaults(handler=cmd_list)
    return client
