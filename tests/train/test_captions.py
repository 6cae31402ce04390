"""data.caption: tag shuffling with keep_tokens, tag dropout, prefix/suffix and per-epoch caption variants, drawn
from the stream position (so resume replays them), through a real image folder."""

import json

import numpy as np
import pytest
from PIL import Image

from gen.errors import GenError
from train import captions
from train.config import CaptionConfig, load_config
from train.data import TrainData

TAGS = "sks dog, red collar, grass, sunny, park, running, ball, tree"


def draws(text, n=200, **options):
    c = CaptionConfig(**options)
    return [captions.augment(text, c, np.random.default_rng([0, pos, 1])) for pos in range(n)]


def test_keep_tokens_stay_first_and_the_rest_is_shuffled():
    out = draws(TAGS, shuffle=True, keep_tokens=2)
    tags = TAGS.split(", ")
    assert all(o.split(", ")[:2] == tags[:2] for o in out)
    assert all(sorted(o.split(", ")) == sorted(tags) for o in out)  # nothing lost
    assert len({o for o in out}) > 50  # 6! orders of the rest: many distinct
    assert {o.split(", ")[2] for o in out} == set(tags[2:])  # every free tag comes third at some point


def test_tag_dropout_drops_free_tags_at_the_rate_and_never_kept_ones():
    out = draws(TAGS, n=400, tag_dropout=0.25, keep_tokens=1)
    kept = [o.split(", ") for o in out]
    assert all(k[0] == "sks dog" for k in kept)
    assert all(k[1:] == [t for t in TAGS.split(", ")[1:] if t in k[1:]] for k in kept)  # order kept: no shuffle
    rate = 1 - np.mean([len(k) - 1 for k in kept]) / 7
    assert 0.2 < rate < 0.3


def test_prefix_suffix_and_defaults():
    assert draws(TAGS, n=1, prefix="photo of ", suffix=", 4k") == [f"photo of {TAGS}, 4k"]
    assert draws("a  line\nanother", n=1) == ["a  line\nanother"]  # no option: the caption as read
    assert not captions.active(CaptionConfig()) and captions.fingerprint(CaptionConfig()) == {}


@pytest.fixture()
def folder(tmp_path):
    """Three images with .txt sidecars; image 0 has three caption variants (one a line)."""
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}" if i else "first, a\n\nsecond, b\nthird, c\n")
    return tmp_path


def data(folder, **caption):
    cfg = load_config(None, extra={"model.base": "unused", "data.path": str(folder), "data.resolution": 16,
                                   **{f"data.caption.{k}": v for k, v in caption.items()}})
    return TrainData(cfg.data, seed=5)


def test_variants_are_drawn_per_position_and_replay_on_resume(folder):
    d = data(folder, variants=True, prefix="x, ")
    texts = [d[0, pos]["text"] for pos in range(0, 60, 3)]  # item 0 at 20 positions (epochs)
    assert set(texts) == {"x, first, a", "x, second, b", "x, third, c"}
    again = data(folder, variants=True, prefix="x, ")  # a resumed run builds its data anew
    assert [again[0, pos]["text"] for pos in range(0, 60, 3)] == texts
    assert d[1, 7]["text"] == "x, image 1"
    # the crop/flip stream is untouched by caption draws
    plain = data(folder)
    assert all(np.array_equal(plain[0, p]["pixel_values"], d[0, p]["pixel_values"]) for p in range(4))


def test_metadata_lists_are_variants(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["one", "two"]}) + "\n")
    assert {data(tmp_path, variants=True)[0, p]["text"] for p in range(30)} == {"one", "two"}


def test_caption_options_join_the_resume_fingerprint(folder):
    assert data(folder).fingerprint() != data(folder, shuffle=True).fingerprint()
    assert "caption" not in data(folder).fingerprint()


@pytest.mark.parametrize("key, value, message", [
    ("tag_dropout", 1.0, "data.caption.tag_dropout"), ("keep_tokens", -1, "data.caption.keep_tokens"),
    ("shuffel", True, "unknown config key 'data.caption.shuffel'")])
def test_bad_caption_options_name_the_key(folder, key, value, message):
    with pytest.raises(GenError, match=message):
        data(folder, **{key: value})


def test_a_cache_refuses_caption_options(folder):
    cfg = load_config(None, extra={"model.base": "unused", "data.path": str(folder), "data.cache": True,
                                   "data.caption.shuffle": True})
    with pytest.raises(GenError, match="data.caption"):
        TrainData(cfg.data, 0)
