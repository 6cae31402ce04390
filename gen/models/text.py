"""CLIP text encoder + tokenizer: prompts -> (hidden states, pooled embedding)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

log = logging.getLogger("gen")

# Small CLIP text towers (transformers CLIPTextConfig fields). "tiny" is for tests.
TEXT_PRESETS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=256),
}


def byte_level_tokenizer(merges: list[str] | None = None, vocab_extra: list[str] | None = None,
                         model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256 byte symbols (+ optional merges): needs no downloaded vocab."""
    from tokenizers import pre_tokenizers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for tok in vocab_extra or []:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges or []],
                         model_max_length=model_max_length)


BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"


def bundled_tokenizer(name: str, pad_token: str | None = None):
    """The CLIP ("clip") or T5 ("t5") tokenizer shipped with gen (gen/assets/tokenizers/, README and licenses
    there), for a model file that carries none. `pad_token`: "!" (id 0) for OpenCLIP's towers (SD-2.x's H, the
    bigG of SDXL and SD3), which pad with it as open_clip does; OpenAI's CLIP-L pads with end-of-text."""
    from transformers import T5TokenizerFast

    if name == "t5":
        return T5TokenizerFast.from_pretrained(BUNDLED / "t5")
    return CLIPTokenizer.from_pretrained(BUNDLED / "clip", **({"pad_token": pad_token} if pad_token else {}))


def build_text_encoder(preset: str = "tiny", vocab_size: int = 514, **overrides) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder from a named preset."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; choose from {sorted(TEXT_PRESETS)}")
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         **{**TEXT_PRESETS[preset], **overrides})
    return CLIPTextModel(cfg)


class TextEncoder:
    """Tokenizes prompts and runs the CLIP text tower, as diffusers' Stable Diffusion pipeline does."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, grad: bool = False,
                 max_length: int | None = None):
        """grad: run the tower with gradients (a text encoder, or its LoRA, that trains); else without.
        max_length: the token length prompts are padded and truncated to (default: the tokenizer's and the
        model's limit; a T5 has no position limit, Flux pads it to 512)."""
        self.model = model
        self.tokenizer = tokenizer
        self.grad = grad
        self._max_length = max_length
        # None: one max_length sequence, as diffusers tokenizes (training); a gen.prompt_weights.Syntax: long,
        # weighted prompts as A1111 reads them (what Pipeline calls set)
        self.syntax = None
        self.vocab = None  # a call's textual-inversion embeddings (gen.embeddings), on the call's copy only

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        limit = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        return min(self.tokenizer.model_max_length, limit)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) token ids, padded and truncated to max_length; warns with any dropped text."""
        length = self.max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=length,
                             truncation=True, return_tensors="pt").input_ids
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            special = set(self.tokenizer.all_special_ids)
            for row in full.tolist():
                dropped = [i for i in row[length - 1:] if i not in special]
                if dropped:
                    text = self.tokenizer.decode(dropped)
                    log.warning("prompt is longer than %d tokens; %d tokens were dropped: %r", length,
                                len(dropped), text if len(text) <= 200 else f"{text[:95]} ... {text[-95:]}",
                                extra={"repeat": f"captions were cut to {length} tokens"})  # once per run in training
        return ids

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns hidden states (B, L, D) and the pooled embedding (B, D)."""
        out = self.outputs(prompts, hidden_states=False)
        return out.last_hidden_state, out.pooler_output

    def outputs(self, prompts: list[str], hidden_states: bool = True):
        """The tower's whole output for prompts, every layer's hidden states included (SDXL reads the
        penultimate one; a projection model's first output is its projected pooled embedding)."""
        from gen import prompt_weights as pw

        s = self.syntax
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            if s is not None and pw.is_clip(self.model):
                return pw.encode(self.model, self.tokenizer, prompts, s.weighting, s.min_chunks, s.clip_skip,
                                 hidden_states, self.max_length, self.vocab)
            if s is not None and s.weighting:  # a T5 reads the words only
                prompts = [pw.plain_text(p) for p in prompts]
            ids = self.tokenize(prompts).to(self.model.device)
            return self.model(ids, output_hidden_states=hidden_states)
