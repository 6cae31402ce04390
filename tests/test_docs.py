"""The documentation holds: README.md <= 250 lines and each docs/ page <= 400; every internal link and #anchor
resolves (GitHub's heading slugs); every `gen ...` command in a code block parses with gen's own argparse parser,
with no unknown flag, and each key=value override of `gen train`, `gen lora` and `gen data cache` names a config
field of the right type (train.config.load_config, what the commands run); every `--help` ends with its page."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from gen.cli import build_parser
from gen.commands import DOCS, _merge_parser
from gen.errors import GenError
from train.chain import STAGES
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_ENDS = {"|", "||", "&", "&&", ";", ">", ">>", "2>", "<"}  # a command's words end at these


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if ROOT in page.parents else page.name


def outside_fences(text: str) -> list[str]:
    """The page's lines that are not in a fenced code block."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, markup and punctuation dropped (letters, digits, marks,
    `_` and `-` stay), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()  # a link in a heading counts by its text
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(text):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_problems(page: Path) -> list[str]:
    """Internal links (files, folders, #anchors) of a page that lead nowhere."""
    problems = []
    for line in outside_fences(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code, not links ([`x`](y) keeps its link)
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            problems += [f"{name(page)}: link to {target}: {p}" for p in target_problems(page, target)]
    return problems


def target_problems(page: Path, target: str) -> list[str]:
    """Why `target` (PATH, PATH#ANCHOR or #ANCHOR), written in `page`, leads nowhere."""
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return [f"no {path}"]
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
        return [f"no heading #{anchor} in {dest.name}"]
    return []


def code_lines(text: str) -> list[str]:
    """The shell lines of a page's ```bash (or bare ```) blocks, continuation lines joined."""
    lines, lang, pending = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            lang = line.strip()[3:].strip() if lang is None else None
            continue
        if lang not in ("bash", "sh", "shell", ""):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending)
        pending = ""
    return lines


