"""`gen serve` as a real subprocess on a free port with the bundled model, driven by the real `webuiapi` (A1111's
API) and `openai` clients: its images are gen sample's (same pixels), and it refuses what it must."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from gen import recipe

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

KEY = "test-key"
RUN = dict(steps=2, seed=7, width=32, height=32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    from tests.conftest import quiet_pipeline

    return quiet_pipeline(None)


@pytest.fixture(scope="module")
def folders(pipe, tmp_path_factory):
    """A models folder with a copy of the bundled model, and a LoRA folder with one LoRA for it."""
    from peft import LoraConfig, inject_adapter_in_model

    from gen import lora
    from gen.families.dit import GenDiT
    from gen.pipeline import DEFAULT_MODEL

    root = tmp_path_factory.mktemp("serve")
    (root / "models").mkdir(), (root / "loras").mkdir()
    shutil.copytree(DEFAULT_MODEL, root / "models" / "copy")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=lora.target_modules(GenDiT.lora_targets, ("attn", "ff"))),
                            pipe.denoiser)
    lora.save_lora(root / "loras" / "style.safetensors", pipe.denoiser)
    lora.remove_adapters(pipe.denoiser)
    (root / "secret.safetensors").write_bytes(b"not for clients")
    (root / "models" / "broken.safetensors").write_bytes(b"not a model")
    return root


@contextlib.contextmanager
def launch(*flags):
    """`gen serve FLAGS` on a free port, once it answers: (url, port, process)."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gen", "serve", "--port", str(port), "--api-key", KEY,
                             *map(str, flags)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(url + "/", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).ok:
                break
        except requests.ConnectionError:
            if proc.poll() is not None:
                pytest.fail(f"gen serve exited: {proc.stdout.read()}")
            time.sleep(0.5)
    try:
        yield url, port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def server(folders):
    with launch("--models-dir", folders / "models", "--loras-dir", folders / "loras", "--max-steps", "50",
                "--max-size", "256", "--max-images", "4", "--max-body-mb", "1") as running:
        yield running


