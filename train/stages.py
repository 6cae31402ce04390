"""The `vae` and `clip` stages: the other two parts of a latent text-to-image model, trained from scratch
through the same loop (train/loop.py) as the denoiser. Each is a task with the surface of train/task.py,
plus `metrics(model)` (held-out quality, logged at every validation) and `grid_cols`.

    vae:  AutoencoderKL, reconstruction (L1/MSE) + KL (Kingma & Welling 2014; Rombach et al. 2022);
          reports held-out PSNR; sets the latent scaling (and shift) factor from the data at export.
    clip: CLIPModel, symmetric contrastive loss (Radford et al. 2021) with captions that repeat in a batch
          counted as positives; a BPE tokenizer trained on the captions when none is given; reports
          text->image top-1 retrieval on held-out pairs; exports the text tower and tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gen.errors import GenError
from gen.models import vae as vae_lib
from train.config import Config
from train.data import build_source, transform
from train.data.shards import Shards, decode

log = logging.getLogger("gen")


def holdout(cfg: Config, n: int) -> tuple[torch.Tensor, list[str]]:
    """`n` held-out (pixels (n, 3, R, R) in [-1, 1], captions): the shapes world with another seed, or
    (for a folder or shards, with a warning) the last `n` training images."""
    from train.data.shapes import ShapesWorld

    d = cfg.data
    if d.source == "shapes":
        source = ShapesWorld(n, d.seed + 1_000_003)
    else:
        source = build_source(d)
        log.warning("data.source=%s has no held-out split: evaluating on the last %d training images", d.source, n)
    rng = np.random.default_rng(0)
    items = list(_pairs(source, max(0, len(source) - n)))
    pixels = torch.stack([transform(img, d.resolution, "center", False, rng) for img, _ in items])
    return pixels, [text for _, text in items]


def _pairs(source, lo: int):
    """(image, caption) of a source's items from `lo` on; shards are read in order (corrupt samples skipped)."""
    if not isinstance(source, Shards):
        yield from (source[i] for i in range(lo, len(source)))
        return
    for j in range(len(source.urls)):
        if source.offsets[j + 1] > lo:
            for _, name, data, text in source.read(j, max(0, lo - source.offsets[j])):
                img = decode(data, name)
                if img is not None:
                    yield img, text or ""


def through_forward(model: nn.Module, fn, *args):
    """fn(module, *args) run as the forward of `model`: through its DDP wrapper when it has one (accelerate's under
    several processes), whose forward prepares the gradient all-reduce; methods called on the bare module (encode,
    get_image_features) would skip it, and on the wrapper they do not exist."""
    inner = getattr(model, "module", None)
    if inner is None:
        return fn(model, *args)
    saved = inner.__dict__.get("forward")  # accelerate's autocast wrapper, when it set one
    inner.forward = lambda *a: fn(inner, *a)
    try:
        return model(*args)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def _save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


