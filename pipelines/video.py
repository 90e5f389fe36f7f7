"""Encoding generated frames into a clip, and decoding clips back, with a real ffmpeg.

The ffmpeg binary is the static build that ``imageio-ffmpeg`` ships (override it with the
``IMAGEIO_FFMPEG_EXE`` environment variable). Frames go to ffmpeg's stdin as raw ``rgb24``; the
clip is written to a temporary file, because ``-movflags +faststart`` rewrites the MP4 to move
the ``moov`` index in front of the media data, which needs a seekable output.

Formats (:class:`~pipelines.params.OutputFormat`):
    * ``mp4``: H.264, yuv420p, BT.709 tagged, ``+faststart`` so browsers can start playing
      before the download ends. Default CRF 18 (visually lossless; x264's own is 23). The
      encoder is ``libx264`` (CPU) or ``h264_nvenc`` (NVIDIA GPU): see :data:`CODECS` and
      :func:`resolve_codec`; NVENC's options and checks are in :mod:`pipelines.acceleration.nvenc`.
    * ``webm``: VP9 (libvpx-vp9), yuv420p, constant quality (``-b:v 0``). Default CRF 32.
    * ``gif``: one filter graph, ``palettegen`` then ``paletteuse``, looping forever. GIF stores
      frame delays in 1/100 s, so playback rates are rounded to that (7 fps plays at ~7.14 fps).

yuv420p stores colour at half resolution, so H.264 and VP9 need an even width and height:
odd sizes are rejected rather than padded (SVD's sizes are multiples of 8; padding would
silently change the clip's size).

``fps`` here is the *playback* rate of the file, not the model's fps conditioning.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.params import OutputFormat

if TYPE_CHECKING:
    from pipelines.acceleration.nvenc import NvencStatus

#: The encoders each format may use; the first is the CPU one that ``auto`` falls back to.
CODECS: dict[OutputFormat, tuple[str, ...]] = {
    OutputFormat.mp4: ("libx264", "h264_nvenc"),
    OutputFormat.webm: ("libvpx-vp9",),
    OutputFormat.gif: ("gif",),
}
#: What ``codec`` may be: ``auto`` or an encoder name of :data:`CODECS`.
CODEC_CHOICES = ("auto", *dict.fromkeys(name for names in CODECS.values() for name in names))
#: The H.264 encoders a deployment may pin (the video encoder stage's ``h264_codec``).
H264_CODEC_CHOICES = ("auto", *CODECS[OutputFormat.mp4])
#: Default constant-rate factor per format (lower is better quality, larger files).
DEFAULT_CRF = {OutputFormat.mp4: 18, OutputFormat.webm: 32}
_CRF_RANGE = {OutputFormat.mp4: (0, 51), OutputFormat.webm: (0, 63)}
_MAX_FPS = 240
_STDERR_TAIL_LINES = 8
# setparams, not -color_* output options: ffmpeg 7+ takes the tags from the frames.
_TO_YUV420P_BT709 = (
    "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
    "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709"
)


class FFmpegError(RuntimeError):
    """ffmpeg failed; the message ends with the last lines of its stderr."""


@dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg reports about a clip's first video stream, with frames counted by decoding."""

    frames: int
    width: int
    height: int
    fps: float  # as ffmpeg reports the stream's rate (for GIF: derived from the frame delays)
    codec: str  # ffmpeg's decoder name: "h264", "vp9", "gif"
    pix_fmt: str  # e.g. "yuv420p"; "bgra" for GIF

    @property
    def duration(self) -> float:
        """Seconds of playback, frames / fps."""
        return self.frames / self.fps if self.fps else 0.0


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary used by this module."""
    import imageio_ffmpeg  # Imported lazily: it looks the binary up on first use.

    return imageio_ffmpeg.get_ffmpeg_exe()


def nvenc_status() -> NvencStatus:
    """Whether ``h264_nvenc`` works in this process with this module's ffmpeg (checked once)."""
    from pipelines.acceleration.nvenc import nvenc_status as check

    return check(ffmpeg_exe(), video_filter=_TO_YUV420P_BT709)