@pytest.fixture(scope="module")
def a1111(server):
    api = webuiapi.WebUIApi(port=server[1], sampler="Euler", scheduler="automatic")
    api.session.headers["Authorization"] = f"Bearer {KEY}"
    return api


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_txt2img_with_a_lora_in_the_prompt_is_gen_samples_image(a1111, folders, pipe, tmp_path):
    r = a1111.txt2img(prompt="a red circle <lora:style:0.5>", batch_size=2, **RUN)
    done = subprocess.run([sys.executable, "-m", "gen", "sample", "a red circle", "--sampler", "Euler", "--steps", "2",
                           "--seed", "7", "--width", "32", "--height", "32", "--num-images", "2", "--batch-size", "2", "--lora",
                           f"{folders / 'loras' / 'style.safetensors'}:0.5", "--out", tmp_path, "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert len(r.images) == 2
    for image, seed in zip(r.images, (7, 8)):
        # the same pixels as gen sample's batch of 2, as the server makes them in one call (made one at a time, a
        # value may land a level apart: a batched matrix product rounds differently, 1 of 3072 here on 2026-12-07)
        assert pixels(image).tobytes() == pixels(Image.open(tmp_path / f"{seed}.png")).tobytes()
        assert image.text["parameters"].splitlines()[0] == "a red circle <lora:style:0.5>"  # gen's recipe
        assert "Lora hashes: \"style: " in image.text["parameters"]
        # the model's default guidance interval, as `gen sample --from` needs it to remake the image
        assert recipe.from_text(image.text["parameters"]).guidance_interval == pipe.guidance_interval
    assert r.info["all_seeds"] == [7, 8] and r.info["infotexts"][1] == r.images[1].text["parameters"]
    plain = subprocess.run([sys.executable, "-m", "gen", "sample", "a red circle", "--sampler", "Euler", "--steps", "2",
                            "--seed", "7", "--width", "32", "--height", "32", "--out", tmp_path / "plain", "--no-progress"],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert plain.returncode == 0, plain.stderr
    d = np.abs(pixels(r.images[0]).astype(int) - pixels(Image.open(tmp_path / "plain" / "7.png")).astype(int))
    assert (d > 1).mean() > 0.1  # the LoRA left out: more than 1 level apart in 57% of the values (2026-12-07)


def test_img2img_and_openai_generate_and_edit_are_the_pipelines_images(a1111, client, pipe):
    import base64

    source = pipe("a blue square", num_inference_steps=2, seed=3, height=32, width=32).images[0]
    r = a1111.img2img(images=[source], prompt="a red circle", denoising_strength=0.5, **RUN)
    ours = pipe("a red circle", num_inference_steps=2, seed=7, image=source, strength=0.5, height=32, width=32)
    assert np.array_equal(pixels(r.image), pixels(ours.images[0]))
    assert "Denoising strength: 0.5" in r.image.text["parameters"]

    g = client.images.generate(prompt="a red circle", n=1, size="32x32", response_format="b64_json",
                               extra_body={"steps": 2, "seed": 7})
    ours = pipe("a red circle", num_inference_steps=2, seed=7, height=32, width=32).images[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(g.data[0].b64_json)))), pixels(ours))

    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))  # OpenAI's mask: edit where it is transparent
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))
    e = client.images.edit(image=("a.png", _png(source), "image/png"), mask=("m.png", _png(mask), "image/png"),
                           prompt="a red circle", size="32x32", response_format="url", extra_body={"steps": 2, "seed": 7})
    got = requests.get(e.data[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    white = Image.new("L", (32, 32), 0)
    white.paste(255, (8, 8, 24, 24))
    ours = pipe("a red circle", num_inference_steps=2, seed=7, image=source, mask_image=white, height=32, width=32)
    assert np.array_equal(pixels(Image.open(io.BytesIO(got.content))), pixels(ours.images[0]))


def test_model_listing_and_switch(a1111):
    assert a1111.util_get_model_names() == ["broken.safetensors", "copy", "gen-default"]
    assert [x["name"] for x in a1111.get_loras()] == ["style"]
    assert "Euler" in a1111.util_get_sampler_names()
    before = a1111.txt2img(prompt="a red circle", **RUN).image
    a1111.util_set_model("copy")  # the same weights in the models folder
    assert a1111.util_get_current_model() == "copy"
    after = a1111.txt2img(prompt="a red circle", **RUN).image
    assert np.array_equal(pixels(before), pixels(after)) and "Model: copy" in after.text["parameters"]
    a1111.util_set_model("gen-default")
    r = a1111.txt2img(prompt="a red circle", override_settings={"sd_model_checkpoint": "copy"}, **RUN)
    assert "Model: copy" in r.image.text["parameters"] and a1111.util_get_current_model() == "copy"
    a1111.util_set_model("gen-default")
    assert a1111.util_get_current_model() == "gen-default"


def test_interrupt_or_a_client_leaving_frees_the_slot_and_progress_reports_steps(a1111):
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=a1111.txt2img(
        prompt="a red circle", steps=50, seed=1, width=256, height=256, batch_size=4)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        p = a1111.get_progress()  # the job running, one step made
        if p["state"]["job"] and p["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.02)
    assert p["state"]["job"] and 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 50
    a1111.interrupt()
    worker.join(120)
    assert result["r"].images == []  # stopped inside its one pipeline call
    assert a1111.get_progress()["state"]["job"] == ""
    with pytest.raises(requests.exceptions.ReadTimeout):  # a client that leaves: its request stops too
        a1111.session.post(a1111.baseurl + "/txt2img", timeout=2, json=dict(
            prompt="a red circle", steps=50, seed=1, width=256, height=256, batch_size=4))
    deadline = time.time() + 60
    while time.time() < deadline and a1111.get_progress()["state"]["job"]:
        time.sleep(0.05)
    assert a1111.get_progress()["state"]["sampling_step"] < 50
    assert len(a1111.txt2img(prompt="a red circle", **RUN).images) == 1


def test_progress_has_a_live_preview_and_an_eta(a1111, pipe):
    import base64

    result = {}
    worker = threading.Thread(target=lambda: result.update(r=a1111.txt2img(
        prompt="a red circle", steps=40, seed=1, width=128, height=96)))
    worker.start()
    seen = []  # /progress answers with a preview, at different steps
    deadline = time.time() + 300
    while time.time() < deadline and worker.is_alive() and len(seen) < 2:
        p = a1111.get_progress()
        if p["current_image"] and (not seen or p["state"]["sampling_step"] > seen[-1]["state"]["sampling_step"] + 2):
            seen.append(p)
        time.sleep(0.05)
    worker.join(300)
    assert len(seen) == 2 and len(result["r"].images) == 1
    for p in seen:
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["textinfo"].startswith("step ")
    first, last = (Image.open(io.BytesIO(base64.b64decode(p["current_image"]))) for p in seen)
    f = pipe.vae_scale_factor
    k = -(-64 // (96 // f))  # latent-sized, enlarged to at least 64 pixels a side
    assert first.format == "PNG" and first.size == last.size == (128 // f * k, 96 // f * k)
    assert not np.array_equal(pixels(first), pixels(last))  # live: the latent moved between the two
    assert a1111.get_progress()["current_image"] is None  # nothing runs


def test_the_preview_map_gives_a_latents_colours(pipe):
    """The fitted latent -> RGB map, on latents of colours it was not fitted on: nearer than their mean colour."""
    import torch

    from gen.models import vae as vae_lib
    from gen.serve import preview

    rgb_map, f, g = preview.fit(pipe), pipe.vae_scale_factor, torch.Generator().manual_seed(1)
    colours = torch.rand(1, 3, 3, 3, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)  # (1, 3, 12, 12)
    with torch.no_grad():
        z = vae_lib.encode(pipe.vae, colours.repeat_interleave(f, 2).repeat_interleave(f, 3) * 2 - 1, generator=g)
    error = (preview.to_rgb(z[0], rgb_map) - colours[0].permute(1, 2, 0)).abs().mean()
    flat = (colours - colours.mean((2, 3), keepdim=True)).abs().mean()
    assert error < 0.75 * flat


def test_refusals_are_one_json_error_each_and_the_server_goes_on(server, a1111, client):
    url = server[0]
    for path in ("/", "/sdapi/v1/sd-models", "/v1/images/generations"):
        r = requests.get(url + path, timeout=10)
        body = r.json()  # A1111's error shape, and OpenAI's under /v1
        assert r.status_code == 401 and "API key" in (body["error"]["message"] if path.startswith("/v1") else body["detail"])
    assert requests.get(url + "/", auth=("anyone", KEY), timeout=10).ok  # basic auth: a browser's prompt
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    post = lambda path, body: a1111.session.post(url + path, json=body, timeout=60)  # noqa: E731
    for body, words in ((dict(prompt="x", steps=500), "--max-steps"), (dict(prompt="x", width=4096), "--max-size"),
                        (dict(prompt="x", batch_size=3, n_iter=2), "--max-images"),
                        (dict(prompt="x <lora:../secret:1>"), "unknown LoRA"),
                        (dict(prompt="x", width=33, height=32, steps=1), "multiple of 8")):
        r = post("/sdapi/v1/txt2img", body)
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    for name in ("../copy", "../secret.safetensors", "/etc/passwd"):
        r = post("/sdapi/v1/options", {"sd_model_checkpoint": name})
        assert r.status_code == 400 and "unknown model" in r.json()["detail"]
    r = post("/sdapi/v1/options", {"sd_model_checkpoint": "broken.safetensors"})  # fails to load: the old one stays
    assert r.status_code == 400 and "broken.safetensors" in r.json()["detail"], r.text
    assert a1111.get_options()["sd_model_checkpoint"] == "gen-default"
    r = post("/sdapi/v1/txt2img", {"prompt": "x" * 2 ** 21})
    assert r.status_code == 413 and "--max-body-mb" in r.json()["detail"]
    with pytest.raises(openai.BadRequestError, match="--max-size"):
        client.images.generate(prompt="x", size="1024x1024")
    assert len(a1111.txt2img(prompt="a red circle", **RUN).images) == 1
    assert server[2].poll() is None


def test_the_page_in_a_headless_browser(server, a1111, tmp_path):
    """Debian's chromium driven by Selenium: type a prompt, generate, see the image and its recipe; drop a PNG
    made by gen and the form holds its recipe; pick it as img2img source, paint a mask, generate from it."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's browser: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.execute_cdp_cmd("Network.enable", {})  # the API key on every request the page makes
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {KEY}"}})
        browser.get(server[0] + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        for field, value in (("prompt", "a red circle"), ("steps", "2"), ("width", "32"), ("height", "32"),
                             ("seed", "11")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        recipe = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "figcaption.recipe"))[0].text
        assert recipe.startswith("a red circle") and "Seed: 11" in recipe and "Size: 32x32" in recipe
        assert browser.find_element(By.CSS_SELECTOR, "img.result").get_attribute("naturalWidth") == "32"

        made = a1111.txt2img(prompt="a blue square", negative_prompt="blurry", steps=3, seed=5, width=32, height=32)
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "made.png", {type: "image/png"}));
            document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        """, made.json["images"][0])
        wait.until(lambda b: b.find_element(By.ID, "prompt").get_attribute("value") == "a blue square")
        values = {f: browser.find_element(By.ID, f).get_attribute("value") for f in ("negative", "steps", "seed", "width")}
        assert values == {"negative": "blurry", "steps": "3", "seed": "5", "width": "32"}
        assert browser.find_element(By.ID, "error").text == ""

        made.image.save(tmp_path / "source.png")  # img2img from a file, inpainting where the brush paints
        browser.find_element(By.ID, "init").send_keys(str(tmp_path / "source.png"))
        canvas = wait.until(lambda b: b.find_element(By.ID, "mask") if b.find_element(By.ID, "source").is_displayed()
                            else None)
        ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(5, 5).release().perform()
        assert browser.execute_script("return painted && source.startsWith('data:image/png')")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figcaption.recipe")) == 2)
        recipe = browser.find_elements(By.CSS_SELECTOR, "figcaption.recipe")[0].text  # the newest comes first
        assert recipe.startswith("a blue square") and "Denoising strength: 0.75" in recipe
        assert browser.find_element(By.ID, "error").text == ""
    finally:
        browser.quit()


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gen", "serve", "--models-dir", tmp_path / "none"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"gen: error: --models-dir {tmp_path / 'none'}: no such folder"


def test_an_a1111_request_for_ddim_cfgpp_runs_at_its_cfg_scale_over_12_5():
    from gen.serve.a1111 import Txt2Img, _job

    assert _job(None, Txt2Img(prompt="x", sampler_name="DDIM CFG++", cfg_scale=7.5)).guidance == 0.6
    assert _job(None, Txt2Img(prompt="x", sampler_name="Euler", cfg_scale=7.5)).guidance == 7.5