# ---- vae -------------------------------------------------------------------------------------------
class VAETask:
    """An AutoencoderKL trained from scratch on the run's images."""

    grid_cols = 8

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        self.cfg, self.device = cfg, device
        v = cfg.vae
        try:
            self.model = vae_lib.build_vae(v.preset, sample_size=cfg.data.resolution, **v.options).to(device)
        except (ValueError, TypeError) as e:
            raise GenError(f"config key 'vae.preset' / 'vae.options': {e}") from None
        f = vae_lib.scale_factor(self.model)
        if cfg.data.resolution % f:
            raise GenError(f"config key 'data.resolution': {cfg.data.resolution} is not a multiple of the "
                           f"VAE factor {f}")
        self.eval_pixels, _ = holdout(cfg, v.eval_images)

    def fingerprint(self) -> dict:
        return {"vae": {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}}

    def loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        return through_forward(model, self._loss, batch, g)

    def _loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        x = batch["pixel_values"].to(self.device)  # (N, 3, H, W) in [-1, 1]
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(self.device)
        rec = model.decode(z).sample.float()
        kind = self.cfg.vae.recon
        loss = rec.new_zeros(())
        if "l1" in kind:
            loss = loss + (rec - x).abs().mean()
        if "mse" in kind:
            loss = loss + (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()  # per pixel
        return loss + self.cfg.vae.kl_weight * kl

    @torch.no_grad()
    def _reconstruct(self, model: nn.Module, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
        outs = []
        for i in range(0, len(pixels), batch):
            x = pixels[i:i + batch].to(self.device, model.dtype)
            outs.append(model.decode(model.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict:
        """Held-out PSNR in dB, on images in [0, 1]."""
        rec = self._reconstruct(model, self.eval_pixels)
        mse = ((rec - self.eval_pixels) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        return {"psnr": float((10 * torch.log10(1 / mse)).mean())}

    @torch.no_grad()
    def validate(self, model: nn.Module) -> list:
        """Held-out originals (first row) over their reconstructions (second row)."""
        from PIL import Image

        x = self.eval_pixels[:self.grid_cols]
        rows = torch.cat([x, self._reconstruct(model, x)])
        arr = ((rows + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def latent_stats(self, model: nn.Module) -> tuple[float, float]:
        """Mean and std of posterior samples over the held-out images: the shift and 1/scale that make the
        model-space latents zero-mean and unit-variance (what SD's 0.18215 does for its VAE)."""
        g = torch.Generator().manual_seed(0)
        zs = [model.encode(self.eval_pixels[i:i + 64].to(self.device, model.dtype)).latent_dist.sample(g).float()
              for i in range(0, len(self.eval_pixels), 64)]
        z = torch.cat(zs)
        return float(z.mean()), float(z.std())

    def export(self, model: nn.Module, path, recipe: dict) -> None:
        path = Path(path)
        mean, std = self.latent_stats(model)
        model.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
        model.save_pretrained(path / "vae", safe_serialization=True)
        _save_json(path / "stage.json", {"stage": "vae", "metrics": self.metrics(model),
                                         "scaling_factor": 1.0 / std, "shift_factor": mean, "recipe": recipe})


# ---- clip ------------------------------------------------------------------------------------------
def captions_of(cfg: Config) -> list[str]:
    """Every caption of the training data (the shapes world's without rendering its images)."""
    from train.data.shapes import ShapesWorld

    source = build_source(cfg.data)
    if isinstance(source, ShapesWorld):
        return [source.scene(i).caption for i in range(len(source))]
    if isinstance(source, Shards):
        return [text or "" for j in range(len(source.urls)) for _, _, _, text in source.read(j)]
    return [source[i][1] for i in range(len(source))]


def train_tokenizer(captions: list[str], vocab_size: int):
    """A CLIP BPE tokenizer learned on the captions over the byte alphabet, so any text still tokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from gen.models.text import byte_level_tokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator((c.lower() for c in captions), trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return byte_level_tokenizer(merges, vocab_extra=[m.replace(" ", "") for m in merges])


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, captions: list[str],
                     negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings (N, D); pairs with the same caption are all positives.
    `negatives` (M, D): false captions, extra columns of the image->text softmax only."""
    logits = scale * img @ txt.t()  # (N, N)
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions], device=img.device)
    same = (label[:, None] == label[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    i2t = logits if negatives is None else torch.cat([logits, scale * img @ negatives.t()], dim=1)
    i2t_target = F.pad(target, (0, i2t.shape[1] - logits.shape[1]))
    return 0.5 * (torch.sum(-i2t_target * F.log_softmax(i2t, dim=1), dim=1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean())


def false_captions(caption: str, groups: list[list[str]]) -> list[str]:
    """Captions made false by swapping words of `groups` (see CLIPStage.negative_words): the one word of a
    2-word group present becomes the other; two different words of a group present trade places."""
    words, out = caption.split(" "), []
    for group in groups:
        at = [k for k, w in enumerate(words) if w in group]
        if len(at) == 1 and len(group) == 2:
            w = list(words)
            w[at[0]] = group[1 - group.index(w[at[0]])]
            out.append(" ".join(w))
        elif len(at) == 2 and words[at[0]] != words[at[1]]:
            w = list(words)
            w[at[0]], w[at[1]] = w[at[1]], w[at[0]]
            out.append(" ".join(w))
    return [c for c in dict.fromkeys(out) if c != caption]


class CLIPTask:
    """A small CLIP: text tower (exported for the denoiser stage) and vision tower, trained contrastively."""

    grid_cols = 1

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype = torch.float32):
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        from gen.models.text import TEXT_PRESETS

        self.cfg, self.device = cfg, device
        c = cfg.clip
        if c.tokenizer:
            try:
                self.tokenizer = CLIPTokenizer.from_pretrained(c.tokenizer)
            except Exception as e:  # noqa: BLE001 - any unreadable folder is the user's to fix
                raise GenError(f"config key 'clip.tokenizer': cannot load a CLIP tokenizer from {c.tokenizer}: "
                               f"{str(e).splitlines()[0]}") from None
        else:
            self.tokenizer = train_tokenizer(captions_of(cfg), c.vocab_size)
        if c.text_preset not in TEXT_PRESETS:
            raise GenError(f"config key 'clip.text_preset': unknown preset {c.text_preset!r}; "
                           f"choose from {sorted(TEXT_PRESETS)}")
        text = {**TEXT_PRESETS[c.text_preset], **c.text_options, "vocab_size": len(self.tokenizer),
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        text.pop("projection_dim", None)
        vision = {"image_size": cfg.data.resolution, "num_channels": 3, **c.vision}
        try:
            config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)
            self.model = CLIPModel(config).to(device)
        except (ValueError, TypeError) as e:
            raise GenError(f"config key 'clip.text_options' / 'clip.vision': {e}") from None
        if c.reconstruct > 0:  # pooled text state -> every token at its position (not exported)
            t = self.model.config.text_config
            head = nn.Linear(t.hidden_size, t.max_position_embeddings * t.vocab_size)
            self.model.add_module("caption_head", head.to(device))
        self.eval_pixels, self.eval_captions = holdout(cfg, c.eval_images)

    def fingerprint(self) -> dict:
        return {"clip": self.model.config.to_diff_dict(), "vocab": len(self.tokenizer),
                **({"reconstruct": True} if self.cfg.clip.reconstruct > 0 else {})}

    def tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.model.config.text_config.max_position_embeddings,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def embed(self, model: nn.Module, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_features(model, pixels), self.text_features(model, captions)

    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        img = model.get_image_features(pixel_values=pixels.to(self.device))
        img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
        return F.normalize(img.float(), dim=-1)

    def text_features(self, model: nn.Module, captions: list[str]) -> torch.Tensor:
        return self.text_states(model, self.tokens(captions))[0]

    def text_states(self, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised projected text embeddings, the text tower's pooled states) of token ids."""
        pooled = model.text_model(input_ids=ids).pooler_output
        return F.normalize(model.text_projection(pooled).float(), dim=-1), pooled

    def caption_logits(self, model: nn.Module, ids: torch.Tensor, pooled: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V, L) logits of the caption head's prediction of each token from the pooled state, and the
        (N, L) targets: the ids after BOS up to and including the first EOS, -100 elsewhere."""
        N, L = ids.shape
        logits = model.caption_head(pooled.float()).view(N, L, -1).transpose(1, 2)
        first_eos = (ids == self.model.config.text_config.eos_token_id).int().argmax(dim=1, keepdim=True)
        pos = torch.arange(L, device=ids.device)[None]
        return logits, ids.masked_fill((pos == 0) | (pos > first_eos), -100)

    def loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        return through_forward(model, self._loss, batch, g)

    def _loss(self, model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        ids = self.tokens(batch["text"])
        img = self.image_features(model, batch["pixel_values"])
        txt, pooled = self.text_states(model, ids)
        scale = model.logit_scale.exp().clamp(max=100.0)
        falses = [f for c in batch["text"] for f in false_captions(c, self.cfg.clip.negative_words)]
        negatives = self.text_features(model, falses) if falses else None  # every image sees all of them
        loss = contrastive_loss(img, txt, scale, batch["text"], negatives)
        if self.cfg.clip.reconstruct > 0:
            loss = loss + self.cfg.clip.reconstruct * F.cross_entropy(*self.caption_logits(model, ids, pooled))
        return loss

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict:
        """Text->image top-1 retrieval over the held-out pairs: the best image for a caption is right when
        its own caption is that caption. Reported for all pairs and for single-object captions."""
        was = model.training
        model.eval()
        imgs, txts = [], []
        for i in range(0, len(self.eval_pixels), 128):
            a, b = self.embed(model, self.eval_pixels[i:i + 128], self.eval_captions[i:i + 128])
            imgs.append(a), txts.append(b)
        imgs, txts = torch.cat(imgs), torch.cat(txts)
        best = (txts @ imgs.t()).argmax(dim=1).tolist()
        right = [self.eval_captions[j] == c for j, c in zip(best, self.eval_captions)]
        single = [r for r, c in zip(right, self.eval_captions) if " and " not in c and not _has_relation(c)]
        out = {"retrieval_top1": 100.0 * float(np.mean(right)),
               "retrieval_top1_single": 100.0 * float(np.mean(single)) if single else math.nan}
        falses = [false_captions(c, self.cfg.clip.negative_words) for c in self.eval_captions]
        rows = [k for k, f in enumerate(falses) if f]
        if rows:  # the image scores its true caption above every false one (as in the ARO benchmark)
            wins = [float(imgs[k] @ txts[k]) > float((self.text_features(model, falses[k]) @ imgs[k]).max())
                    for k in rows]
            out["true_over_false"] = 100.0 * float(np.mean(wins))
        if hasattr(model, "caption_head"):  # held-out tokens the caption head gives back
            ids = self.tokens(self.eval_captions)
            logits, target = self.caption_logits(model, ids, self.text_states(model, ids)[1])
            keep = target != -100
            out["reconstruct_token_acc"] = 100.0 * float((logits.argmax(1) == target)[keep].float().mean())
        model.train(was)
        return out

    def validate(self, model: nn.Module) -> None:
        return None

    def export(self, model: nn.Module, path, recipe: dict) -> None:
        from transformers import CLIPTextModel

        path = Path(path)
        text = CLIPTextModel(model.config.text_config)
        text.load_state_dict(model.text_model.state_dict())  # the same module layout
        text.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        towers = {k: v for k, v in model.state_dict().items() if not k.startswith("caption_head.")}
        model.save_pretrained(path / "clip", state_dict=towers)  # both towers, e.g. for a CLIP score later
        _save_json(path / "stage.json", {"stage": "clip", "metrics": self.metrics(model), "recipe": recipe})


def _has_relation(caption: str) -> bool:
    from train.data.shapes import RELATIONS

    return any(f" {r} " in caption for r in RELATIONS)


def _controlnet_task(cfg, device, dtype):
    from train.controlnet import ControlNetTask  # imports train.lora (peft) only when a ControlNet trains

    return ControlNetTask(cfg, device, dtype)


TASKS = {"vae": VAETask, "clip": CLIPTask, "controlnet": _controlnet_task}
