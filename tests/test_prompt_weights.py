"""Long and weighted prompts against A1111's published rules (prompt_parser.py, sd_hijack_clip.py), cases by hand."""

import numpy as np
import pytest
import torch

from tests.conftest import quiet_pipeline, tiny_t5_tokenizer
from gen import prompt_weights as pw
from gen.errors import GenError
from gen.models.text import TextEncoder, build_text_encoder, byte_level_tokenizer

# A1111's parse_prompt_attention docstring cases, and the rules for escapes and BREAK
PARSES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),  # the unclosed "(" counts
    ("[faint]", [("faint", 1 / 1.1)]),
    ("(red: 1.5 )", [("red", 1.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, runs", PARSES)
def test_parse_follows_a1111(text, runs):
    got = pw.parse(text)
    assert [t for t, _ in got] == [t for t, _ in runs]
    assert [w for _, w in got] == pytest.approx([w for _, w in runs])


@pytest.mark.parametrize("text", ["(red:1.2.3)", "a (red:.) cat"])
def test_a_weight_that_is_no_number_is_a_clear_error(text):
    with pytest.raises(GenError, match=r"the prompt weight in \(\.\.\.:[.\d]+\) is not a number"):
        pw.parse(text)


TOK = byte_level_tokenizer()  # one token per character (+ </w> at word ends)


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_chunks_keep_a_200_token_prompt_and_break_starts_a_chunk():
    text = "abcd " * 50
    assert len(ids(text)) == 200
    chunks = pw.chunks(TOK, text)
    assert len(chunks) == 3 and all(len(c[0]) == len(c[1]) == 77 for c in chunks)
    body = [t for c, _ in chunks for t in c if t not in (TOK.bos_token_id, TOK.eos_token_id)]
    assert body == ids(text)  # every token, in order
    assert [c[0] for c, _ in chunks] == [TOK.bos_token_id] * 3
    a, b = pw.chunks(TOK, "red BREAK blue")
    assert a[0][1:5] == ids("red") + [TOK.eos_token_id] and b[0][1:6] == ids("blue") + [TOK.eos_token_id]
    # a chunk that fills up within 20 tokens after a comma ends at the comma (A1111's word wrap)
    first, second = pw.chunks(TOK, "x" * 70 + ", " + "y" * 10)
    assert first[0][1:72] == ids("x" * 70 + ",") and first[0][72] == TOK.eos_token_id
    assert second[0][1:11] == ids("y" * 10) and second[0][11] == TOK.eos_token_id


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = build_text_encoder("tiny", vocab_size=len(TOK)).eval()
    with torch.no_grad():  # a learned-like final norm: states with a mean away from 0, as real CLIPs have
        pw.final_norm(model).bias.normal_()
    return model


def test_weights_change_exactly_the_weighted_tokens(clip):
    plain = pw.encode(clip, TOK, ["a red cat"], hidden_states=False).last_hidden_state
    with torch.no_grad():
        z = clip(torch.tensor([pw.chunks(TOK, "a red cat", False)[0][0]])).last_hidden_state
    assert torch.equal(plain, z)  # weight 1 everywhere: the tower's own output
    out = pw.encode(clip, TOK, ["a (red:1.5) cat"], hidden_states=False).last_hidden_state
    runs = pw.chunks(TOK, "a (red:1.5) cat")[0][1]
    weights = torch.tensor(runs)
    assert set(weights.tolist()) == {1.0, 1.5} and int((weights == 1.5).sum()) == len(ids("red"))
    expected = z * weights[:, None]
    expected = expected * (z.mean() / expected.mean())  # A1111: keep the chunk's mean
    assert torch.allclose(out, expected, atol=1e-6)
    ratio = (out / z)[0, :, 0]
    assert torch.allclose(ratio[weights == 1.5] / ratio[weights == 1].mean(), torch.tensor(1.5), atol=1e-5)


def test_long_prompts_and_no_weighting(clip):
    long = pw.encode(clip, TOK, ["abcd " * 50, "short"], hidden_states=True)
    assert long.last_hidden_state.shape == (2, 3 * 77, 32)
    assert all(h.shape == (2, 3 * 77, 32) for h in long.hidden_states)
    literal = pw.encode(clip, TOK, ["(red:1.5)"], weighting=False).last_hidden_state
    with torch.no_grad():
        assert torch.equal(literal, clip(TOK(["(red:1.5)"], padding="max_length", max_length=77,
                                             return_tensors="pt").input_ids).last_hidden_state)


def test_clip_skip_is_diffusers_clip_skip_minus_one(sd_folder):
    """diffusers' encode_prompt with clip_skip=k: final_layer_norm(hidden_states[-(k + 1)]) (written out here:
    diffusers' own call reaches for .text_model, which transformers 5's CLIPTextModel no longer has)."""
    ours = quiet_pipeline(sd_folder)
    ids = ours.text.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = ours.text.model(ids, output_hidden_states=True).hidden_states
    for skip in (1, 2, 3):
        k = skip - 1  # diffusers' clip_skip
        expected = pw.final_norm(ours.text.model)(states[-(k + 1)])
        pw.configure(ours.texts, ["a red circle"], clip_skip=skip)
        assert torch.allclose(ours.encode_prompts(["a red circle"])["hidden"], expected, atol=1e-6)


def test_every_family_takes_long_weighted_prompts(sdxl_folder, flux_folder, dit_pipe):
    long = "a (red:1.2) circle, " * 20 + "BREAK a [blue] square"
    for pipe in (dit_pipe, *(quiet_pipeline(f) for f in (sdxl_folder, flux_folder))):
        image = pipe(long, negative_prompt="blurry", num_inference_steps=2, seed=1, output_type="np").images
        assert image.shape[0] == 1 and np.isfinite(image).all()
        pw.configure(pipe.texts, [long])
        a = pipe.encode_prompts([long])
        b = pipe.encode_prompts([long.replace("1.2", "1.6")])
        # CLIP's token states carry the weights (Flux reads CLIP's pooled output only: its T5 is untouched)
        assert (a["hidden"] - b["hidden"]).abs().max() > 0 if pipe.family.name != "flux" else torch.equal(
            a["hidden"], b["hidden"])


def test_a_t5_reads_the_words_only(tmp_path):
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    t5 = TextEncoder(T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_ff=16, d_kv=8, num_layers=1,
                                             num_heads=2)).eval(), tok, max_length=16)
    plain = t5.outputs(["a red circle"], hidden_states=False).last_hidden_state
    pw.configure([t5], ["a (red:1.5) circle"])
    assert torch.equal(t5.outputs(["a (red:1.5) circle"], hidden_states=False).last_hidden_state, plain)


LONG = "a (red:1.2) circle, " * 12 + "BREAK a [blue] square"  # three chunks


def test_an_image_depends_on_its_own_prompt_and_negative_only(sd_folder):
    """A long prompt in the batch pads no other prompt, and a negative that guidance does not use (guidance 1)
    pads nothing (0.036 and 0.0057 apart when they did); the seeds and the order of the images are the single
    call's."""
    pipe = quiet_pipeline(sd_folder)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np", height=16, width=16)
    prompts = ["a cat", LONG, "a dog", "a bird"]
    batch = pipe(prompts, negative_prompt="blurry", seed=3, num_images_per_prompt=2, **kw)
    assert batch.seeds == list(range(3, 11)) and batch.images.shape[0] == 8
    for i, p in enumerate(prompts):
        alone = pipe(p, negative_prompt="blurry", seed=4 + 2 * i, **kw).images[0]
        assert np.abs(batch.images[2 * i + 1] - alone).max() <= 1e-6, p
    unused = pipe("a cat", negative_prompt=LONG, seed=3, **kw | dict(guidance_scale=1.0)).images
    assert np.abs(unused - pipe("a cat", seed=3, **kw | dict(guidance_scale=1.0)).images).max() <= 1e-6
    pair = pipe(prompts[:2], negative_prompt="blurry", seed=3, **kw).images  # batched otherwise: 1e-6 apart
    assert np.abs(pair[0] - batch.images[0]).max() <= 1e-6
    pil = pipe(prompts[:2], negative_prompt="blurry", seed=3, **kw | dict(output_type="pil")).images
    assert len(pil) == 2 and np.array_equal(np.asarray(pil[0]), (pair[0] * 255).round().astype(np.uint8))


def test_a_call_leaves_no_settings_on_the_text_encoders(sd_folder):
    pipe = quiet_pipeline(sd_folder)
    before = pipe.encode_prompts(["a red circle"])["hidden"]
    pipe("a red circle", negative_prompt=LONG, clip_skip=2, num_inference_steps=1)
    assert [t.syntax for t in pipe.texts] == [None]
    assert torch.equal(pipe.encode_prompts(["a red circle"])["hidden"], before)


def test_clip_skip_beyond_the_tower_is_refused(sd_folder):
    pipe = quiet_pipeline(sd_folder)  # a 5-layer CLIP tower
    for skip in (6, 7, 9):  # would be the embeddings, an IndexError, a wrap to the last layer
        with pytest.raises(GenError, match=rf"clip_skip \(--clip-skip\) {skip} is more than the 5 layers of this "
                                           r"model's CLIP text tower; use 1 to 5"):
            pipe("a red circle", clip_skip=skip, num_inference_steps=1)
    assert pipe("a red circle", clip_skip=5, num_inference_steps=1, output_type="np").images.shape[0] == 1
