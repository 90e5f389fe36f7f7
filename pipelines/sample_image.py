"""The committed sample conditioning image, and the code that draws it.

``pipelines/assets/sample.png`` is a 512x288 (16:9) landscape drawn with Pillow: a sky gradient,
a sun, clouds, two rows of hills, a lake and a house with a smoking chimney, i.e. things a video
model can plausibly animate. Drawing is deterministic (no randomness, no fonts), so the committed
file can be checked against :func:`draw_sample_image` and regenerated with::

    python -m pipelines.sample_image pipelines/assets/sample.png
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw

#: Size of the sample image (width, height): 16:9, like SVD-XT's 1024x576.
SAMPLE_SIZE = (512, 288)
#: Path of the committed sample image inside the installed package.
SAMPLE_IMAGE_PATH = Path(str(resources.files("pipelines").joinpath("assets", "sample.png")))


def _lerp(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, ...]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def draw_sample_image() -> Image.Image:
    """Draw the sample landscape (RGB, :data:`SAMPLE_SIZE`); the same pixels on every call."""
    width, height = SAMPLE_SIZE
    horizon = 170
    image = Image.new("RGB", SAMPLE_SIZE)
    draw = ImageDraw.Draw(image)

    # Sky: deep blue at the top to a warm haze at the horizon (one colour per row keeps PNG small).
    for y in range(horizon):
        draw.line([(0, y), (width, y)], fill=_lerp((38, 84, 160), (250, 200, 150), y / horizon))

    # Sun with a soft halo.
    sun_x, sun_y = 380, 92
    for radius, colour in ((44, (252, 214, 160)), (34, (253, 226, 150)), (26, (255, 240, 170))):
        draw.ellipse([sun_x - radius, sun_y - radius, sun_x + radius, sun_y + radius], fill=colour)

    # Clouds: overlapping ellipses.
    for cx, cy in ((110, 60), (250, 40)):
        for dx, dy, rx, ry in ((-30, 6, 28, 14), (0, 0, 34, 18), (32, 6, 28, 13)):
            draw.ellipse([cx + dx - rx, cy + dy - ry, cx + dx + rx, cy + dy + ry], fill=(246, 242, 238))

    # Far hills, then near hills, as polygons.
    draw.polygon(
        [(0, 150), (70, 118), (150, 142), (240, 108), (330, 140), (420, 116), (512, 138), (512, 200), (0, 200)],
        fill=(96, 128, 150),
    )
    draw.polygon(
        [(0, 176), (90, 150), (190, 172), (300, 146), (400, 170), (512, 156), (512, 230), (0, 230)],
        fill=(70, 130, 70),
    )

    # Lake in the foreground, with a few ripple lines and the sun's reflection.
    draw.rectangle([0, 222, width, height], fill=(58, 104, 150))
    for y, x0, x1 in ((236, 60, 150), (250, 200, 320), (266, 40, 120), (274, 330, 460)):
        draw.line([(x0, y), (x1, y)], fill=(110, 150, 190), width=2)
    for i, y in enumerate(range(228, 286, 8)):
        half = 22 - 3 * i
        draw.line([(sun_x - half, y), (sun_x + half, y)], fill=(240, 210, 150), width=2)

    # Grass bank between hills and lake.
    draw.rectangle([0, 200, width, 222], fill=(84, 150, 72))

    # House: walls, roof, door, window, chimney and smoke.
    draw.rectangle([140, 160, 220, 214], fill=(214, 180, 140))
    draw.polygon([(130, 162), (180, 126), (230, 162)], fill=(150, 60, 48))
    draw.rectangle([196, 132, 208, 152], fill=(120, 70, 60))
    draw.rectangle([172, 184, 188, 214], fill=(100, 64, 40))
    draw.rectangle([150, 172, 166, 186], fill=(255, 236, 150))
    draw.rectangle([196, 172, 212, 186], fill=(255, 236, 150))
    for i, (dx, dy, r) in enumerate(((0, -6, 5), (6, -16, 7), (14, -28, 9))):
        grey = 220 - 10 * i
        draw.ellipse([202 + dx - r, 130 + dy - r, 202 + dx + r, 130 + dy + r], fill=(grey, grey, grey))

    # A tree beside the house.
    draw.rectangle([252, 180, 258, 212], fill=(90, 60, 36))
    draw.ellipse([236, 146, 274, 190], fill=(46, 104, 50))
    return image


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.sample_image OUT.png``: write the sample image as PNG."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.sample_image", description=main.__doc__)
    parser.add_argument("out", type=Path, help="where to write the PNG, e.g. pipelines/assets/sample.png")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_sample_image().save(args.out, format="PNG", optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