def resolve_codec(output_format: OutputFormat | str, codec: str = "auto") -> str:
    """The encoder that ``codec`` means for ``output_format``.

    ``auto``: for mp4, ``h264_nvenc`` when :func:`nvenc_status` says it works, else ``libx264``;
    for webm and gif, their one (CPU) encoder. A named encoder must be one of the format's
    (:data:`CODECS`), and ``h264_nvenc`` must work here.

    Raises:
        ValueError: an unknown codec, one that does not encode this format, or ``h264_nvenc``
            where it does not work (the message says why).
    """
    fmt = OutputFormat(output_format)
    if codec not in CODEC_CHOICES:
        raise ValueError(f"unknown video codec {codec!r}: choose one of {', '.join(CODEC_CHOICES)}")
    if codec == "auto":
        if fmt is OutputFormat.mp4 and nvenc_status().available:
            return "h264_nvenc"
        return CODECS[fmt][0]
    if codec not in CODECS[fmt]:
        raise ValueError(f"codec {codec} does not encode {fmt.value}: use auto or {' or '.join(CODECS[fmt])}")
    if codec == "h264_nvenc":
        status = nvenc_status()
        if not status.available:
            raise ValueError(f"h264_nvenc cannot be used here: {status.reason}; use libx264 or auto")
    return codec


def encode_video(
    frames: np.ndarray,
    *,
    fps: float,
    output_format: OutputFormat | str = OutputFormat.mp4,
    crf: int | None = None,
    codec: str = "auto",
) -> bytes:
    """Encode frames into a clip and return the file's bytes.

    Args:
        frames: ``uint8`` array of shape ``[F, H, W, 3]`` (RGB), at least one frame.
        fps: playback frames per second, ``0 < fps <= 240``.
        output_format: ``mp4`` (default), ``webm`` or ``gif``.
        crf: constant-rate factor; ``None`` uses :data:`DEFAULT_CRF` (mp4 18, range 0-51;
            webm 32, range 0-63). Not allowed for gif.
        codec: ``auto`` (default) or an encoder of the format (:func:`resolve_codec`). When
            ``auto`` chose ``h264_nvenc`` and the GPU refuses this clip (too small a frame, no
            free encoder session), the clip is encoded with ``libx264`` instead.

    Raises:
        ValueError: bad frames shape/dtype, odd size for mp4/webm, bad fps, crf or codec.
        FFmpegError: ffmpeg exited with an error.
    """
    fmt = OutputFormat(output_format)
    with tempfile.TemporaryDirectory(prefix="svd-encode-") as tmp:
        out = Path(tmp) / f"clip.{fmt.value}"
        _encode_to_file(frames, out, fps=fps, fmt=fmt, crf=crf, codec=codec)
        return out.read_bytes()


