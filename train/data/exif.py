"""EXIF orientation: a phone stores a portrait photo as landscape pixels plus an Orientation tag that every
viewer applies. Training applies it too (ImageOps.exif_transpose), or the photo would train sideways. Also what a
file that does not decode raises (IMAGE_ERRORS), for the readers of images, masks and control images."""

from __future__ import annotations

from PIL import Image, ImageOps, UnidentifiedImageError

# What PIL raises for a file it cannot (or must not) decode; DecompressionBombError (over twice
# Image.MAX_IMAGE_PIXELS, raised by Image.open from the header alone) is none of the others.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
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
