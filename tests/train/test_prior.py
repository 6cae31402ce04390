"""DreamBooth prior preservation: class images sampled by the base model with gen (cached, reused on resume),
mixed into every batch with their own loss weight; exact resume with it on."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gen.errors import GenError
from gen.pipeline import Pipeline
from tests.train.test_lora_train import images  # noqa: F401 - the subject photos fixture
from train.config import load_config
from train.data import TrainData
from train.loop import train
from train.lora import LoraTask
from train.prior import PriorData, generate

CLASS = "a photo of a dog"


def config(base, images, out, **more):
    return load_config(None, extra={
        "model.base": str(base), "data.path": str(images), "data.resolution": 16, "train.output_dir": str(out),
        "train.batch_size": 2, "train.max_steps": 2, "train.checkpoint_every": 1, "train.ema_decay": 0.0,
        "optim.lr": 1e-2, "lora.rank": 4, "lora.instance_prompt": "a photo of sks dog", "lora.class_prompt": CLASS,
        "lora.num_class_images": 3, "lora.prior_loss_weight": 0.5, "sampling.steps": 2, "validation.prompts": [],
        "log.tracker": "none", "log.progress": False, **more})


def test_class_images_are_gens_samples_mixed_with_their_weight_and_resume_exactly(sd_folder, images, tmp_path):
    train(config(sd_folder, images, tmp_path / "straight"), LoraTask)
    folders = list((tmp_path / "straight" / "class-images").iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].glob("*.png")) == ["00000.png", "00001.png",
                                                                                      "00002.png"]
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.progress = False
    ours = pipe(CLASS, seed=1, height=16, width=16, num_inference_steps=2).images[0]  # image 1: seed train.seed + 1
    assert np.array_equal(np.asarray(ours), np.asarray(Image.open(folders[0] / "00001.png")))

    # a batch: the instance rows, then as many class rows weighted 0.5 through the loss mask
    cfg = config(sd_folder, images, tmp_path / "straight")
    instance = TrainData(cfg.data, cfg.train.seed)
    data = PriorData(instance, TrainData(load_config(None, extra={"model.base": "x", "data.path": str(folders[0]),
                                                                  "data.resolution": 16}).data, 1), 0.5)
    batch = data.collate([data[0, 0], data[1, 1]])
    assert batch["prior"].tolist() == [False, False, True, True] and batch["text"][2:] == [CLASS, CLASS]
    assert batch["mask"][:2].eq(1).all() and batch["mask"][2:].eq(0.5).all()
    assert {data[0, p][1]["index"] for p in range(3)} == {0, 1, 2}  # each class image once per epoch

    # paused after step 1 and resumed: the class images are reused, the weights equal the straight run's
    split = config(sd_folder, images, tmp_path / "split")
    train(config(sd_folder, images, tmp_path / "split", **{"train.stop_at_step": 1}), LoraTask)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "split" / "class-images").rglob("*.png")}
    train(split, LoraTask)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for part in ("model", "optimizer"):
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-00000002" / f"{part}.safetensors"))
                for run in ("straight", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_an_interrupted_generation_continues(sd_folder, images, tmp_path):
    cfg = config(sd_folder, images, tmp_path)
    folder = generate(cfg)
    (folder / ".done.json").unlink()
    (folder / "00002.png").unlink()
    kept = (folder / "00000.png").stat().st_mtime_ns
    generate(cfg)
    assert (folder / "00002.png").is_file() and (folder / "00000.png").stat().st_mtime_ns == kept


def test_prior_errors_name_the_key(sd_folder, images, tmp_path):
    with pytest.raises(GenError, match="lora.class_prompt.*data.cache"):
        train(config(sd_folder, images, tmp_path, **{"data.cache": True, "lora.instance_prompt": ""}), LoraTask)
    with pytest.raises(GenError, match="lora.num_class_images"):
        config(sd_folder, images, tmp_path, **{"lora.num_class_images": 0})


def test_a_changed_num_class_images_changes_the_class_data(sd_folder, images, tmp_path):
    def class_data(n):
        cfg = config(sd_folder, images, tmp_path, **{"lora.num_class_images": n})
        folder = generate(cfg)
        return folder, TrainData(load_config(None, extra={"model.base": "x", "data.path": str(folder)}).data, 1)

    folder, data = class_data(3)
    assert len(data) == 3
    kept = (folder / "00000.png").stat().st_mtime_ns
    assert len(class_data(2)[1]) == 2  # fewer: the first two
    assert len(class_data(4)[1]) == 4  # more: one more sampled, the others reused
    assert (folder / "00003.png").is_file() and (folder / "00000.png").stat().st_mtime_ns == kept
