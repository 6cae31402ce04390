"""`accelerate launch ... gen sample --prompts FILE`: the images split over the processes, each made once, by one
process, bit for bit the file one process writes."""

import os
import socket
import subprocess
import sys


def sample(*args, launcher=(), env=None):
    return subprocess.run([*launcher, "-m", "gen", "sample", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def accelerate(processes: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def test_two_processes_write_each_image_once_as_one_process_does(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    run = ("--prompts", prompts, "--num-images", 2, "--seed", 5, "--steps", 1, "--width", 32, "--height", 32,
           "--no-progress")
    one = sample(*run, "--out", tmp_path / "one", launcher=(sys.executable,))
    assert one.returncode == 0, one.stderr
    two = sample(*run, "--out", tmp_path / "two", launcher=accelerate(2))
    assert two.returncode == 0, two.stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 6 and sorted(p.name for p in (tmp_path / "two").iterdir()) == files  # none twice, none lost
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert "INFO: process 1 of 2: 3 of the 6 images" in two.stderr  # two processes ran, each its half
    assert "INFO: process 2 of 2: 3 of the 6 images" in two.stderr
    written = [line for line in two.stdout.splitlines() if line.endswith(".png")]
    assert sorted(os.path.basename(line) for line in written) == files  # each written by one process only


def test_processes_without_a_seed_are_refused(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    r = sample("--prompts", prompts, "--out", tmp_path, launcher=(sys.executable,), env={"WORLD_SIZE": "2",
                                                                                           "RANK": "1"})
    assert r.returncode == 2 and r.stderr.strip() == ("gen: error: 2 processes (accelerate launch) need --seed (or a "
                                                      "seed on every --prompts line), so that they agree on each "
                                                      "image's seed"), r.stderr


class Writes:
    """A stdout that keeps each write() apart, as an unbuffered pipe (PYTHONUNBUFFERED) hands each to the OS."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        pass


def test_each_image_path_goes_out_in_one_write_with_its_newline(tmp_path, monkeypatch):
    # two processes on one pipe interleave between writes: a path and its newline written apart merged two lines
    from gen.cli import main

    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["sample", "a red circle", "--num-images", "2", "--seed", "5", "--steps", "1", "--width", "32",
                 "--height", "32", "--no-progress", "--out", str(tmp_path)]) == 0
    lines = [text for text in out.calls if ".png" in text]
    assert sorted(lines) == sorted(f"{p}\n" for p in tmp_path.iterdir()) and len(lines) == 2
