"""Long and weighted prompts, as AUTOMATIC1111 reads them (modules/prompt_parser.py parse_prompt_attention,
modules/sd_hijack_clip.py) and ComfyUI does alike:

- `(word)` multiplies the weight of its tokens by 1.1, `[word]` by 1/1.1, `(word:1.3)` by 1.3; brackets nest and
  multiply; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters; an unclosed bracket closes at the end;
- the prompt's tokens are cut into chunks of 75 (a chunk that would end within 20 tokens after a comma ends at the
  comma instead), `BREAK` ends the current chunk there; each chunk is encoded as its own 77-token sequence
  (start token, 75 tokens padded with the end token, end token; after the first end token the tokenizer's pad
  token) and the chunks' hidden states are concatenated along the sequence;
- each token's hidden state is multiplied by its weight and the chunk is then rescaled to keep its mean.

Where gen differs: A1111 takes that mean over the whole batch of prompts, gen over each prompt's own chunk, and a
prompt is padded only to its own negative's chunks (empty-prompt chunks appended to the shorter, as A1111's "pad
prompt/negative prompt" option does; a negative that guidance does not use counts for nothing), never to other
prompts of the batch: a call runs each group of prompts of one chunk count on its own. So an image does not depend
on the prompts it is batched with (a batch of one prompt gives A1111's numbers). The pooled embedding is the first
chunk's. Only CLIP towers read the syntax; a T5 tower (SD3, Flux) gets the prompt's text without it (brackets
and weights removed, BREAK as a space), unweighted and cut at its own length, as A1111/Forge and ComfyUI's
defaults leave T5.
"""

from __future__ import annotations

import itertools
import re

import torch

from gen.errors import GenError

ROUND, SQUARE = 1.1, 1 / 1.1
LENGTH = 77  # a chunk's tokens with the start and end tokens (a tower with fewer positions takes its own)
COMMA_BACKTRACK = 20  # A1111's default "prompt word wrap length limit"

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes (a lone backslash is itself)
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|         # (text:weight)
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """A prompt -> [(text, weight)] runs, A1111's parse_prompt_attention: ("BREAK", -1) marks a chunk break."""
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in res[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(res))
        elif piece == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _weight(weight))
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for run in res[1:]:  # neighbouring runs of one weight become one
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _weight(weight: str) -> float:
    try:
        return float(weight)
    except ValueError:  # A1111's pattern takes any run of digits and dots, "1.2.3" too
        raise GenError(f"the prompt weight in (...:{weight}) is not a number; write it as (word:1.2), or write "
                       "\\( and \\) for literal brackets") from None


def plain_text(text: str) -> str:
    """The prompt's words without the syntax: what a T5 tower reads."""
    return "".join(" " if w == -1 else t for t, w in parse(text))


def chunks(tokenizer, text: str, weighting: bool = True, length: int = LENGTH,
           vocab=None) -> list[tuple[list[int], list[float]]]:
    """(token ids, weights) of each `length`-token chunk of a prompt, A1111's tokenize_line; weighting=False reads
    the prompt as plain text (A1111's emphasis "None"), still in chunks. `vocab`: a call's textual-inversion
    embeddings (gen.embeddings.Vocab), each kept whole in one chunk as A1111 keeps it."""
    chunk = length - 2
    runs = parse(text) if weighting else [(text, 1.0)]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [t for t, _ in runs]
    ids = vocab.tokenize(tokenizer, texts) if vocab is not None else \
        tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        out.append(([start, *tokens, end, *[pad] * (chunk - len(tokens))],
                    [1.0, *weights, *[1.0] * (chunk + 1 - len(weights))]))
        tokens, weights, last_comma = [], [], -1

    for run_ids, (run, weight) in zip(ids, runs):
        if weight == -1 and run == "BREAK":
            close()
            continue
        for token in run_ids:
            if isinstance(token, list):  # an embedding's vectors: moved whole to the next chunk where they overflow
                if len(token) > chunk:
                    raise GenError(f"an embedding in the prompt has {len(token)} vectors, more than the {chunk} "
                                   "tokens of a chunk")
                if len(tokens) + len(token) > chunk:
                    close()
                tokens += token
                weights += [weight] * len(token)
                continue
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == chunk and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved, moved_w = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close()
                tokens, weights = moved, moved_w
            if len(tokens) == chunk:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not out:
        close()
    return out


def count(tokenizer, prompts: list[str], weighting: bool = True, length: int = LENGTH, vocab=None) -> int:
    """The most chunks any of these prompts needs."""
    return max(len(chunks(tokenizer, p, weighting, length, vocab)) for p in prompts)


