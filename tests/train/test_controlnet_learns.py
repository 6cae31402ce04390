"""A ControlNet trained by gen uses its hint: the direction check of bench/controlnet_learns.py (which measures the
IoU of the generated objects with the hint, with and without the ControlNet, on a base trained first; minutes).
Here, on the tiny SD folder and the shapes world at 32 px with each scene's mask as its hint: after a short run the
denoising loss on held-out scenes is lower with each scene's own hint than with another scene's (the same noise and
timesteps), where the untrained ControlNet (zero-initialised outputs) cannot tell them apart."""

import torch
from diffusers import ControlNetModel

from train.config import load_config
from train.controlnet import ControlNetTask
from train.data import TrainData, collate
from train.data.shapes import write_folder
from train.loop import train


def test_a_trained_controlnet_lowers_the_loss_with_the_right_hint_only(sd_folder, tmp_path):
    data = write_folder(tmp_path / "data", 32, size=32, control=True)
    held = write_folder(tmp_path / "held", 8, seed=1, size=32, control=True)
    keys = {"model.base": str(sd_folder), "data.path": str(data), "data.resolution": 32, "train.batch_size": 8,
            "train.max_steps": 24, "train.checkpoint_every": 0, "train.mixed_precision": "no", "optim.lr": 4e-3,
            "train.cond_dropout": 0.1, "train.output_dir": str(tmp_path / "run"), "validation.prompts": [],
            "log.tracker": "none", "log.progress": False}
    out = train(load_config("configs/controlnet-sd.yaml", extra=keys))
    cfg = load_config("configs/controlnet-sd.yaml", extra=keys | {"data.path": str(held)})
    task = ControlNetTask(cfg, torch.device("cpu"))
    rows = TrainData(cfg.data, 0, control=True)
    right = collate([rows[i, i] for i in range(8)])
    wrong = right | {"control": right["control"].roll(1, 0)}  # each scene with the next one's mask

    @torch.no_grad()
    def loss(batch) -> float:  # the same noise, timesteps and caption dropout for both batches
        return sum(float(task.loss(task.model, batch, torch.Generator().manual_seed(k))) for k in range(8)) / 8

    assert loss(right) == loss(wrong)  # the fresh ControlNet adds zeros whatever the hint
    before = loss(right)
    task.model.controlnet.load_state_dict(ControlNetModel.from_pretrained(out).state_dict())
    trained_right, trained_wrong = loss(right), loss(wrong)
    print(f"held-out loss: untrained {before:.5f}; trained, own hint {trained_right:.5f}, another's {trained_wrong:.5f}")
    assert trained_right < before
    assert trained_right < trained_wrong
