"""EXIF orientation: a phone stores a portrait photo as landscape pixels plus an Orientation tag that every
viewer applies. Training applies it too (ImageOps.exif_transpose), or the photo would train sideways."""

from __future__ import annotations

from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 5-8 turn by 90 degrees (width and height swap)


def orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # a malformed EXIF block: taken as upright
        return 1


def upright(im: Image.Image) -> Image.Image:
    """`im` as a viewer shows it: its EXIF orientation applied (itself when it has none)."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of `upright(im)`, from the header alone."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)
