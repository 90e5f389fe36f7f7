"""Frame-rate conversion: retime the generated frames to span a duration at the output frame rate.

The ``N`` generated frames span the clip's duration ``D`` evenly (frame ``i`` at time
``i * D / (N - 1)``); the output clip at ``output_fps`` ``R`` has ``M = floor(D * R + 0.5) + 1``
frames, frame ``j`` at time ``j / R`` (:func:`pipelines.segments.output_frame_count`). Without a
requested duration, ``D = (N - 1) / fps`` (SVD's ``fps`` conditioning).

Interpolation modes (:data:`Interpolation`):
    * ``none``: no frames are made; the generated frames play as they are at ``output_fps`` (the
      caller handles this: :func:`retime` refuses ``none``).
    * ``blend``: ffmpeg ``minterpolate=mi_mode=blend``: each new frame cross-fades its two
      neighbours. Cheap, but a moving object shows twice, half-bright (ghosting).
    * ``mci``: ffmpeg ``minterpolate=mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1``:
      motion-compensated (block motion estimation in both directions, adaptive overlapped block
      compensation, variable-size blocks): a moving object shows once, in between. The default;
      runs on the CPU, single-threaded inside ffmpeg. ffmpeg refuses it below 32x32 pixels.
      minterpolate's scene-change detection is left on: across a cut it repeats frames instead of
      morphing one shot into the other.

How :func:`retime` runs ffmpeg, and what it does with what comes back:
    * The frames go in as raw ``rgb24`` at the exact input rate ``(N - 1) / D`` as a rational
      (``fractions.Fraction``; e.g. 48 intervals over 8 s is ``6/1``), and come back as raw
      ``rgb24`` through a pipe, streamed into the output array.
    * At the end of the stream minterpolate does not flush: it emits no time point after input
      frame ``N - 2`` (49 frames at 6/1 to 24 fps give 189 frames, up to 47/6 s, not 193 up to
      8 s). The last frame is therefore sent twice: ffmpeg then emits every time point up to and
      including the last generated frame's, ``floor(D * R) + 1`` frames (anything past ``M`` would
      be read and dropped).
    * minterpolate works in YUV (ffmpeg converts rgb24 to yuv444p and back, +-2 levels). Output
      frames whose time falls exactly on a generated frame are replaced by that generated frame,
      and those at or after the last generated frame's time (``t >= D``: the half frame that
      ``M`` may round up to) by the last generated frame. So output frame 0 is input frame 0
      exactly, the final output frame is the last generated frame (exactly when ``D * R`` rounds
      up or is whole; else the interpolation less than half an output frame before it), and the
      count is exactly ``M``.
    * When every output time falls on a generated frame (``R`` equals or divides the input rate)
      ffmpeg is not run at all; where ``R`` equals it, the input array itself is returned.
    * Odd sizes are fine: yuv444p keeps colour at full resolution (only the encoders need even
      sizes, see :mod:`pipelines.video`).
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from fractions import Fraction
from typing import Literal

import numpy as np

from pipelines.params import MAX_INTERPOLATED_FPS as MAX_OUTPUT_FPS  # one bound for the API and ffmpeg
from pipelines.params import Interpolation  # noqa: F401 - re-exported
from pipelines.segments import _check_duration, _check_int, check_frames, output_frame_count
from pipelines.video import FFmpegError, _tail, ffmpeg_exe

#: The ffmpeg filter of each mode that makes frames ({fps}: the output rate).
FILTERS: dict[str, str] = {
    "blend": "minterpolate=fps={fps}:mi_mode=blend",
    "mci": "minterpolate=fps={fps}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1",
}
MIN_OUTPUT_FPS = 1
#: minterpolate's mci refuses smaller frames ("Height or width < 32").
MCI_MIN_SIDE = 32
# Denominator bound for the input rate: ffmpeg parses rates with denominators up to ~1e6, and
# a duration is never known to better than a millisecond.
_MAX_RATE_DENOMINATOR = 1000
# Copies of the last frame appended to the input: minterpolate needs one frame past an
# interval to emit it (see the module docstring).
_TAIL_PADDING = 1
_READ_CHUNK = 1 << 20


def input_rate(*, generated_frames: int, duration_s: float) -> Fraction:
    """The rate at which ``generated_frames`` span ``duration_s``, ``(N - 1) / D``, as a fraction."""
    _check_int("generated_frames", generated_frames, low=2)
    _check_duration(duration_s)
    # Limit the duration first so that e.g. 13/7 s given as 1.857142... gives exactly 7/1 frames/s.
    duration = Fraction(duration_s).limit_denominator(_MAX_RATE_DENOMINATOR)
    return (Fraction(int(generated_frames) - 1) / duration).limit_denominator(_MAX_RATE_DENOMINATOR)


def retime(
    frames: np.ndarray,
    *,
    duration_s: float,
    output_fps: int,
    mode: Literal["blend", "mci"] = "mci",
) -> np.ndarray:
    """Make the frames of a clip that spans ``duration_s`` at ``output_fps`` from generated frames.

    Args:
        frames: ``uint8`` ``[N, H, W, 3]`` (RGB), ``N >= 2``, spanning ``duration_s`` evenly.
        duration_s: seconds from the first to the last generated frame, ``D > 0``.
        output_fps: frames per second of the result, an integer from 1 to 60.
        mode: ``blend`` or ``mci`` (see the module docstring); ``none`` is the caller's business.

    Returns:
        ``uint8`` ``[M, H, W, 3]`` with ``M = floor(D * R + 0.5) + 1``, frame ``j`` at ``j / R``
        seconds. The input array itself when ``R`` is the input rate (then ``M = N``).

    Raises:
        ValueError: bad frames, duration, rate or mode.
        FFmpegError: ffmpeg failed or returned too few frames.
    """
    if mode == "none":
        raise ValueError("retime makes frames; with interpolation 'none' play the generated frames as they are")
    if mode not in FILTERS:
        raise ValueError(f"mode must be 'blend' or 'mci', got {mode!r}")
    if (
        isinstance(output_fps, bool)
        or not isinstance(output_fps, (int, np.integer))
        or not MIN_OUTPUT_FPS <= output_fps <= MAX_OUTPUT_FPS
    ):
        raise ValueError(f"output_fps must be an integer from {MIN_OUTPUT_FPS} to {MAX_OUTPUT_FPS}, got {output_fps!r}")
    _check_frames(frames)
    count, height, width, _ = frames.shape
    if mode == "mci" and (height < MCI_MIN_SIDE or width < MCI_MIN_SIDE):
        raise ValueError(
            f"mci needs frames of at least {MCI_MIN_SIDE}x{MCI_MIN_SIDE} pixels, got {width}x{height} "
            "(width x height); use blend"
        )
    total = output_frame_count(generated_frames=count, duration_s=duration_s, output_fps=output_fps)
    rate = input_rate(generated_frames=count, duration_s=duration_s)
    if rate == output_fps:
        return frames

    # Where each output frame falls, in generated frames: j / R * rate.
    positions = [Fraction(j) * rate / int(output_fps) for j in range(total)]
    last = count - 1
    # Output frames that are generated frames (exact times, and everything from the last one on).
    taken = {j: min(int(pos), last) for j, pos in enumerate(positions) if pos.denominator == 1 or pos >= last}
    out = np.empty((total, height, width, 3), dtype=np.uint8)
    if len(taken) < total:
        made = _minterpolate(frames, rate=rate, output_fps=int(output_fps), mode=mode, out=out)
        needed = max(j for j in range(total) if j not in taken) + 1
        if made < needed:
            raise FFmpegError(
                f"ffmpeg minterpolate returned {made} frames; {needed} were needed for {count} frames over "
                f"{duration_s:g} s at {output_fps} fps"
            )
    for j, index in taken.items():
        out[j] = frames[index]
    return out


def _minterpolate(frames: np.ndarray, *, rate: Fraction, output_fps: int, mode: str, out: np.ndarray) -> int:
    """Run minterpolate over ``frames`` (plus the tail padding), filling ``out`` from the start.

    Returns how many whole frames ffmpeg produced into ``out`` (at most ``len(out)``; any surplus
    is read and dropped so that ffmpeg can finish).
    """
    _, height, width, _ = frames.shape
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-framerate", f"{rate.numerator}/{rate.denominator}",
        "-i", "pipe:0",
        "-an",
        "-vf", FILTERS[mode].format(fps=output_fps),
        # Every frame the filter makes, as made: no duplication or dropping by the muxer.
        "-fps_mode", "passthrough",
        "-f", "rawvideo", "-pix_fmt", "rgb24",
        "pipe:1",
    ]  # fmt: skip
    source = np.ascontiguousarray(frames)
    written: list[BaseException] = []

    def feed() -> None:
        # In a thread: ffmpeg's output must be read while its input is written, or both pipes
        # fill and both processes wait forever (the frames can be hundreds of MB).
        try:
            _write_all(proc.stdin, memoryview(source).cast("B"))
            for _ in range(_TAIL_PADDING):
                _write_all(proc.stdin, memoryview(source[-1]).cast("B"))
        except BrokenPipeError:
            pass  # ffmpeg stopped reading: it failed, and its exit status says so.
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            written.append(exc)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    # stderr to a file, not a pipe: nobody reads it while ffmpeg runs.
    with tempfile.TemporaryFile(prefix="svd-minterpolate-") as stderr:
        # Unbuffered: stdout is read straight into the output array.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        try:
            writer = threading.Thread(target=feed, name="minterpolate-feed", daemon=True)
            writer.start()
            target = memoryview(out.reshape(-1))  # out is a fresh C-contiguous array
            filled = 0
            while filled < len(target):
                got = proc.stdout.readinto(target[filled:])
                if not got:
                    break
                filled += got
            while proc.stdout.read(_READ_CHUNK):
                pass  # the surplus past M frames
            returncode = proc.wait()
            writer.join()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if returncode != 0:
            stderr.seek(0)
            raise FFmpegError(f"ffmpeg minterpolate ({mode}) failed: {_tail(stderr.read())}")
    if written:
        raise written[0]
    return filled // (height * width * 3)


def _write_all(pipe, data: memoryview) -> None:
    # An unbuffered pipe's write may take fewer bytes than given.
    while data:
        sent = pipe.write(data)
        data = data[sent:]


def _check_frames(frames: object) -> None:
    check_frames("frames", frames)
    if frames.shape[0] < 2:
        raise ValueError(
            f"retime needs at least 2 frames (the first and the last span the duration), got {frames.shape[0]}"
        )
