"""Textual-inversion embeddings (gen/embeddings.py): A1111, diffusers and SDXL files give diffusers'
load_textual_inversion images; folders by name; weighting and chunks; no state on the shared encoders; errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from gen import prompt_weights as pw
from gen.errors import GenError
from tests.conftest import diffusers_pipeline, quiet_pipeline

KW = dict(num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np")
PROMPT, NEGATIVE = "a red circle in mystyle style", "blurry, mystyle"


def vectors(n: int, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def theirs_images(pipe, prompt=PROMPT, negative=NEGATIVE, seed=3):
    return pipe(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(seed), **KW).images


def our_images(pipe, prompt=PROMPT, negative=NEGATIVE, seed=3, sampler="ddim", **kw):
    return pipe(prompt, negative_prompt=negative, seed=seed, sampler=sampler, **KW | kw).images


@pytest.fixture(scope="module")
def sd(sd_folder):
    return quiet_pipeline(sd_folder)


def test_a1111_safetensors_embedding_gives_diffusers_image(sd_folder, sd, tmp_path):
    vec = vectors(3)  # multi-vector: diffusers expands mystyle to mystyle mystyle_1 mystyle_2
    save_file({"emb_params": vec}, tmp_path / "mystyle.safetensors")
    assert sd.load_textual_inversion(tmp_path / "mystyle.safetensors") == ["mystyle"]
    theirs = diffusers_pipeline(StableDiffusionPipeline, sd_folder, safety_checker=None)
    theirs.load_textual_inversion({"mystyle": vec}, token="mystyle")
    a, b = theirs_images(theirs), our_images(sd)
    plain = our_images(sd, "a red circle in style", "blurry,")
    sd.unload_textual_inversion()
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(b - plain).max() > 1e-3  # the vectors are used


def test_a1111_pt_and_diffusers_files_give_diffusers_image(sd_folder, sd, tmp_path):
    pt, learned = vectors(2, seed=4), vectors(1, seed=5)[0]  # a 1-D diffusers vector is one token
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": pt}, "name": "other", "step": 10,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "mystyle.pt")
    save_file({"<cat-toy>": learned}, tmp_path / "learned_embeds.safetensors")
    with pytest.raises(GenError, match="pickle"):
        sd.load_textual_inversion(tmp_path / "mystyle.pt")
    sd.load_textual_inversion(tmp_path / "mystyle.pt", allow_pickle=True)
    assert sd.load_textual_inversion(tmp_path / "learned_embeds.safetensors") == ["<cat-toy>"]
    theirs = diffusers_pipeline(StableDiffusionPipeline, sd_folder, safety_checker=None)
    theirs.load_textual_inversion({"mystyle": pt}, token="mystyle")
    theirs.load_textual_inversion({"<cat-toy>": learned})
    prompt = "a <cat-toy> in mystyle style"
    a, b = theirs_images(theirs, prompt), our_images(sd, prompt)
    sd.unload_textual_inversion()
    assert np.abs(a - b).max() <= 1e-4


def test_sdxl_embedding_uses_clip_l_and_clip_g(sdxl_folder, tmp_path):
    l, g = vectors(2, seed=6), vectors(2, seed=7)
    save_file({"clip_l": l, "clip_g": g}, tmp_path / "mystyle.safetensors")
    ours = quiet_pipeline(sdxl_folder)
    ours.load_textual_inversion(tmp_path / "mystyle.safetensors")
    theirs = diffusers_pipeline(StableDiffusionXLPipeline, sdxl_folder)
    theirs.load_textual_inversion({"mystyle": l}, token="mystyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion({"mystyle": g}, token="mystyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    a, b = theirs_images(theirs), our_images(ours, sampler="euler")
    assert np.abs(a - b).max() <= 1e-4
    with pytest.raises(GenError, match="SDXL's two towers"):  # an SD-1 embedding on SDXL
        save_file({"emb_params": vectors(1)}, tmp_path / "sd1.safetensors")
        ours.load_textual_inversion(tmp_path / "sd1.safetensors")


def test_no_state_is_left_on_the_shared_encoders(sd, tmp_path):
    tower, tokenizer = sd.text.model, sd.text.tokenizer
    table, n = tower.get_input_embeddings(), len(tokenizer)
    before = our_images(sd)
    save_file({"emb_params": vectors(3)}, tmp_path / "mystyle.safetensors")
    sd.load_textual_inversion(tmp_path / "mystyle.safetensors")
    our_images(sd)
    assert sd.text.model is tower and tower.get_input_embeddings() is table and len(tokenizer) == n
    assert tower.get_input_embeddings().weight.shape[0] == n
    sd.unload_textual_inversion()
    assert np.array_equal(our_images(sd), before)


def test_weighting_and_chunks_compose_with_embeddings(sd, tmp_path):
    vec = vectors(3)
    save_file({"emb_params": vec}, tmp_path / "mystyle.safetensors")
    sd.load_textual_inversion(tmp_path / "mystyle.safetensors")
    try:
        from gen.embeddings import Embeddings

        enc = pw.with_syntax(Embeddings.of(sd).for_call(sd.texts, ["(mystyle:1.2) x"]), min_chunks=1)[0]
        (ids, weights), = pw.chunks(enc.tokenizer, "(mystyle:1.2) x", vocab=enc.vocab)
        assert ids[1:4] == [-1, -2, -3] and weights[1:4] == [1.2] * 3 and weights[4] == 1.0
        weighted = enc(["(mystyle:1.2) x"])[0]
        plain = enc(["mystyle x"])[0]
        w = torch.tensor([weights])
        assert torch.allclose(weighted, pw.emphasis(plain, w), atol=1e-6)
        # 74 tokens, then the 3 vectors: they do not fit in the first chunk's 75 and start the second, whole
        long = " ".join(["a"] * 74) + " mystyle"
        first, second = pw.chunks(enc.tokenizer, long, vocab=enc.vocab)
        assert -1 not in first[0] and second[0][1:5] == [-1, -2, -3, enc.tokenizer.eos_token_id]
        assert pw.encode(enc.model, enc.tokenizer, [long], vocab=enc.vocab).last_hidden_state.shape[1] == 154
    finally:
        sd.unload_textual_inversion()


def test_a_folder_is_used_by_name_and_as_embedding_colon_name(sd, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(2, seed=8)}, folder / "EasyNegative.safetensors")
    save_file({"emb_params": vectors(2, 48)}, folder / "unused_sd2.safetensors")  # never read: not in a prompt
    sd.load_textual_inversion(folder)
    try:
        by_name = our_images(sd, "a red circle", "easynegative, blurry")
        comfy = our_images(sd, "a red circle", "embedding:EasyNegative, blurry")
        plain = our_images(sd, "a red circle", "blurry")
        assert np.array_equal(by_name, comfy) and np.abs(by_name - plain).max() > 1e-3
        assert [e.name for e in sd.embeddings_used(["x", "easynegative"])] == ["EasyNegative"]
        with pytest.raises(GenError, match="embedding:nothere"):
            our_images(sd, "a embedding:nothere")
        with pytest.raises(GenError, match="48-wide"):
            our_images(sd, "unused_sd2")
    finally:
        sd.unload_textual_inversion()


def gen_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gen", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_errors_are_one_line(sd_folder, tmp_path):
    save_file({"emb_params": vectors(1, 1024)}, tmp_path / "sd2.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "unknown.safetensors")
    save_file({"emb_params": vectors(1)}, tmp_path / "a.safetensors")  # "a</w>" is in the byte-level vocab
    torch.save({"string_to_param": {"*": vectors(1)}}, tmp_path / "x.pt")
    cases = {"sd2.safetensors": "1024-wide vectors (SD-2.x's OpenCLIP-H), but this model's text encoder takes "
                                "32-wide", "corrupt.safetensors": "not a valid safetensors file",
             "unknown.safetensors": "not a textual-inversion embedding", "a.safetensors": "a token the tokenizer",
             "x.pt": "pickle-based"}
    for name, message in cases.items():
        r = gen_cli("sample", "a red circle", "--model", sd_folder, "--steps", 1, "--height", 32, "--width", 32,
                    "--embedding", tmp_path / name, "--out", tmp_path / "out", cwd=tmp_path)
        assert r.returncode == 2, (name, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)


def test_cli_records_ti_hashes_and_from_finds_the_embeddings(sd_folder, tmp_path):
    from gen.recipe import read_png, sha256

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(2, seed=9)}, folder / "easynegative.safetensors")
    common = ["--model", sd_folder, "--steps", 2, "--height", 32, "--width", 32, "--seed", 5, "--no-progress"]
    r = gen_cli("sample", "a red circle", "--negative-prompt", "(easynegative:1.2), blurry", "--embeddings", folder,
                *common, "--out", tmp_path / "a.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    recipe = read_png(tmp_path / "a.png")
    assert recipe.ti_hashes == {"easynegative": sha256(folder / "easynegative.safetensors")[:12]}
    from PIL import Image

    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert f'TI hashes: "easynegative: {recipe.ti_hashes["easynegative"]}"' in text
    r = gen_cli("sample", "--from", tmp_path / "a.png", "--no-progress", "--out", tmp_path / "b.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    (folder / "easynegative.safetensors").rename(folder / "moved.safetensors")
    r = gen_cli("sample", "--from", tmp_path / "a.png", "--out", tmp_path / "c.png", cwd=tmp_path)
    assert r.returncode == 2 and "--embeddings FOLDER" in r.stderr, r.stderr
