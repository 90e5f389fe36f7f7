"""Tests for pipelines.images and pipelines.sample_image, on real files written to tmp_path."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import ImageTooLargeError, InvalidImageError
from pipelines.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    decode_image_bytes,
    fetch_image_url,
    load_image,
    load_image_source,
    normalize_image,
)
from pipelines.sample_image import SAMPLE_IMAGE_PATH, SAMPLE_SIZE, draw_sample_image, main as sample_main
from pipelines.urls import redact_url

# -- helpers -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_with_ihdr_size(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR is patched to claim another size, with a correct CRC."""
    data = bytearray(encode(Image.new("L", (4, 4), 128), "PNG"))
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def assert_one_line(error: BaseException, *needles: str) -> str:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    return message


# -- good inputs -------------------------------------------------------------------------------


def test_png_path_loads_as_loaded_rgb(tmp_path):
    original = noise_rgb()
    path = write(tmp_path, "in.png", encode(original, "PNG"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.array_equal(np.asarray(image), np.asarray(original))
    # Still usable: the decoder's file was closed, the returned pixels were not.
    assert image.getpixel((0, 0)) == original.getpixel((0, 0))


def test_str_path_and_bytes_give_the_same_image(tmp_path):
    data = encode(noise_rgb(seed=3), "PNG")
    path = write(tmp_path, "in.png", data)
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(load_image(data)))


def test_webp_loads(tmp_path):
    path = write(tmp_path, "in.webp", encode(Image.new("RGB", (32, 16), (10, 200, 30)), "WEBP", lossless=True))
    image = load_image(path)
    assert image.size == (32, 16) and image.getpixel((5, 5)) == (10, 200, 30)


def test_jpeg_with_png_name_is_sniffed_as_jpeg(tmp_path):
    path = write(tmp_path, "actually-a-jpeg.png", encode(Image.new("RGB", (40, 24), (200, 40, 40)), "JPEG"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 24)
    r, g, b = image.getpixel((20, 12))
    assert r > 180 and g < 70 and b < 70


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = write(tmp_path, "rotated.jpg", encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    r, _, b = loaded.getpixel((10, 3))  # the left strip is now at the top
    assert r > 200 and b < 60


# -- mode policy -------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = write(tmp_path, "cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 257 * 10]], dtype=np.uint16)
    path = write(tmp_path, "gray16.png", encode(Image.fromarray(values), "PNG"))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 10]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath)
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = write(tmp_path, "alpha.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert all(abs(int(v) - 127) <= 1 for v in pixels[0, 2])


@pytest.mark.parametrize("kind", ["LA", "P+tRNS", "L+tRNS"])
def test_other_alpha_modes_are_composited_on_white(tmp_path, kind):
    if kind == "LA":
        image, options = Image.new("LA", (4, 4), (0, 0)), {}
    elif kind == "P+tRNS":
        image = Image.new("P", (4, 4), 0)
        image.putpalette([0, 0, 0] * 256)
        options = {"transparency": 0}
    else:
        image, options = Image.new("L", (4, 4), 0), {"transparency": 0}
    path = write(tmp_path, "alpha.png", encode(image, "PNG", **options))
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]


def test_pa_mode_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert("PA")
    assert image.mode == "PA"
    assert np.asarray(normalize_image(image))[0, 0].tolist() == [255, 255, 255]


def test_grayscale_and_1bit_become_rgb(tmp_path):
    for mode, value in (("L", 77), ("1", 1)):
        path = write(tmp_path, f"{mode}.png", encode(Image.new(mode, (4, 4), value), "PNG"))
        image = load_image(path)
        assert image.mode == "RGB"
        expected = 77 if mode == "L" else 255
        assert image.getpixel((1, 1)) == (expected, expected, expected)


def test_normalize_image_scales_int32_and_float():
    as_int = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32), "I")
    assert np.asarray(normalize_image(as_int))[0, :, 0].tolist() == [0, 255, 255, 0]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0, 3.0]], dtype=np.float32), "F")
    assert np.asarray(normalize_image(as_float))[0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("mode", ["LAB", "HSV"])
def test_unusual_modes_are_rejected_by_name(mode):
    with pytest.raises(InvalidImageError) as info:
        normalize_image(Image.new(mode, (4, 4)), name="upload")
    assert_one_line(info.value, "upload", f"'{mode}'", "supported")


# -- bad inputs --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(tmp_path / "nope.png")
    assert_one_line(info.value, "nope.png", "does not exist")


def test_directory(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(tmp_path)
    assert_one_line(info.value, str(tmp_path), "directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "secret.png", encode(noise_rgb(), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(InvalidImageError) as info:
            load_image(path)
        assert_one_line(info.value, "secret.png", "permission denied")
    finally:
        path.chmod(0o600)


def test_fifo_is_not_a_regular_file(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    with pytest.raises(InvalidImageError) as info:
        load_image(path)  # would block forever if it were opened
    assert_one_line(info.value, "pipe.png", "not a regular file")


def test_empty_file_and_empty_bytes(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(write(tmp_path, "empty.png", b""))
    assert_one_line(info.value, "empty.png", "empty")
    with pytest.raises(InvalidImageError) as info:
        decode_image_bytes(b"", name="form field image")
    assert_one_line(info.value, "form field image", "empty")


def test_text_file_renamed_png(tmp_path):
    path = write(tmp_path, "notes.png", b"these are my notes, not a picture\n" * 20)
    with pytest.raises(InvalidImageError) as info:
        load_image(path)
    assert not isinstance(info.value, ImageTooLargeError)
    assert_one_line(info.value, "notes.png", "not an image", "PNG, JPEG or WEBP")


@pytest.mark.parametrize("fmt, label", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_rejected_naming_allowed_ones(tmp_path, fmt, label):
    path = write(tmp_path, "picture.png", encode(Image.new("RGB", (8, 8), (1, 2, 3)), fmt))
    with pytest.raises(InvalidImageError) as info:
        load_image(path)
    assert_one_line(info.value, "picture.png", f"is a {label} image", "PNG, JPEG or WEBP")


def test_png_header_with_corrupt_ihdr_crc(tmp_path):
    data = bytearray(encode(noise_rgb(), "PNG"))
    data[29] ^= 0xFF  # IHDR CRC
    with pytest.raises(InvalidImageError) as info:
        load_image(write(tmp_path, "badcrc.png", bytes(data)))
    assert_one_line(info.value, "badcrc.png", "PNG", "corrupt")


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_is_detected(tmp_path, fmt, suffix):
    data = encode(noise_rgb(128, 96), fmt)
    path = write(tmp_path, f"cut.{suffix}", data[: len(data) // 2])
    with pytest.raises(InvalidImageError) as info:
        load_image(path)
    assert_one_line(info.value, f"cut.{suffix}", "truncated", fmt)


def test_real_large_1bit_png_is_rejected_by_pixel_count(tmp_path):
    data = encode(Image.new("1", (5000, 4000)), "PNG")  # 20 MP, a few KB on disk
    assert len(data) < 100_000
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError) as info:
        load_image(write(tmp_path, "bomb.png", data))
    assert_one_line(info.value, "bomb.png", "5000x4000", f"{MAX_IMAGE_PIXELS:,}")
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The header claims 8000x8000 but holds 4x4 pixels of data: decoding would report a
    # truncated file, so ImageTooLargeError proves the size was checked first.
    with pytest.raises(ImageTooLargeError) as info:
        load_image(write(tmp_path, "liar.png", png_with_ihdr_size(8000, 8000)))
    assert_one_line(info.value, "8000x8000")


def test_pillow_decompression_bomb_error_becomes_image_too_large(tmp_path):
    with pytest.raises(ImageTooLargeError) as info:
        load_image(write(tmp_path, "huge.png", png_with_ihdr_size(50000, 50000)))
    assert_one_line(info.value, "huge.png", "pixels")


def test_custom_pixel_limit(tmp_path):
    path = write(tmp_path, "in.png", encode(noise_rgb(64, 48), "PNG"))
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_pixels=1000)
    assert_one_line(info.value, "64x48", "1,000")
    assert load_image(path, max_pixels=64 * 48).size == (64, 48)


def test_byte_limit_for_files_and_bytes(tmp_path):
    data = encode(noise_rgb(), "PNG")
    path = write(tmp_path, "big.png", data)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_bytes=1000)
    assert_one_line(info.value, "big.png", "MiB", "limit")
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_bytes=1000)
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(data, max_bytes=len(data) - 1)
    assert MAX_IMAGE_BYTES == 10 * 1024 * 1024


@pytest.mark.parametrize("width, height", [(0, 16), (16, 0)])
def test_zero_size_png(tmp_path, width, height):
    with pytest.raises(InvalidImageError) as info:
        load_image(write(tmp_path, "zero.png", png_with_ihdr_size(width, height)))
    assert_one_line(info.value, "zero.png", "zero width or height", f"{width}x{height}")


def test_zero_size_jpeg(tmp_path):
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 7 : sof + 9] = (0).to_bytes(2, "big")  # width
    with pytest.raises(InvalidImageError) as info:
        load_image(write(tmp_path, "zero.jpg", bytes(data)))
    assert_one_line(info.value, "zero.jpg", "zero width or height", "0x8")


def test_bad_limits_and_source_types():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image_bytes(b"x", max_pixels=0)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# -- URL fetching ------------------------------------------------------------------------------

PNG_BYTES = encode(noise_rgb(32, 32, seed=7), "PNG")


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/ok.png":
            self._reply(200, PNG_BYTES, "image/png")
        elif path == "/big.png":
            self._reply(200, b"\x89PNG" + b"\0" * 50_000, "image/png")
        elif path == "/big-unsized.png":
            # No Content-Length: only the streaming cap can stop it.
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"\0" * 1000)
        elif path == "/text.png":
            self._reply(200, b"<html>not an image</html>", "image/png")
        elif path == "/slow.png":
            time.sleep(1.5)
            self._reply(200, PNG_BYTES, "image/png")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._reply(404, b"not found", "text/plain")

    def _reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_success_and_redirect(server_url):
    assert fetch_image_url(f"{server_url}/ok.png") == PNG_BYTES
    assert fetch_image_url(f"{server_url}/redirect") == PNG_BYTES


def test_fetch_404_names_status_and_hides_query(server_url):
    with pytest.raises(InvalidImageError) as info:
        fetch_image_url(f"{server_url}/missing.png?X-Amz-Signature=secret123")
    message = assert_one_line(info.value, "HTTP 404", "/missing.png")
    assert "secret123" not in message


@pytest.mark.parametrize("path", ["/big.png", "/big-unsized.png"])
def test_fetch_oversize_body(server_url, path):
    with pytest.raises(ImageTooLargeError) as info:
        fetch_image_url(f"{server_url}{path}", max_bytes=10_000)
    assert_one_line(info.value, path, "limit")


def test_fetch_timeout(server_url):
    started = time.monotonic()
    with pytest.raises(InvalidImageError) as info:
        fetch_image_url(f"{server_url}/slow.png", timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert_one_line(info.value, "timed out")


def test_fetch_unreachable_host():
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(InvalidImageError) as info:
        fetch_image_url(f"http://127.0.0.1:{port}/x.png", timeout=2)
    assert_one_line(info.value, "could not fetch", f"127.0.0.1:{port}")


def test_fetch_rejects_other_schemes():
    with pytest.raises(InvalidImageError) as info:
        fetch_image_url("file:///etc/passwd")
    assert_one_line(info.value, "http:// or https://")


def test_fetch_with_caller_client(server_url):
    import httpx

    with httpx.Client() as client:
        assert fetch_image_url(f"{server_url}/ok.png", client=client) == PNG_BYTES
        assert not client.is_closed  # the caller's client is left open


def test_fetch_passes_checked_client_errors_through():
    import httpx

    from pipelines.errors import InvalidInputError

    def refuse(request):  # what a server-side transport that blocks private addresses would do
        raise InvalidInputError(f"image URL host {request.url.host} is not allowed")

    with httpx.Client(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(InvalidInputError, match="10.0.0.1 is not allowed"):
            fetch_image_url("http://10.0.0.1/a.png", client=client)


def test_load_image_source_dispatches(server_url, tmp_path):
    from_url = load_image_source(f"{server_url}/ok.png")
    from_path = load_image_source(str(write(tmp_path, "ok.png", PNG_BYTES)))
    assert from_url.mode == "RGB" and np.array_equal(np.asarray(from_url), np.asarray(from_path))
    with pytest.raises(InvalidImageError) as info:
        load_image_source(f"{server_url}/text.png")
    assert_one_line(info.value, "/text.png", "not an image")
    with pytest.raises(InvalidImageError) as info:
        load_image_source("ftp://example.com/a.png")
    assert_one_line(info.value, "ftp://", "local path or an http(s) URL")


def test_redact_url():
    """The one redaction (pipelines.urls) used by images, webhooks and the Redis clients."""
    assert redact_url("https://user:pw@host.example:8443/a/b.png?sig=1#f") == "https://host.example:8443/a/b.png"
    assert redact_url("http://[::1]:8080/hook?token=t") == "http://[::1]:8080/hook"
    # Redis URLs (RedisJobStore / RedisUsageLedger repr): never the password.
    assert redact_url("redis://:s3cret@redis.internal:6379/0") == "redis://redis.internal:6379/0"
    assert redact_url("rediss://user:s3cret@redis.internal/2?ssl_cert_reqs=none") == "rediss://redis.internal/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("unix://user:s3cret@/run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock"
    # Not a URL, or not parseable: shown without anything after ? or #, or not at all.
    assert redact_url("images/cat.png?x=1") == "images/cat.png"
    assert redact_url("http://[::1/") == "<invalid URL>"
    assert len(redact_url("https://h.example/" + "a" * 500)) == 200


# -- sample image ------------------------------------------------------------------------------


def test_sample_image_is_deterministic_and_matches_the_committed_file(tmp_path):
    drawn = draw_sample_image()
    assert drawn.mode == "RGB" and drawn.size == SAMPLE_SIZE == (512, 288)
    assert np.array_equal(np.asarray(drawn), np.asarray(draw_sample_image()))
    assert SAMPLE_IMAGE_PATH.is_file() and SAMPLE_IMAGE_PATH.stat().st_size < 100_000
    committed = load_image(SAMPLE_IMAGE_PATH)
    assert np.array_equal(np.asarray(committed), np.asarray(drawn)), "regenerate pipelines/assets/sample.png"
    # Not a flat picture: a video model needs something to animate.
    assert len(set(committed.getdata())) > 50


def test_sample_image_cli_writes_png(tmp_path, capsys):
    out = tmp_path / "sub" / "sample.png"
    sample_main([str(out)])
    assert str(out) in capsys.readouterr().out
    assert np.array_equal(np.asarray(load_image(out)), np.asarray(draw_sample_image()))
