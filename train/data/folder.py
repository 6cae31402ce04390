"""Image folders with captions: HF imagefolder `metadata.jsonl` (`file_name` + `text`, and `control` for
stage=controlnet) or kohya-style `.txt` sidecars. Unreadable files are skipped with one warning that names them;
loss masks (`NAME.mask.png`) and control images (`NAME.control.png`) are never training images themselves."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from PIL import Image

from gen.errors import GenError
from train.data import controls, exif, masks
from train.data.exif import IMAGE_ERRORS

log = logging.getLogger("gen")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA = "metadata.jsonl"


def _probe(path: Path) -> bool | None:
    """None when the file is not a readable image, else whether it carries a loss mask (train/data/masks.py)."""
    try:
        with Image.open(path) as im:
            im.verify()  # header + checksums; no full decode
            return masks.has_alpha(im) or masks.mask_file(path).is_file()
    except IMAGE_ERRORS:
        return None


def _caption(txt: Path, binary: list[str]) -> str | None:
    """A .txt sidecar's caption; None when there is none, "" (noted in `binary`) when it is not UTF-8 text."""
    if not txt.is_file():
        return None
    try:
        return txt.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        binary.append(txt.name)
        return ""


def _from_metadata(root: Path) -> tuple[list[tuple[Path, str]], list[str], dict[Path, Path]]:
    """(items, bad rows, each image's control image where its row has a `control` column)."""
    items, bad, given = [], [], {}
    for n, line in enumerate((root / METADATA).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row.get("text", "")  # a list: the caption's variants (data.caption.variants), one a line
            items.append((root / row["file_name"], "\n".join(map(str, text)) if isinstance(text, list) else str(text)))
            if row.get(controls.COLUMN):
                given[items[-1][0]] = root / row[controls.COLUMN]
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(f"{METADATA} line {n}")
    return items, bad, given


def _from_sidecars(root: Path) -> tuple[list[tuple[Path, str | None]], list[str], dict[Path, Path]]:
    items, bad, binary = [], [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts) or masks.is_mask_file(p) \
                or controls.is_control_file(p):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            txt = p.with_suffix(".txt")
            items.append((p, _caption(txt, binary)))
        elif p.suffix.lower() != ".txt":
            bad.append(str(p.relative_to(root)))
    if binary:
        log.warning("%d caption file(s) in %s are not UTF-8 text; their images train with the empty caption: %s",
                    len(binary), root, ", ".join(binary))
    return items, bad, {}


class ImageFolder:
    """(PIL image, caption) items of a folder, scanned once; unreadable files are left out. With `control`, each
    image's control image too (train/data/controls.py): one missing or unreadable is an error."""

    def __init__(self, path: str | Path, control: bool = False):
        root = Path(path)
        if not root.is_dir():
            raise GenError(f"config key 'data.path': image folder not found: {root}")
        items, bad, given = _from_metadata(root) if (root / METADATA).is_file() else _from_sidecars(root)
        good, masked = [], 0
        for p, text in items:
            probe = _probe(p) if p.is_file() else None
            if probe is not None:
                good.append((p, text))
                masked += probe
            else:
                bad.append(str(p.relative_to(root)) if p.is_relative_to(root) else str(p))
        if bad:
            log.warning("skipped %d unreadable or non-image file(s) in %s: %s", len(bad), root, ", ".join(bad))
        uncaptioned = sum(text is None for _, text in good)
        if uncaptioned:
            log.warning("%d images in %s have no caption (.txt sidecar); they train with the empty caption",
                        uncaptioned, root)
            good = [(p, text or "") for p, text in good]
        if not good:
            raise GenError(f"config key 'data.path': no readable images in {root} (expected images with a "
                           f"{METADATA} of file_name/text rows, or .txt caption sidecars)")
        self.root, self.items, self.failed, self.num_masked = root, good, set(), masked
        self.given = given  # metadata.jsonl's control column, by image path (gen data pack carries it)
        self.controls = controls.pair(root, good, given, _probe) if control else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        return self.load(i)[:2]

    def load(self, i: int, mask: bool = False, control: bool = False) -> tuple:
        """Item i (RGB image, caption, with `mask` its loss mask or None, with `control` its control image at the
        image's size); one that no longer decodes (changed or truncated since the scan) is replaced by the next that
        does, with one warning: the same files give the same substitutes, so resume stays exact."""
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            p, text = self.items[j]
            try:
                with Image.open(p) as im:
                    im = exif.upright(im)  # a phone photo's Orientation tag, as viewers apply it
                    hint = controls.read(self.controls[j], im.size) if control else None
                    return im.convert("RGB"), text, self._mask(p, im) if mask else None, hint
            except IMAGE_ERRORS as e:
                if p not in self.failed:
                    self.failed.add(p)
                    log.warning("cannot decode %s (%s); using the next image in its place", p, e)
        raise GenError(f"config key 'data.path': none of the images in {self.root} can be decoded any more")

    def _mask(self, p: Path, im: Image.Image) -> Image.Image | None:
        """The image's loss mask; a mask file that does not decode leaves the image unmasked, with one warning."""
        try:
            return masks.read(p, im)
        except IMAGE_ERRORS as e:
            bad = masks.mask_file(p)
            if bad not in self.failed:
                self.failed.add(bad)
                log.warning("cannot decode the mask %s (%s); its image trains unmasked", bad, e)
            return None

    def name(self, p: Path) -> str:
        """An item's name: its path under the folder (or as metadata.jsonl gave it, when absolute)."""
        return str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for p, text in self.items:
            h.update(f"{self.name(p)}\0{p.stat().st_size}\0{text}\n".encode())
        for c in self.controls or []:
            h.update(f"{self.name(c)}\0{c.stat().st_size}\n".encode())
        return {"source": "folder", "num_images": len(self.items), "sha256": h.hexdigest()[:16]}

    def stamp(self) -> str:
        """A digest of every image's (name, size, modification time): what a cache of its pixels depends on."""
        h = hashlib.sha256()
        for p in [p for p, _ in self.items] + (self.controls or []):
            st = p.stat()
            h.update(f"{self.name(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
