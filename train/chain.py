"""Stages chained from one config into one model folder: clip -> vae -> denoiser.

    chain:                        # stage name -> its config (paths relative to this file)
      clip: default/clip.yaml
      vae: default/vae.yaml
      denoiser: default/dit.yaml
    output_dir: runs/default      # stage S trains in OUTPUT_DIR/S; the product is OUTPUT_DIR/denoiser/model

The denoiser stage gets model.text_encoder and model.vae from the earlier stages' outputs. Overrides
`STAGE:key=value` go to one stage, plain `key=value` to all. A stage whose output folder is complete is
skipped, so rerunning the command after a crash resumes the chain (each stage resumes by itself too); a
stage paused by train.stop_at_step ends the run there.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from gen.errors import GenError
from train.config import read_yaml

log = logging.getLogger("gen")

STAGES = ("clip", "vae", "denoiser")


def is_chain(path: str | Path) -> bool:
    return Path(path).is_file() and "chain" in read_yaml(path)


def _done(folder: Path) -> bool:
    return (folder / "stage.json").is_file() or (folder / "model_index.json").is_file()


def run_chain(path: str | Path, overrides: list[str]) -> Path:
    from train.config import load_config
    from train.loop import train

    path = Path(path)
    tree = read_yaml(path)
    unknown = sorted(set(tree) - {"chain", "output_dir"})
    if unknown:
        raise GenError(f"unknown key {unknown[0]!r} in chain config {path}; valid keys: chain, output_dir")
    chain = tree["chain"]
    if not isinstance(chain, dict) or not chain or set(chain) - set(STAGES):
        raise GenError(f"chain config {path}: 'chain' must map stage names ({', '.join(STAGES)}) to config files")
    per_stage: dict[str, list[str]] = {s: [] for s in chain}
    out = Path(tree.get("output_dir", "runs/chain"))
    for item in overrides:
        stage, sep, rest = item.partition(":")
        if item.startswith("output_dir="):
            out = Path(item.partition("=")[2])
        elif sep and "=" not in stage:
            if stage not in chain:
                raise GenError(f"override {item!r}: no stage {stage!r} in this chain ({', '.join(chain)})")
            per_stage[stage].append(rest)
        else:
            for s in chain:
                per_stage[s].append(item)
    outputs: dict[str, Path] = {}
    for stage in [s for s in STAGES if s in chain]:
        run_dir = out / stage
        extra = {"stage": stage, "train.output_dir": str(run_dir)}
        if stage == "denoiser":
            if "clip" in outputs:
                extra["model.text_encoder"] = str(outputs["clip"])
            if "vae" in outputs:
                extra["model.vae"] = str(outputs["vae"])
        cfg = load_config(path.parent / chain[stage], per_stage[stage], extra=extra)
        outputs[stage] = run_dir / "model"
        if _done(outputs[stage]):
            log.info("chain: stage %s is done (%s); delete that folder to train it again", stage, outputs[stage])
            continue
        log.info("chain: training stage %s in %s", stage, run_dir)
        paused = train(cfg)
        if not _done(outputs[stage]):  # train.stop_at_step: the later stages need this one's output
            log.info("chain: stage %s paused; run the chain again (past its train.stop_at_step) to resume", stage)
            return paused
    final = outputs.get("denoiser")
    if final is not None:
        for stage in ("clip", "vae"):  # the earlier stages' recipes and metrics travel with the model
            if stage in outputs and (outputs[stage] / "stage.json").is_file():
                shutil.copy(outputs[stage] / "stage.json", final / f"stage-{stage}.json")
        log.info("chain: model folder %s", final)
    return final or outputs[list(outputs)[-1]]


def stage_metrics(folder: str | Path) -> dict:
    """The metrics recorded by a stage's output folder."""
    return json.loads((Path(folder) / "stage.json").read_text()).get("metrics", {})