def write_video(
    frames: np.ndarray,
    path: str | os.PathLike[str],
    *,
    fps: float,
    output_format: OutputFormat | str | None = None,
    crf: int | None = None,
    codec: str = "auto",
) -> Path:
    """Encode frames into ``path`` (replaced atomically) and return it.

    ``output_format`` defaults to the file's suffix (``.mp4``, ``.webm``, ``.gif``); the other
    arguments are as in :func:`encode_video`.
    """
    path = Path(path)
    if output_format is None:
        suffix = path.suffix.lower().lstrip(".")
        try:
            output_format = OutputFormat(suffix)
        except ValueError:
            raise ValueError(
                f"cannot tell the video format from {path.name!r}: use a .mp4, .webm or .gif name or pass output_format"
            ) from None
    fmt = OutputFormat(output_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Encode next to the target, then rename: readers never see a half-written clip.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{fmt.value}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _encode_to_file(frames, tmp, fps=fps, fmt=fmt, crf=crf, codec=codec)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def probe_video(source: bytes | str | os.PathLike[str]) -> VideoInfo:
    """Decode a whole clip with ffmpeg and report its first video stream.

    Every frame is decoded (to 8-bit gray, to keep memory small), so a file that ffmpeg cannot
    fully decode raises :class:`FFmpegError`: passing this proves the clip is playable.
    """
    header, raw = _decode(source, pix_fmt="gray")
    info = _parse_stream_header(header)
    frame_size = info.width * info.height
    return VideoInfo(
        frames=len(raw) // frame_size,
        width=info.width,
        height=info.height,
        fps=info.fps,
        codec=info.codec,
        pix_fmt=info.pix_fmt,
    )


def decode_video_frames(source: bytes | str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a clip to a ``uint8`` array ``[F, H, W, 3]`` (RGB)."""
    header, raw = _decode(source, pix_fmt="rgb24")
    info = _parse_stream_header(header)
    frame_size = info.width * info.height * 3
    if len(raw) % frame_size:
        raise FFmpegError(f"ffmpeg returned {len(raw)} bytes, not a whole number of {info.width}x{info.height} frames")
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, info.height, info.width, 3)


# -- helpers -----------------------------------------------------------------------------------


def _validate(frames: np.ndarray, *, fps: float, fmt: OutputFormat, crf: int | None) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, not {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [frames, height, width, 3], got {list(frames.shape)}")
    count, height, width, _ = frames.shape
    if count < 1 or height < 1 or width < 1:
        raise ValueError(f"frames must be non-empty, got shape {list(frames.shape)}")
    if fmt is not OutputFormat.gif and (width % 2 or height % 2):
        raise ValueError(
            f"{fmt.value} (yuv420p) needs an even width and height, got {width}x{height} (width x height)"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= _MAX_FPS:
        raise ValueError(f"fps must be a number above 0 and at most {_MAX_FPS}, got {fps!r}")
    if crf is not None:
        if fmt not in _CRF_RANGE:
            raise ValueError(f"crf does not apply to {fmt.value}")
        low, high = _CRF_RANGE[fmt]
        if isinstance(crf, bool) or not isinstance(crf, int) or not low <= crf <= high:
            raise ValueError(f"crf for {fmt.value} must be an integer from {low} to {high}, got {crf!r}")


def _codec_args(fmt: OutputFormat, crf: int | None, codec: str) -> list[str]:
    if fmt is OutputFormat.mp4:
        quality = crf if crf is not None else DEFAULT_CRF[fmt]
        if codec == "h264_nvenc":
            from pipelines.acceleration.nvenc import nvenc_h264_args

            encoder = nvenc_h264_args(quality)
        else:
            encoder = ["-c:v", "libx264", "-preset", "medium", "-crf", str(quality)]
        return [
            # Convert with the BT.709 matrix and tag it so: players assume BT.709 for HD video.
            "-vf", _TO_YUV420P_BT709,
            *encoder,
            "-pix_fmt", "yuv420p",
            "-movflags", "+faststart",
            "-f", "mp4",
        ]  # fmt: skip
    if fmt is OutputFormat.webm:
        return [
            "-vf", _TO_YUV420P_BT709,
            "-c:v", "libvpx-vp9", "-crf", str(crf if crf is not None else DEFAULT_CRF[fmt]), "-b:v", "0",
            # "good" with cpu-used 4 and row threading: several times faster than the default, same look.
            "-deadline", "good", "-cpu-used", "4", "-row-mt", "1",
            "-pix_fmt", "yuv420p",
            "-f", "webm",
        ]  # fmt: skip
    return [
        # One graph: build a palette from all frames, then map every frame onto it.
        "-filter_complex", "[0:v]split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=sierra2_4a",
        "-loop", "0",
        "-f", "gif",
    ]  # fmt: skip


def _encode_to_file(frames: np.ndarray, out: Path, *, fps: float, fmt: OutputFormat, crf: int | None,
                    codec: str) -> None:
    _validate(frames, fps=fps, fmt=fmt, crf=crf)
    encoder = resolve_codec(fmt, codec)
    try:
        _run_encoder(frames, out, fps=fps, fmt=fmt, crf=crf, codec=encoder)
    except FFmpegError:
        if not (codec == "auto" and encoder == "h264_nvenc"):
            raise
        # The GPU refused this clip (a frame under NVENC's minimum size, every encoder session
        # taken): the CPU encoder makes the same kind of file.
        _run_encoder(frames, out, fps=fps, fmt=fmt, crf=crf, codec=CODECS[fmt][0])


def _run_encoder(frames: np.ndarray, out: Path, *, fps: float, fmt: OutputFormat, crf: int | None,
                 codec: str) -> None:
    _, height, width, _ = frames.shape
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", f"{fps:g}",
        "-i", "pipe:0",
        "-an",
        *_codec_args(fmt, crf, codec),
        str(out),
    ]  # fmt: skip
    result = subprocess.run(
        cmd, input=np.ascontiguousarray(frames).tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if result.returncode != 0:
        raise FFmpegError(f"ffmpeg could not encode {fmt.value} ({codec}): {_tail(result.stderr)}")


def _decode(source: bytes | str | os.PathLike[str], *, pix_fmt: str) -> tuple[str, bytes]:
    """Run ffmpeg over the whole clip; return (stderr header text, raw frames)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise FFmpegError("cannot decode an empty video (0 bytes)")
        # A file, not a pipe: MP4s without faststart need to seek to their index.
        with tempfile.TemporaryDirectory(prefix="svd-decode-") as tmp:
            path = Path(tmp) / "clip"
            path.write_bytes(bytes(source))
            return _decode(path, pix_fmt=pix_fmt)
    path = Path(source)
    if not path.is_file():
        raise FFmpegError(f"video file {path} does not exist")
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats",
        # Stop at the first corrupt packet, so a damaged clip fails instead of decoding short.
        "-xerror",
        # Level tags let errors be picked out; the default level keeps the stream header.
        "-loglevel", "level+info",
        "-i", str(path),
        "-map", "0:v:0", "-an", "-sn",
        # One output frame per decoded frame: no duplication or dropping to fit a frame rate.
        "-fps_mode", "passthrough",
        "-f", "rawvideo", "-pix_fmt", pix_fmt,
        "pipe:1",
    ]  # fmt: skip
    # Default log level: "-v error" would hide the stream header that carries size, codec and fps.
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    header = result.stderr.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise FFmpegError(f"ffmpeg could not decode {path.name}: {_tail(result.stderr, only_errors=True)}")
    return header, result.stdout


_STREAM_RE = re.compile(r"Stream #0:\d+.*?: Video: (?P<rest>.*)")


def _parse_stream_header(header: str) -> VideoInfo:
    """Parse the first input video stream line of ``ffmpeg -i`` output (frames left at 0)."""
    input_part = header.split("Output #0", 1)[0]
    match = _STREAM_RE.search(input_part)
    if match is None:
        raise FFmpegError(f"ffmpeg found no video stream: {_tail(header.encode())}")
    rest = match.group("rest")
    codec = rest.split(None, 1)[0].rstrip(",")
    # Drop parenthesised details ("(High)", "(tv, bt709, progressive)") so commas split fields.
    flat = rest
    while True:
        stripped = re.sub(r"\([^()]*\)", "", flat)
        if stripped == flat:
            break
        flat = stripped
    fields = [field.strip() for field in flat.split(",")]
    pix_fmt = fields[1].split()[0] if len(fields) > 1 and fields[1] else ""
    size = re.search(r"(?<![\w.])(\d+)x(\d+)(?![\w.])", flat)
    if size is None:
        raise FFmpegError(f"ffmpeg reported no frame size: {rest.strip()}")
    # "7 fps" is the stream's declared rate; "tbr" is ffmpeg's guess when none is declared.
    rate = re.search(r"(\d+(?:\.\d+)?) fps", flat) or re.search(r"(\d+(?:\.\d+)?) tbr", flat)
    return VideoInfo(
        frames=0,
        width=int(size.group(1)),
        height=int(size.group(2)),
        fps=float(rate.group(1)) if rate else 0.0,
        codec=codec,
        pix_fmt=pix_fmt,
    )


def _tail(stderr: bytes, *, only_errors: bool = False) -> str:
    """The last lines of ffmpeg's stderr, joined into one line.

    With ``only_errors`` (for ``-loglevel level+...`` output), give the first lines tagged error
    or fatal instead (the first one names the cause; later ones are threads shutting down),
    falling back to the last lines when none are tagged.
    """
    lines = [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if only_errors:
        errors = [line for line in lines if "[error]" in line or "[fatal]" in line]
        if errors:
            return " | ".join(errors[:4])
    return " | ".join(lines[-_STDERR_TAIL_LINES:]) or "(no output)"
