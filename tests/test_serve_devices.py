"""`gen serve --devices`: a worker (a Pipeline) per device behind the one queue, here two on the CPU."""

import base64
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.test_serve import KEY, launch, pixels


def test_two_requests_run_at_once_on_two_workers_and_are_the_pipelines_images(tmp_path):
    from tests.conftest import quiet_pipeline

    run = dict(prompt="a red circle", steps=12, width=32, height=32, sampler_name="Euler")
    with launch("--devices", "cpu,cpu") as (url, _, _):
        answers = {}

        def ask(seed):
            r = requests.post(url + "/sdapi/v1/txt2img", json=dict(run, seed=seed), timeout=300,
                              headers={"Authorization": f"Bearer {KEY}"})
            answers[seed] = r

        threads = [threading.Thread(target=ask, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    infos = {seed: json.loads(r.json()["info"]) for seed, r in answers.items()}
    assert {i["gen_device"] for i in infos.values()} == {"0: cpu", "1: cpu"}  # one request on each worker
    (a, b) = infos.values()
    assert a["gen_started"] < b["gen_finished"] and b["gen_started"] < a["gen_finished"]  # at the same time
    pipe = quiet_pipeline(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1): CPU kernels split sums by the thread count
    try:
        ours = {seed: pipe("a red circle", num_inference_steps=12, seed=seed, height=32, width=32,
                           sampler="euler").images[0] for seed in answers}
    finally:
        torch.set_num_threads(threads)
    for seed, r in answers.items():
        served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(pixels(served), pixels(ours[seed]))


NO_CUDA = "device 'cuda' was asked for, but no CUDA GPU is available; use --device cpu"


@pytest.mark.parametrize("devices, message", [
    ("cpu,cuda:7", None),  # None: this machine's answer, no GPU or too few
    ("cpu,,cpu", "--devices 'cpu,,cpu': a comma-separated list of devices, e.g. cuda:0,cuda:1"),
])
def test_a_device_that_does_not_exist_is_one_line_and_exit_2(devices, message):
    import torch

    n = torch.cuda.device_count()
    if n > 7:
        pytest.skip("this machine has a cuda:7")
    if message is None:
        message = NO_CUDA if n == 0 else f"device cuda:7 does not exist: this machine has {n} CUDA GPU(s), cuda:0 to " \
            f"cuda:{n - 1}"
    r = subprocess.run([sys.executable, "-m", "gen", "serve", "--devices", devices], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"gen: error: {message}", r.stderr