def encode(model, tokenizer, prompts: list[str], weighting: bool = True, min_chunks: int = 1, clip_skip: int = 1,
           hidden_states: bool = True, length: int = LENGTH, vocab=None):
    """A CLIP tower's output for long, weighted prompts, in the class the tower returns: hidden states (and
    every layer's, for families that read an earlier one) of the chunks concatenated, each weighted and
    mean-rescaled; the pooled (and projected) embedding of the first chunk. At least `min_chunks` chunks.

    clip_skip: A1111's "Clip skip": N > 1 ends the tower N - 1 layers early (the last layer's output becomes
    final_layer_norm(hidden_states[-N]), as A1111 and diffusers' clip_skip = N - 1 do; families that read the
    penultimate layer, SDXL and SD3, read the one before that, as diffusers does)."""
    per_prompt = [chunks(tokenizer, p, weighting, length, vocab) for p in prompts]
    n = max(min_chunks, *(len(c) for c in per_prompt))
    empty = chunks(tokenizer, "", False, length)[0]
    per_prompt = [c + [empty] * (n - len(c)) for c in per_prompt]
    outs = []
    for i in range(n):
        ids = torch.tensor([c[i][0] for c in per_prompt], device=model.device)
        w = torch.tensor([c[i][1] for c in per_prompt], device=model.device)
        out = model(ids, output_hidden_states=hidden_states or clip_skip > 1)
        if clip_skip > 1:
            layers = out.hidden_states[:len(out.hidden_states) - (clip_skip - 1)]
            out["last_hidden_state"] = final_norm(model)(layers[-1])
            out["hidden_states"] = layers
        out["last_hidden_state"] = emphasis(out.last_hidden_state, w)
        if out.get("hidden_states") is not None:
            out["hidden_states"] = tuple(emphasis(h, w) for h in out.hidden_states)
        outs.append(out)
    first = outs[0]
    first["last_hidden_state"] = torch.cat([o.last_hidden_state for o in outs], dim=1)
    if first.get("hidden_states") is not None:
        first["hidden_states"] = tuple(torch.cat(hs, dim=1) for hs in zip(*(o.hidden_states for o in outs)))
    return first


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: each token's state times its weight, then the chunk (B, 77, D) rescaled to
    its original mean (per prompt here). A prompt whose weights are all 1 keeps its states exactly, as the formula
    gives them; where the weighted chunk's mean is ~0 next to its magnitude (layer-normed states of an untrained
    tower) the ratio means nothing and would blow the states up, so it is not applied (A1111 has no such case
    with real CLIPs, whose final norm's bias keeps the mean away from 0)."""
    before = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights.to(z.dtype)[..., None]
    after = weighted.mean(dim=(1, 2), keepdim=True)
    usable = after.abs() > 1e-3 * weighted.abs().mean(dim=(1, 2), keepdim=True)
    weighted = weighted * torch.where(usable, before / torch.where(usable, after, 1), 1)
    plain = (weights == 1).all(dim=1).view(-1, 1, 1)
    return torch.where(plain, z, weighted)


class Syntax:
    """How a pipeline call reads its prompts, set on each TextEncoder for the call (gen.models.text)."""

    def __init__(self, weighting: bool = True, clip_skip: int = 1, min_chunks: int = 1):
        self.weighting, self.clip_skip, self.min_chunks = weighting, clip_skip, min_chunks


def final_norm(model):
    """A CLIP tower's final layer norm (transformers 5 keeps it on CLIPTextModel itself, 4 and the projection
    models on .text_model); None for a T5."""
    return getattr(model, "final_layer_norm", None) or getattr(getattr(model, "text_model", None),
                                                                 "final_layer_norm", None)


def is_clip(model) -> bool:
    """Whether a text tower is a CLIP (which reads chunks and weights), not a T5."""
    return final_norm(model) is not None


def chunk_counts(encoders: list, prompts: list[str], negatives: list[str] | None, weighting: bool = True) -> list[int]:
    """The chunks prompt i is encoded in: the most its own text, or its negative (where guidance uses one), needs
    in any CLIP tower, so that the two line up for classifier-free guidance and nothing else pads them."""
    clips = [e for e in encoders if is_clip(e.model)]
    pairs = [[p] if negatives is None else [p, n] for p, n in zip(prompts, negatives or prompts)]
    return [max((count(e.tokenizer, pair, weighting, e.max_length, e.vocab) for e in clips), default=1)
            for pair in pairs]


def by_chunks(pipe, call: dict, prompts: list[str], negs: list[str], chunks: list[int], seeds, generator):
    """A pipeline call (its arguments `call`) as one call per run of prompts encoded in the same number of chunks,
    each image with its own generator: the images of the single call, none padded to another prompt's length."""
    from gen.pipeline import PipelineOutput

    per, outs, i = call["num_images_per_prompt"], [], 0
    for _, run in itertools.groupby(chunks):
        j = i + len(list(run))
        gens = generator[i * per:j * per] if isinstance(generator, list) else generator
        outs.append(pipe(**call | dict(prompt=prompts[i:j], seed=None, generator=gens, negative_prompt=(
            negs[i:j] if call["negative_prompt"] is not None else None))))
        i = j
    return PipelineOutput.concat(outs, seeds)


def check_clip_skip(encoders: list, clip_skip: int) -> None:
    layers = min((e.model.config.num_hidden_layers for e in encoders if is_clip(e.model)), default=None)
    if layers is not None and clip_skip > layers:
        raise GenError(f"clip_skip (--clip-skip) {clip_skip} is more than the {layers} layers of this model's CLIP "
                       f"text tower; use 1 to {layers}")


def with_syntax(encoders: list, weighting: bool = True, clip_skip: int = 1, min_chunks: int = 1) -> list:
    """Copies of the encoders (the same towers) that read prompts A1111's way in at least `min_chunks` chunks,
    for one pipeline call: the encoders given keep their own settings."""
    import copy

    check_clip_skip(encoders, clip_skip)
    out = [copy.copy(e) for e in encoders]
    for e in out:
        e.syntax = Syntax(weighting, clip_skip, min_chunks)
    return out


def configure(encoders: list, prompts: list[str], weighting: bool = True, clip_skip: int = 1) -> None:
    """Sets these encoders to read prompts A1111's way, with as many chunks as the longest of `prompts` needs (to
    encode outside a pipeline call; a call sets its own copies, with_syntax)."""
    check_clip_skip(encoders, clip_skip)
    n = max(chunk_counts(encoders, prompts, None, weighting))
    for e in encoders:
        e.syntax = Syntax(weighting, clip_skip, n)
