"""Every shell command in the code blocks of README.md and docs/*.md runs, on tiny stand-ins (tests/docs_standins.py),
as a bash line in a folder of its page's own, and must exit 0; those that cannot run here are in EXCUSED, each with
its reason. The test prints how many ran per page. (tests/test_docs.py checks the same commands' flags, config keys
and links without running them.)"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.docs_standins import build, shrink, world
from tests.test_bench_scripts import DRY_RUN, SMALLEST
from tests.test_docs import PAGES, code_lines, name

TIMEOUT = 240  # seconds for one command
IDLE = ("docs/development.md", "docs/serve.md")  # pages whose commands are all excused (benchmarks; servers)

# command (its words joined by spaces: quotes and comment dropped; a prefix ending in "*" matches every command it
# begins) -> why it does not run here
EXCUSED = {
    "make test": "the whole suite (this test is part of it)",
    "make lock": "make lock: fresh venv from the network, then the whole suite",
    "make setup LOCK=": "network: installs the newest releases",
    "make demo": "network: sets up .venv first (its `gen sample` is the README's next command, run here)",
    "make default-model": "network (make setup), then ~105 min of training; its configs run here as "
                          "`gen train configs/default-model.yaml` and in tests/train/test_configs.py",
    "make setup && bench/gpu.sh": "GPU-only (bench/gpu.sh; its CPU dry run is tests/test_bench_gpu.py)",
    ".venv/bin/python bench/sample_vs_diffusers.py --device cuda*": "GPU-only (--device cuda)",
    ".venv/bin/python bench/attention_kernels.py*": "GPU-only (CUDA kernels; dry run in tests/test_bench_gpu.py)",
    ".venv/bin/python bench/dit_train.py": "GPU-only (DiT-XL/2; dry run in tests/test_bench_gpu.py)",
    ".venv/bin/python bench/*": "a benchmark (minutes): run at its smallest setting by tests/test_bench_scripts.py "
                                   "(SMALLEST, or bench/gpu.py's CPU dry run)",
    "gen sample ... --device cuda*": "GPU-only (--device cuda)",
    "gen sample ... --compile": "torch.compile: minutes on a CPU (tests/test_attention.py compiles once)",
    "accelerate launch --multi_gpu --num_processes 8*": "multi-GPU: 8 processes (2 run here, below)",
    "accelerate launch --multi_gpu --num_processes 2 -m gen train dit-shapes": "1 run in 4 here, rank 1 of this "
        "1-step run outlives its launcher after `wrote runs/dit-shapes/model` (under investigation); "
        "tests/train/test_distributed.py runs this launch of `gen train`",
    "gen serve*": "a server that runs until stopped: tests/test_serve.py starts `gen serve` and drives it with "
                  "the webuiapi and openai clients and a browser",
    "kill *": "a signal to a running run's PID (tests/train/test_signals.py sends them)",
    "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110": "multi-node: a line of the Slurm job script",
    "pid=$!": "multi-node: a line of the Slurm job script",
    "trap *": "multi-node: a line of the Slurm job script",
    "wait $pid": "multi-node: a line of the Slurm job script",
    "[ -n $stopping ] && sbatch $0": "multi-node: a line of the Slurm job script (sbatch)",
}


def commands() -> list[tuple[str, str, str]]:
    """(page, its words joined by spaces, the line as written) for every shell line in a code block, in page order,
    blank and comment-only lines dropped."""
    found = []
    for page in PAGES:
        for line in code_lines(page.read_text()):
            words = shlex.split(line, comments=True)
            if words:
                found.append((name(page), " ".join(words), line))
    return found


def excuse(command: str) -> str | None:
    for known, why in EXCUSED.items():
        if command == known or known.endswith("*") and command.startswith(known[:-1]):
            return why
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable(line: str) -> str:
    """The bash line: a `... -m gen ARGV` (accelerate, torchrun, python) shrunk as the shim shrinks `gen ARGV`."""
    words = shlex.split(line, comments=True)
    if "-m" in words and words[words.index("-m") + 1] == "gen":
        i = words.index("-m") + 2
        head = words[:i]
        if "accelerate" in head:  # a free port, as two launches may run at once
            at = head.index("accelerate") + 2
            head[at:at] = ["--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no"]
        if "torchrun" in head:
            head.insert(head.index("torchrun") + 1, f"--master_port={free_port()}")
        return shlex.join(head + shrink(words[i:]))
    return line


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("zygote") / "socket")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, "-m", "tests.docs_standins", "serve", path], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert server.stdout.readline().strip() == "ready"
    yield path, {**env, "GEN_DOCS_ZYGOTE": path}
    server.send_signal(signal.SIGKILL)
    server.wait()


@pytest.fixture(scope="module")
def standins(zygote, tmp_path_factory):
    _, env = zygote

    def gen(*argv):
        done = subprocess.run([sys.executable, "-m", "tests.docs_standins", "gen", *argv], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, (argv, done.stderr[-3000:])

    return build(tmp_path_factory.mktemp("standins"), gen)


def strays(folder: Path) -> None:
    """Kills what a command left running in `folder` (a launcher's worker that outlived it)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


def run_page(page: str, lines: list[str], folder: Path, env: dict) -> list[tuple[str, str, float, int, str]]:
    """Runs a page's commands in order (a later one may use what an earlier one wrote)."""
    results = []
    for line in lines:
        start = time.monotonic()
        output = folder.parent / f"{folder.name}.out"  # a file, not a pipe: a stray worker cannot hold it open
        with open(output, "w") as f:
            shell = subprocess.Popen(["bash", "-c", runnable(line)], cwd=folder, env=env, stdout=f,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code = shell.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()
                code = -1
            strays(folder)  # torch's launchers start their workers in sessions of their own
        out = output.read_text(errors="replace")
        err = (f"timed out after {TIMEOUT} s: " if code == -1 else "") + out[-3000:]
        results.append((page, line, time.monotonic() - start, code, err))
        with open(folder.parent / "log.txt", "a") as log:  # to follow a run: each command as it ends
            log.write(f"{results[-1][2]:6.1f} s  exit {code}  {page}: {line}\n")
    return results


def test_every_documented_command_runs(zygote, standins, tmp_path, capsys, record_property):
    pages: dict[str, list[str]] = {}
    excused = []
    for page, command, line in commands():
        if excuse(command):
            excused.append(command)
        else:
            pages.setdefault(page, []).append(line)
    jobs = []
    for page, lines in pages.items():
        folder = tmp_path / page.replace("/", "-")
        folder.mkdir()
        jobs.append((page, lines, folder, world(folder, standins, zygote[0])))
    jobs.sort(key=lambda job: -len(job[1]))  # the longest page first, the other worker takes the rest
    with ThreadPoolExecutor(2) as pool:
        results = [r for rs in pool.map(lambda job: run_page(*job), jobs) for r in rs]
    ran = {page: len(pages.get(page, [])) for page in dict.fromkeys(page for page, _, _ in commands())}
    with capsys.disabled():
        print(f"\nran {sum(ran.values())} documented commands ("
              + ", ".join(f"{p.removeprefix('docs/')} {n}" for p, n in ran.items()) + f"), excused {len(excused)}")
        for page, line, seconds, code, _ in sorted(results, key=lambda r: -r[2])[:5]:
            print(f"  {seconds:5.1f} s  {page}: {line}")
    record_property("documented_commands_run", sum(ran.values()))
    failed = [f"{page}: {line}\n  exit {code}: {err}" for page, line, _, code, err in results if code != 0]
    assert not failed, f"{len(failed)} documented commands failed:\n" + "\n".join(failed)
    # development.md's are all excused: benchmarks (tests/test_bench_scripts.py), GPU-only, the lock
    assert all(ran[page] for page in ran if page not in IDLE) and "README.md" in ran, ran


def test_excuses_are_used_and_checked():
    """Each EXCUSED entry matches a documented command (no stale excuse), and a benchmark excused as run by
    tests/test_bench_scripts.py is one that test runs."""
    documented = [command for _, command, _ in commands()]
    assert [k for k in EXCUSED if not any(excuse(c) == EXCUSED[k] for c in documented)] == []
    benches = {c.split()[1].removeprefix("bench/") for c in documented
               if excuse(c) == EXCUSED[".venv/bin/python bench/*"]}
    assert benches and benches <= set(SMALLEST) | DRY_RUN, benches - set(SMALLEST) - DRY_RUN


def test_shrink_overrides_what_the_docs_write():
    argv = shrink(["sample", "x", "--steps", "30", "--height", "1024"])
    assert argv[argv.index("--steps", 3) + 1] == "2" and argv[-4:] == ["--height", "32", "--width", "32"]
    argv = shrink(["lora", "configs/lora-sd.yaml", "...", "optim.name=lion"])
    assert "..." not in argv and "model.base=sd15" in argv and argv[-1].startswith("lora.")
    assert shrink(["sample", "x", "[--hires-steps", "20]"])[:4] == ["sample", "x", "--hires-steps", "20"]


def test_a_failing_command_is_reported_with_its_exit_code(zygote, standins, tmp_path):
    """The shim returns gen's exit code and output (bad input: 2 and its one line), so a documented command that
    breaks fails the test above; a shell line's own failure counts too."""
    env = world(tmp_path, standins, zygote[0])
    results = run_page("x.md", ['gen sample "a castle" --model sd15 --guidance -1', "gen info no-such-model",
                                "gen --version | grep -q no-such-version"], tmp_path, env)
    assert [r[3] for r in results] == [2, 2, 1], results
    assert "guidance" in results[0][4] and "Traceback" not in results[0][4] + results[1][4]
