"""Loading and validating the conditioning image.

Every entry point (CLI path or URL, HTTP upload) ends in :func:`decode_image_bytes`, which
returns a fully decoded ``PIL.Image`` in mode ``RGB`` or raises :class:`InvalidImageError` /
:class:`ImageTooLargeError` with a one-line message that names the file and the problem.

Formats
    Only PNG, JPEG and WEBP are accepted (:data:`ALLOWED_FORMATS`). The format is detected from
    the bytes by Pillow, restricted to those three decoders; file names and Content-Type headers
    are never trusted. GIF, BMP, TIFF and HEIF/AVIF are recognised only to say so in the error
    message: SVD conditions on a single still frame, and a smaller decoder set is a smaller attack
    surface for untrusted uploads. Animated PNG/WEBP files contribute their first frame.

Limits
    :data:`MAX_IMAGE_BYTES` (10 MiB) of encoded data and :data:`MAX_IMAGE_PIXELS` (4096 x 4096 =
    16.7 MP). The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs a header parse. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``,
    89 MP warning, 179 MP error) is left untouched; its error is reported as
    :class:`ImageTooLargeError`, which also means a ``max_pixels`` above 179 MP has no effect.
    Truncated files are detected because this module relies on Pillow's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` (it never sets it).

Mode policy (applied by :func:`normalize_image`, after EXIF orientation)
    * ``RGB``: unchanged.
    * ``1``, ``L``, ``CMYK``, ``YCbCr``: converted to RGB (CMYK naively: ICC profiles are ignored,
      as they are for every mode).
    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grayscale) and ``I`` (32-bit integer,
      read as 16-bit data, which is what PNG produces): clipped to 0..65535 and scaled to 8 bits
      (``v * 255 / 65535``), then replicated to RGB.
    * ``F`` (32-bit float): read as 0.0..1.0, clipped, scaled to 8 bits, then RGB.
    * ``LA``, ``RGBA``, ``PA``, and ``P``/``L``/``RGB`` with a ``tRNS`` transparency key:
      composited over a white background, because SVD has no alpha channel and transparent
      pixels would otherwise show whatever colour the encoder left under them.
    * ``P`` without transparency: converted to RGB.
    * Anything else (``LAB``, ``HSV``, ``I;16`` with alpha, ...): rejected, naming the mode.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.errors import ImageTooLargeError, InvalidImageError
from pipelines.urls import redact_url

if TYPE_CHECKING:
    import httpx

#: Largest encoded image accepted, in bytes (10 MiB).
MAX_IMAGE_BYTES = 10 * 1024 * 1024
#: Largest image accepted, in pixels (4096 x 4096 = 16.7 MP), checked before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Pillow format names accepted, detected from the bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
#: Seconds allowed to connect, and between two received chunks, when fetching an image URL.
DEFAULT_FETCH_TIMEOUT = 10.0
#: Seconds allowed for a whole image download (guards against servers that trickle bytes).
DEFAULT_FETCH_TOTAL_TIMEOUT = 60.0

_ALLOWED_TEXT = "PNG, JPEG or WEBP"
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "RGBA", "PA")
_PLAIN_MODES = ("1", "L", "P", "CMYK", "YCbCr")
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")
# A broken EXIF block should not reject an image that decodes fine: orientation is then left as stored.
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, KeyError, IndexError, TypeError, struct.error)


# -- public API ------------------------------------------------------------------------------


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Load the conditioning image from a local path or raw bytes.

    Args:
        source: a file path (``str`` or ``os.PathLike``) or the encoded image as ``bytes``.
        max_bytes: largest accepted file size; default :data:`MAX_IMAGE_BYTES` (10 MiB).
        max_pixels: largest accepted width x height; default :data:`MAX_IMAGE_PIXELS` (16.7 MP).

    Returns:
        A fully loaded ``PIL.Image`` in mode ``RGB``, EXIF orientation applied.

    Raises:
        InvalidImageError: missing, unreadable, empty, not an image, truncated, unsupported
            format or mode, zero-size.
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), max_bytes=max_bytes, max_pixels=max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    path = Path(source)
    data = _read_file(path, max_bytes=max_bytes)
    return decode_image_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels, name=str(path))


def image_header_size(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, name: str = "image") -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded: a cheap check that may run before
    a request's quota is spent (the full decode comes later). Errors as :func:`decode_image_bytes`."""
    with _open(data, max_bytes=max_bytes, max_pixels=MAX_IMAGE_PIXELS, name=name) as image:
        return image.size


