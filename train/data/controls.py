"""Control images (stage=controlnet): the hint each training image is paired with, as diffusers' train_controlnet.py
pairs `image` and `conditioning_image` columns.

An image's control image is the metadata.jsonl row's `control` column (a path relative to the folder), else
`NAME.control.png` beside `NAME.EXT`. Every training image needs one: a missing or unreadable control image stops
the run before any model loads, naming the file. The hint is cropped and flipped with its image and goes to the
ControlNet as pixels in [0, 1] (what gen sample hands it).
"""

from __future__ import annotations

from pathlib import Path

from gen.errors import GenError

SUFFIX = ".control.png"
COLUMN = "control"  # metadata.jsonl's column


def control_file(image: Path) -> Path:
    """Where an image's control file would be: `a.jpg` -> `a.control.png`."""
    return image.with_name(image.stem + SUFFIX)


def is_control_file(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIX)


def pair(root: Path, items: list[tuple[Path, str]], given: dict[Path, Path], readable) -> list[Path]:
    """The control image of each item (`given`: metadata.jsonl's column, by image path), checked with `readable`."""
    out = []
    for p, _ in items:
        c = given.get(p) or control_file(p)
        where = f"{COLUMN!r} column in metadata.jsonl" if p in given else f"expected {c.name} beside it"
        name = p.relative_to(root) if p.is_relative_to(root) else p
        if not c.is_file():
            raise GenError(f"stage=controlnet: the training image {name} has no control image ({where}: {c} is "
                           "missing); add one for each image, or remove the image")
        if readable(c) is None:
            raise GenError(f"stage=controlnet: the control image {c} of {name} is not a readable image")
        out.append(c)
    return out


def read(source: Path | bytes | None, size: tuple[int, int] | None = None, name: str | None = None):
    """A control image (a file, or a shard member's bytes; None: a member that could not be read) as RGB at its
    training image's (width, height) (None: as it is); one line naming it (`name`, e.g. "of the sample KEY",
    else the path) if it does not decode."""
    import io

    from PIL import Image

    from train.data import exif

    name = name or source
    try:
        if source is None:
            raise OSError("unreadable member")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = exif.upright(im).convert("RGB")
    except exif.IMAGE_ERRORS as e:
        raise GenError(f"stage=controlnet: the control image {name} is not a readable image ({e})") from None
    return im if size is None or im.size == size else im.resize(size, Image.Resampling.BICUBIC)
