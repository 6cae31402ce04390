"""Each sampler on the bundled model at its usual step count, scored by the adherence eval (train/evaluate.py) beside
Euler's: a sampler that runs but draws noise, or steps wrongly, scores far below Euler and fails the check.

    python bench/sampler_quality.py [--steps 40] [--converge 100] [--n 1] [--prompts all|singles] [--margin 10]
                                    [--samplers ...]

Every sampler the model's formulation takes (gen sample --list-samplers), at --steps, guidance as the model's default
except the CFG++ samplers, whose scale is CFG++'s own (the model's / 12.5, A1111's mapping), each on the same prompts
and seeds. "objects" is the share of images whose every named object has the right colour and shape (all prompts);
"relation" the share of the pair prompts whose relation holds.

A sampler more than --margin points below Euler's objects score at --steps is run again at --converge steps: the
high-order multistep solvers (lms, ipndm, unipc, deis) are unstable on the stiff ODE that CFG 7 makes at 40 steps yet
converge to its solution with more; a sampler that steps wrongly or draws noise stays below at any count. The check
exits 1 naming each sampler below the margin at --converge too. LCM and TCD (DISTILLED) are scored but not judged:
LCM jumps to the denoised estimate and draws all-new noise each step, TCD renoises a fixed share (gamma 0.3) of each
step however small, so neither converges on a model not consistency-distilled (their correctness is the parity with
diffusers' LCMScheduler and TCDScheduler in the tests). Writes bench/results/sampler_quality_cpu.txt (--results DIR: elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CFG_PP_DIVISOR = 12.5  # A1111's DDIM CFG++ mapping of a CFG scale to CFG++'s (gen.sampling.names.A1111_CFG_DIVISOR)


def score(pipe, specs, sampler: str, steps: int, guidance: float, n: int) -> tuple[float, float, float]:
    """(objects %, relation %, seconds per image) of `sampler` on `specs`, n images each, seeds as the eval's."""
    import numpy as np

    from train.evaluate import score_image

    rows, t = [], time.perf_counter()
    for i, spec in enumerate(specs):
        out = pipe(spec.prompt, num_images_per_prompt=n, seed=i * n, output_type="np", sampler=sampler,
                   num_inference_steps=steps, guidance_scale=guidance)
        rows += [score_image(img, spec) for img in (out.images * 255).round().astype(np.uint8)]
    seconds = (time.perf_counter() - t) / len(rows)
    pairs = [r for r in rows if "relation_right" in r]
    objects = 100.0 * sum(r["objects_right"] for r in rows) / len(rows)
    relation = 100.0 * sum(r["relation_right"] for r in pairs) / len(pairs) if pairs else float("nan")
    return objects, relation, seconds


DISTILLED = {"lcm", "tcd"}  # samplers for consistency-distilled models only: scored, not judged on a plain model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the bundled model)")
    ap.add_argument("--steps", type=int, default=40, help="sampling steps")
    ap.add_argument("--converge", type=int, default=100, help="steps of the second run of a sampler below the margin")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--prompts", choices=("all", "singles"), default="all", help="singles: the one-object prompts")
    ap.add_argument("--margin", type=float, default=10.0, help="points below Euler's objects score that fail")
    ap.add_argument("--samplers", nargs="*", default=None, help="these only (Euler is always run)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    import torch

    from gen import Pipeline
    from gen.sampling.names import SAMPLERS
    from train.evaluate import prompt_set

    pipe = Pipeline.from_pretrained(args.model)
    pipe.progress = False
    kind = pipe.formulation.kind
    guidance = pipe.defaults["guidance"]
    specs = [s for s in prompt_set() if args.prompts == "all" or len(s.kinds) == 1]
    names = [s.name for s in SAMPLERS if kind in s.kinds and (args.samplers is None or s.name in args.samplers)]
    names = ["euler"] + [n for n in names if n != "euler"]
    lines = [f"sampler quality: {pipe.name}, {kind} model, {len(specs)} prompts x {args.n}, {args.steps} steps "
             f"(below the margin: again at {args.converge}), guidance {guidance:g} (CFG++: "
             f"{guidance / CFG_PP_DIVISOR:g}), margin {args.margin:g} points below Euler",
             f"{'sampler':28s} {'steps':>5s} {'objects %':>9s} {'relation %':>10s} {'s/image':>8s}"]
    print("\n".join(lines), flush=True)

    def run(name, steps):
        scale = guidance / CFG_PP_DIVISOR if name.endswith("cfg++") else guidance
        with torch.inference_mode():
            objects, relation, seconds = score(pipe, specs, name, steps, scale, args.n)
        lines.append(f"{name:28s} {steps:5d} {objects:9.1f} {relation:10.1f} {seconds:8.3f}"
                     + ("  (distilled models only: not judged)" if name in DISTILLED else ""))
        print(lines[-1], flush=True)
        return objects

    results = {name: run(name, args.steps) for name in names}
    floor = results["euler"] - args.margin
    unstable = [n for n, objects in results.items() if objects < floor and n not in DISTILLED]
    again = args.converge > args.steps
    failed = [n for n in unstable if run(n, args.converge) < floor] if again else unstable
    lines.append(f"below {floor:.1f}% (Euler's {results['euler']:.1f} - {args.margin:g}) at {args.steps} steps: "
                 + (", ".join(unstable) or "none") + f"; at {args.converge} too: " + (", ".join(failed) or "none"))
    print(lines[-1])
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_quality_cpu.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