def gen_commands(text: str) -> list[list[str]]:
    """The argv after `gen` of each `gen SUBCOMMAND ...` in a page's code (also `python -m gen`, `.venv/bin/gen`,
    `accelerate launch ... -m gen`), comments dropped, cut at the shell's |, &&, >, ...; `...` and the brackets of
    `[--optional flag]` are the docs' placeholders, not words."""
    subcommands = set(subparsers(build_parser()))
    found = []
    for line in code_lines(text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # an unclosed quote: reported by the test, as an unparsable command
            found.append(["<unparsable>", f"{line} ({e})"])
            continue
        for i, w in enumerate(words[:-1]):
            if (w == "gen" or w.endswith("/gen")) and (words[i + 1] in subcommands or words[i + 1][0] == "-"):
                argv, optional = [], False
                for word in words[i + 1:]:
                    if word in SHELL_ENDS or word.startswith((">", "2>")):
                        break
                    if word.startswith("[-"):
                        optional, word = True, word[1:]
                    if optional and word.endswith("]"):
                        optional, word = False, word[:-1]
                    if word != "...":
                        argv.append(word)
                found.append(argv)
                break
    return found


def subparsers(parser) -> dict:
    """A parser's subcommands: name -> parser."""
    for action in parser._actions:
        if action.choices and hasattr(action, "add_parser"):
            return dict(action.choices)
    return {}


def parse(parser, argv: list[str]):
    """(parse_known_args' namespace, its problems): an unknown argument, or argparse's error line (namespace None;
    a flag that exits by itself, `--version`, is no problem)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args, unknown = parser.parse_known_args(argv)
        except SystemExit as e:
            return None, err.getvalue().strip().splitlines()[-1:] if e.code else []
    return args, [f"unknown arguments {unknown}"] if unknown else []


def override_problems(overrides: list[str], flags: set[str]) -> list[str]:
    """key=value words gen train / gen lora / gen data cache would refuse: an unknown key, a value of the wrong
    type (load_config's own checks, paths not required to exist); a flag among them must be the command's own."""
    keys = []
    for word in overrides:
        if word.startswith("-"):
            if word.split("=")[0] not in flags:
                return [f"unknown flag {word}"]
            continue
        stage, sep, rest = word.partition(":")
        if sep and "=" not in stage and stage in STAGES:  # a chain's STAGE:key=value
            word = rest
        if not word.startswith("output_dir="):  # a chain's own key
            keys.append(word)
    try:
        load_config(None, keys, check_paths=False)
    except GenError as e:
        return [str(e)]
    return []


def command_problems(argv: list[str]) -> list[str]:
    """Why gen's parser (and, for train/lora/data cache, its config) would refuse `gen ARGV`; [] if it would not."""
    if argv[:1] == ["<unparsable>"]:
        return argv[1:]
    top = build_parser()
    args, problems = parse(top, argv)
    if args is None or problems:
        return problems
    if args.command == "lora" and args.config == "merge":
        return parse(_merge_parser(), args.overrides)[1]
    sub = subparsers(top)[args.command]
    if getattr(args, "kind", None):
        sub = subparsers(sub)[args.kind]
    if hasattr(args, "overrides") and not getattr(args, "list", False):
        return override_problems(args.overrides, set(sub._option_string_actions))
    return []


COMMANDS = {name(p): gen_commands(p.read_text()) for p in PAGES}
TOTAL = sum(len(c) for c in COMMANDS.values())


def test_pages_are_short():
    lengths = {name(p): len(p.read_text().splitlines()) for p in PAGES}
    assert lengths.pop("README.md") <= 250
    assert lengths and max(lengths.values()) <= 400, lengths


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_links_and_anchors_resolve(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", COMMANDS, ids=lambda p: f"{p}: {len(COMMANDS[p])} commands")
def test_documented_commands_parse(page, record_property):
    record_property("commands_checked", len(COMMANDS[page]))
    problems = {" ".join(argv): command_problems(argv) for argv in COMMANDS[page]}
    assert {k: v for k, v in problems.items() if v} == {}


@pytest.mark.parametrize("total", [TOTAL], ids=[f"{TOTAL} gen commands checked in {len(PAGES)} pages"])
def test_every_page_with_commands_is_checked(total, record_property):
    record_property("commands_checked", total)
    assert COMMANDS["README.md"] and COMMANDS["docs/sampling.md"] and COMMANDS["docs/lora.md"]
    assert total >= 100, f"only {total} gen commands found in README.md and docs/"


def test_the_checks_catch_what_does_not_exist(tmp_path):
    """Made-up flags, config keys, wrongly typed values, pages and anchors fail the same checks."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# A page\n\n## Its second part\n\n[ok](#its-second-part) [ok](page.md#a-page) [ok](../docs)\n"
                    "[gone](missing.md) [gone](#no-such-part) [gone](page.md#its-second-part-1)\n\n```bash\n"
                    "gen sample \"a castle\" --made-up-flag 3   # a comment --another\n"
                    "gen train dit-shapes optim.made_up=1\ngen lora lora-sd \\\n    lora.rank=sixteen\n"
                    "gen lora lora-sd --made-up\ngen lora merge BASE A.safetensors\n"
                    "accelerate launch -m gen data cache my.yaml data.resolutoin=64\n"
                    "gen --made-up info\ngen sample \"a castle\" [--hires-steps 20] --steps 4 | tee log\n```\n")
    assert [p.split(": ", 2)[2] for p in link_problems(page)] == [
        "no missing.md", "no heading #no-such-part in page.md", "no heading #its-second-part-1 in page.md"]
    commands = gen_commands(page.read_text())
    assert len(commands) == 8 and commands[-1] == ["sample", "a castle", "--hires-steps", "20", "--steps", "4"]
    problems = [command_problems(argv) for argv in commands]
    assert "--made-up-flag" in str(problems[0]) and "--another" not in str(problems[0])
    assert "optim.made_up" in str(problems[1]) and "lora.rank" in str(problems[2])
    assert "--made-up" in str(problems[3]) and "--out" in str(problems[4]) and "data.resolutoin" in str(problems[5])
    assert "--made-up" in str(problems[6]) and command_problems(["--version"]) == []
    assert problems[7] == [] and command_problems(["train", "dit-shapes", "optim.lr=1e-4"]) == []


def test_slugs_follow_github():
    assert slug("Training: `gen train`") == "training-gen-train"
    assert slug("Memory when sampling: `--offload`") == "memory-when-sampling---offload"
    assert slug("Single files (A1111 / ComfyUI)") == "single-files-a1111--comfyui"
    assert anchors("# A\n```bash\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def parsers(parser, prog: str = "gen"):
    """(prog, parser) for gen and every subcommand below it, `gen lora merge` included."""
    yield prog, parser
    for sub_name, sub in subparsers(parser).items():
        yield from parsers(sub, f"{prog} {sub_name}")
    if prog == "gen lora":
        yield "gen lora merge", _merge_parser()


def test_every_help_ends_with_its_docs_page():
    """`gen --help` and each subcommand's end with `Docs: PAGE`, a page (and heading) that exists; run for real
    for `gen sample --help`."""
    seen = {}
    for prog, parser in parsers(build_parser()):
        last = parser.format_help().rstrip().splitlines()[-1]
        assert last.startswith("Docs: "), (prog, last)
        seen[prog] = target = last.removeprefix("Docs: ").split()[0].rstrip(",")
        assert target_problems(ROOT / "README.md", target) == [], (prog, target)
    assert seen["gen sample"] == "docs/sampling.md" and seen["gen data cache"] == DOCS["data"]
    assert {"gen", "gen info", "gen convert", "gen train", "gen lora", "gen lora merge", "gen eval adherence",
            "gen data pack"} < set(seen)
    gen = Path(sys.executable).parent / "gen"  # the installed command, as a user runs it
    for argv, page in ((["sample"], "docs/sampling.md"), ([], DOCS["gen"]), (["lora", "merge"], "docs/lora.md")):
        out = subprocess.run([str(gen), *argv, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.rstrip().splitlines()[-1] == f"Docs: {page}", out
    assert target_problems(ROOT / "README.md", "docs/none.md") and target_problems(ROOT / "README.md", "docs/lora.md#x")
