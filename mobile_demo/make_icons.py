"""python mobile_demo/make_icons.py

Writes the web app's icons into mobile_demo/icons/ (committed; rerun after changing the drawing):
a decoded-looking "7" (a 28x28 grayscale digit, as the model outputs, shown with its pixels) on
the app's dark background. icon-192.png and icon-512.png for the web app manifest,
icon-maskable-512.png with the digit inside the safe zone (the middle 80%) for launchers that crop
icons to a circle or a squircle, apple-touch-icon.png (180x180) for iOS home screens.
Pillow only; the same bytes on every run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

ICONS = Path(__file__).resolve().parent / "icons"
BACKGROUND = (16, 18, 22)  # #101216, the page's background and theme colour
ACCENT = (124, 180, 255)  # #7cb4ff, the page's accent: a thin frame around the digit
SIZES = {"icon-192.png": (192, 0.78), "icon-512.png": (512, 0.78),
         "icon-maskable-512.png": (512, 0.6), "apple-touch-icon.png": (180, 0.74)}


def digit() -> Image.Image:
    """A 28x28 grayscale "7": two strokes on a 4x canvas, blurred, area-averaged down, its
    brightest pixel white."""
    big = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(big)
    draw.line([(30, 28), (82, 26), (50, 90)], fill=255, width=11, joint="curve")
    draw.line([(44, 58), (74, 57)], fill=200, width=8)
    return ImageOps.autocontrast(big.filter(ImageFilter.GaussianBlur(5)).resize((28, 28), Image.Resampling.BOX))


def icon(size: int, fill: float) -> Image.Image:
    """The digit's pixels scaled to `fill` of the icon's width, centred on the background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    side = int(size * fill) // 28 * 28  # whole pixels per digit pixel: crisp squares
    pixels = digit().resize((side, side), Image.Resampling.NEAREST).convert("RGB")
    offset = (size - side) // 2
    frame = max(2, size // 96)
    ImageDraw.Draw(image).rectangle([offset - 2 * frame, offset - 2 * frame, offset + side + 2 * frame - 1,
                                     offset + side + 2 * frame - 1], outline=ACCENT, width=frame)
    image.paste(pixels, (offset, offset))
    return image


def main() -> None:
    ICONS.mkdir(exist_ok=True)
    for name, (size, fill) in SIZES.items():
        icon(size, fill).save(ICONS / name, format="PNG", optimize=True)
        print(f"make_icons: wrote {ICONS / name} ({size}x{size})")


if __name__ == "__main__":
    main()