def _open(data: bytes, *, max_bytes: int, max_pixels: int, name: str) -> Image.Image:
    """The image opened (header and metadata read, no pixels), or the error its bytes deserve."""
    _check_limit("max_bytes", max_bytes)
    _check_limit("max_pixels", max_pixels)
    if len(data) == 0:
        raise InvalidImageError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name} is {_mib(len(data))}; the limit is {_mib(max_bytes)}")

    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard fired while parsing the header (> 2 x Image.MAX_IMAGE_PIXELS).
        raise ImageTooLargeError(
            f"{name} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; the limit is {max_pixels:,} pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(_unidentified_message(data, name)) from None
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        # Raised while the header and its metadata chunks are read, e.g. Pillow's own limit on a
        # compressed text or ICC chunk ("Decompressed Data Too Large"): the file is refused.
        raise InvalidImageError(f"{name} cannot be read: {_one_line(exc)}") from None


def decode_image_bytes(
    data: bytes,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    name: str = "image",
) -> Image.Image:
    """Decode an encoded PNG/JPEG/WEBP image into a loaded RGB ``PIL.Image``.

    Args:
        data: the encoded bytes, e.g. an HTTP upload.
        max_bytes: largest accepted ``len(data)``; default :data:`MAX_IMAGE_BYTES`.
        max_pixels: largest accepted width x height; default :data:`MAX_IMAGE_PIXELS`.
        name: how error messages refer to the image (a file name, a form field, a URL).

    Raises:
        InvalidImageError, ImageTooLargeError: see :func:`load_image`.
    """
    image = _open(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name)
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImageError(f"{name} has zero width or height ({width}x{height} pixels)")
        # Checked on the header's size, before load() decodes any pixel.
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels"
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidImageError(
                f"{name} is a truncated or corrupt {image.format} file ({_one_line(exc)})"
            ) from None
        result = normalize_image(image, name=name)
        # Leaving the with-block closes `image`, which also invalidates its pixels: never return it.
        return result.copy() if result is image else result


def normalize_image(image: Image.Image, *, name: str = "image") -> Image.Image:
    """Apply EXIF orientation and the module's mode policy; return a new RGB image.

    Useful for images that did not come through :func:`decode_image_bytes` (e.g. built in code).

    Raises:
        InvalidImageError: the mode is not one the policy accepts (the message names it).
    """
    try:
        oriented = ImageOps.exif_transpose(image)
    except _EXIF_ERRORS:
        oriented = image
    rgb = _to_rgb(oriented if oriented is not None else image, name=name)
    return rgb.copy() if rgb is image else rgb


def fetch_image_url(
    url: str,
    *,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    total_timeout: float = DEFAULT_FETCH_TOTAL_TIMEOUT,
    max_bytes: int = MAX_IMAGE_BYTES,
    client: "httpx.Client | None" = None,
) -> bytes:
    """Download an image over http(s) and return its bytes (not decoded, not validated).

    Args:
        url: an ``http://`` or ``https://`` URL. Redirects are followed (at most 5 without a
            ``client``).
        timeout: seconds allowed to connect and between received chunks; default 10.
        total_timeout: seconds allowed for the whole download; default 60.
        max_bytes: largest accepted body, counted after content decoding; default 10 MiB.
        client: an ``httpx.Client`` to send the request with (e.g. one whose transport refuses
            private addresses). It is not closed; ``pipelines.errors.SVDServeError``s that its
            transport raises pass through unchanged. Without one, a short-lived client is used.

    Raises:
        InvalidImageError: bad scheme, unreachable host, timeout, non-2xx status.
        ImageTooLargeError: the body is over ``max_bytes``.

    Error messages show the URL without its query string or credentials, which may be secret
    (e.g. a pre-signed URL).
    """
    import httpx  # Imported here: only URL sources need it.

    _check_limit("max_bytes", max_bytes)
    shown = redact_url(url)
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise InvalidImageError(f"image URL {shown} is not http:// or https://")

    own_client = client is None
    if client is None:
        client = httpx.Client(follow_redirects=True, max_redirects=5)
    deadline = time.monotonic() + total_timeout
    try:
        with client.stream("GET", url, timeout=httpx.Timeout(timeout)) as response:
            if not response.is_success:
                raise InvalidImageError(
                    f"fetching image URL {shown} failed: HTTP {response.status_code} {response.reason_phrase}".rstrip()
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLargeError(
                    f"image URL {shown} is {_mib(int(declared))}; the limit is {_mib(max_bytes)}"
                )
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise ImageTooLargeError(
                        f"image URL {shown} is larger than the limit of {_mib(max_bytes)}"
                    )
                if time.monotonic() > deadline:
                    raise InvalidImageError(
                        f"fetching image URL {shown} took longer than {total_timeout:g} s"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise InvalidImageError(f"fetching image URL {shown} timed out after {timeout:g} s") from None
    except httpx.TooManyRedirects:
        raise InvalidImageError(f"fetching image URL {shown} failed: too many redirects") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # connection refused, DNS failure, bad URL...
        raise InvalidImageError(
            f"could not fetch image URL {shown}: {_one_line(exc) or type(exc).__name__}"
        ) from None
    finally:
        if own_client:
            client.close()


def load_image_source(
    source: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> Image.Image:
    """Load an image from an ``http(s)://`` URL or a local path (the CLI's ``--image``).

    Any other ``scheme://`` (``ftp://``, ``file://``, ``s3://``...) is rejected rather than
    looked up as a relative path. Defaults as in :func:`load_image` and :func:`fetch_image_url`.
    """
    if isinstance(source, str) and "://" in source:
        scheme = source.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise InvalidImageError(
                f"image source {redact_url(source)} uses {scheme}://; give a local path or an http(s) URL"
            )
        data = fetch_image_url(source, timeout=timeout, max_bytes=max_bytes)
        return decode_image_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels, name=redact_url(source))
    return load_image(source, max_bytes=max_bytes, max_pixels=max_pixels)


# -- helpers -----------------------------------------------------------------------------------


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    _check_limit("max_bytes", max_bytes)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InvalidImageError(f"image file {path} does not exist") from None
    except OSError as exc:
        raise InvalidImageError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InvalidImageError(f"image file {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        # FIFOs and devices can block or never end.
        raise InvalidImageError(f"image file {path} is not a regular file")
    if info.st_size > max_bytes:
        raise ImageTooLargeError(f"image file {path} is {_mib(info.st_size)}; the limit is {_mib(max_bytes)}")
    try:
        with path.open("rb") as handle:
            # One byte over the limit, in case the file grew since stat().
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidImageError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    if not data:
        raise InvalidImageError(f"image file {path} is empty (0 bytes)")
    return data


def _to_rgb(image: Image.Image, *, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _16BIT_MODES or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        gray = np.rint(values * 255.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    raise InvalidImageError(
        f"{name} has unsupported pixel mode {mode!r} "
        "(supported: RGB, RGBA, L, LA, 1, P, PA, CMYK, YCbCr, I;16, I, F)"
    )


def _unidentified_message(data: bytes, name: str) -> str:
    kind = _sniff(data)
    if kind in ALLOWED_FORMATS:
        size = _header_size(data, kind)
        if size is not None and 0 in size:
            return f"{name} has zero width or height ({size[0]}x{size[1]} pixels)"
        return f"{name} looks like a {kind} file but its header is corrupt"
    if kind is not None:
        return f"{name} is a {kind} image; allowed formats are {_ALLOWED_TEXT}"
    return f"{name} is not an image (allowed formats: {_ALLOWED_TEXT})"


def _sniff(data: bytes) -> str | None:
    """Name the format from its signature; only used to word error messages."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    # "BM" alone would also match text; require a known DIB header size.
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF/AVIF"
    return None


def _header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) read straight from a PNG IHDR or JPEG SOF, for files Pillow refused."""
    if kind == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if kind == "JPEG":
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
                pos += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return width, height
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _check_limit(label: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB ({size:,} bytes)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
