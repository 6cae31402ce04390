"""Latent/text caches: 2 processes build what 1 builds; a changed setting rebuilds, an unchanged one reuses;
training from the cache matches training without it and never runs the VAE or text encoder."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from gen.pipeline import Pipeline
from tests.train.conftest import checkpoint_tensors, fast_config, losses
from train.data import TrainData
from train.data.cache import build
from train.data.shapes import write_folder
from train.loop import train
from train.task import DenoiserTask


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-src")
    write_folder(root, 12, seed=2)
    return root


def cache_config(base, shapes, tmp_path, run="run", **kw):
    kw = {"data__cache": True, **kw}
    return fast_config(base, tmp_path / run, data__source="folder", data__path=str(shapes),
                       data__cache_dir=str(tmp_path / "cache"), train__batch_size=2, **kw)


def contents(folder):
    """{item: {tensor name: tensor}} plus the index rows (caption, size) of a cache folder."""
    index = json.loads((folder / "index.json").read_text())
    out, rows = {}, {}
    for name, rs in index["files"].items():
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                i, part = key.split(".", 1)
                out.setdefault(int(i), {})[part] = f.get_tensor(key)
        rows |= {i: (caption, size) for i, caption, size in rs}
    return out, rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_what_one_builds(shapes, base_dit, tmp_path):
    cfg = cache_config(base_dit, shapes, tmp_path, data__flip=True)
    pipe = Pipeline.from_pretrained(base_dit)
    one, built = build(cfg, TrainData(cfg.data, 0), pipe, progress=False)
    assert built
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    # docs/training.md's `accelerate launch --multi_gpu --num_processes 2 -m gen data cache`, on a machine without a
    # GPU: both processes of the launch build one cache (process 0 holds its lock; the other must not take it too).
    # (`ACCELERATE_USE_CPU=1 torchrun ...`, the page's other form, runs in tests/test_docs_run.py.) The same thread
    # count as here: CPU kernels may split sums by it.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(free_port()), "-m", "gen", "data", "cache",
                        str(tmp_path / "cfg.yaml"), f"data.cache_dir={tmp_path / 'cache2'}", "log.progress=false"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "cache2" / one.name  # the same key: same weights, data and settings
    assert {f.name[:9] for f in two.glob("*.safetensors")} == {"w002-r000", "w002-r001"}  # each wrote its part
    (a, rows_a), (b, rows_b) = contents(one), contents(two)
    assert rows_a == rows_b and sorted(a) == list(range(12))
    assert set(a[0]) == {"mean", "std", "flip.mean", "flip.std", "cond.hidden", "cond.pooled", "original_size",
                         "crop_top_left", "flip.crop_top_left"}
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]), (i, k, (a[i][k] - b[i][k]).abs().max())


def test_changed_settings_rebuild_and_unchanged_reuse(shapes, base_dit, tmp_path):
    pipe = Pipeline.from_pretrained(base_dit)

    def run(models=pipe, **kw):
        cfg = cache_config(base_dit, shapes, tmp_path, **kw)
        return build(cfg, TrainData(cfg.data, 0), models, progress=False)

    first, built = run()
    stamps = {f.name: f.stat().st_mtime_ns for f in first.iterdir()}
    again, rebuilt = run()
    assert built and not rebuilt and again == first
    assert stamps == {f.name: f.stat().st_mtime_ns for f in first.iterdir()}  # nothing rewritten
    folders = {first}
    for kw in ({"data__resolution": 24}, {"data__cache_latents": "mean"}):
        folder, built = run(**kw)
        assert built and folder not in folders, kw
        folders.add(folder)
    bf16 = Pipeline.from_pretrained(base_dit, dtype=torch.bfloat16)
    folder, built = run(bf16)
    assert built and folder not in folders and contents(folder)[0][0]["mean"].dtype == torch.bfloat16
    changed = Pipeline.from_pretrained(base_dit)
    with torch.no_grad():
        changed.vae.decoder.conv_out.bias.add_(1e-3)  # another VAE: even a decoder-only change counts
    folder, built = run(changed)
    assert built and folder not in folders


class CountingTask(DenoiserTask):
    """Counts forward calls of the frozen VAE encoder and text encoder after construction."""
    calls: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae.encoder.register_forward_hook(lambda *_: CountingTask.calls.append("vae"))
        self.text.model.register_forward_hook(lambda *_: CountingTask.calls.append("text"))


def test_cached_training_matches_uncached_and_skips_the_encoders(shapes, base_dit, tmp_path):
    kw = dict(data__flip=True, train__max_steps=3, train__checkpoint_every=0)
    train(cache_config(base_dit, shapes, tmp_path, "plain", **kw, data__cache=False))
    train(cache_config(base_dit, shapes, tmp_path, "first", **kw))  # builds the cache
    CountingTask.calls.clear()
    train(cache_config(base_dit, shapes, tmp_path, "cached", **kw), task_class=CountingTask)  # reuses it
    assert CountingTask.calls == []
    plain, cached = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert plain == pytest.approx(cached, rel=1e-4) and len(plain) == 3
    a, b = checkpoint_tensors(tmp_path / "plain", 3), checkpoint_tensors(tmp_path / "cached", 3)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_one_build_per_cache_folder(shapes, base_dit, tmp_path, caplog):
    """A cache folder another live process is building is refused, naming it; once that process is dead, its
    lock is taken over with a warning and the build runs."""
    import signal

    from gen.errors import GenError
    from train.data.cache import cache_folder, key_parts
    from train.lock import NAME

    cfg = cache_config(base_dit, shapes, tmp_path)
    pipe, data = Pipeline.from_pretrained(base_dit), TrainData(cfg.data, 0)
    folder = cache_folder(cfg, key_parts(data, pipe))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from train.lock import acquire; acquire(Path(sys.argv[1]), 'x'); print('held', "
                               "flush=True); time.sleep(600)", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GenError, match=f"the cache folder {folder} is in use by another run: process "
                                           f"{holder.pid} on {socket.gethostname()}"):
            build(cfg, data, pipe, progress=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING", logger="gen"):
        assert build(cfg, data, pipe, progress=False) == (folder, True)
    assert f"taking over the stale lock of process {holder.pid}" in caplog.text
    assert (folder / "index.json").is_file() and not (folder / NAME).exists()


def test_a_changed_image_of_the_same_size_rebuilds_the_cache(base_dit, tmp_path):
    """BMP files keep their byte size whatever their pixels: only the modification time tells the change."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "bmp"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.bmp")
        (root / f"{i}.txt").write_text("a red circle")
    cfg = cache_config(base_dit, root, tmp_path)
    pipe = Pipeline.from_pretrained(base_dit)
    first, _ = build(cfg, TrainData(cfg.data, 0), pipe, progress=False)
    before = (root / "0.bmp").stat()
    Image.fromarray(255 - np.asarray(Image.open(root / "0.bmp"))).save(root / "0.bmp")
    os.utime(root / "0.bmp", ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
    assert (root / "0.bmp").stat().st_size == before.st_size
    again, built = build(cfg, TrainData(cfg.data, 0), pipe, progress=False)
    assert built and again != first
    assert not torch.equal(contents(first)[0][0]["mean"], contents(again)[0][0]["mean"])
    assert build(cfg, TrainData(cfg.data, 0), pipe, progress=False) == (again, False)  # unchanged: reused


def test_a_stopped_build_stops_at_once_and_the_next_one_continues_it(shapes, base_dit, tmp_path):
    """12 images in units of 8 (4 batches of 2): a stop in the second unit keeps the first, which the next build
    reuses; the result equals an uninterrupted build."""
    import signal

    from gen.errors import Stopped

    cfg = cache_config(base_dit, shapes, tmp_path)
    pipe, data = Pipeline.from_pretrained(base_dit), TrainData(cfg.data, 0)
    asked = []

    def stop():  # Ctrl-C while the 11th image is read
        asked.append(1)
        return signal.SIGINT if len(asked) > 10 else None

    with pytest.raises(Stopped, match="stopped the cache build \\(SIGINT\\).*run the same command again") as e:
        build(cfg, data, pipe, progress=False, stop=stop)
    assert e.value.code == 130 and len(asked) == 12  # no image encoded after the signal
    kept = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache").rglob("*.safetensors")}
    assert len(kept) == 1
    folder, built = build(cfg, data, pipe, progress=False)
    assert built and {f: (folder / f).stat().st_mtime_ns for f in kept} == kept  # the finished part reused
    whole = cache_config(base_dit, shapes, tmp_path / "whole")
    straight, _ = build(whole, TrainData(whole.data, 0), pipe, progress=False)
    (a, rows_a), (b, rows_b) = contents(folder), contents(straight)
    assert rows_a == rows_b and sorted(a) == list(range(12))
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


class CtrlCTask(DenoiserTask):
    """Sends this process a real SIGINT when the VAE encodes the fifth batch of the cache build."""

    def __init__(self, *args, **kwargs):
        import signal

        super().__init__(*args, **kwargs)
        calls = []

        def hook(*_):
            calls.append(1)
            if len(calls) == 5:  # the first batch of the second unit
                os.kill(os.getpid(), signal.SIGINT)
        self.vae.encoder.register_forward_hook(hook)


def test_ctrl_c_during_the_cache_build_of_a_run_stops_it_and_the_rerun_continues(shapes, base_dit, tmp_path):
    from gen.errors import Stopped

    cfg = cache_config(base_dit, shapes, tmp_path, train__max_steps=2, train__checkpoint_every=0)
    with pytest.raises(Stopped, match="stopped the cache build \\(SIGINT\\)") as e:
        train(cfg, task_class=CtrlCTask)
    assert e.value.code == 130 and not list((tmp_path / "cache").rglob("index.json"))
    kept = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").rglob("*.safetensors")}
    assert len(kept) == 1  # the first unit (4 batches of 2)
    train(cfg)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept and len(losses(tmp_path / "run")) == 2
