"""Source lint: code that can unpickle or run downloaded code appears in one audited function only."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\b|torch\.load\(|trust_remote_code\s*=\s*True|"
                       r"\bdill\b|\bjoblib\.load\b")
AUDITED = ("gen/io.py", "_load_pickle")  # torch.load(..., weights_only=True), nothing else


def function_span(path: Path, name: str) -> range:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return range(node.lineno, node.end_lineno + 1)
    raise AssertionError(f"audited function {name} not found in {path}")


def violations(files, audited_file: Path, audited: range) -> list[str]:
    found = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if FORBIDDEN.search(line) and not (f == audited_file and n in audited):
                found.append(f"{f.relative_to(f.parents[1])}:{n}: {line.strip()}")
    return found


def test_no_unsafe_loading_outside_the_audited_function():
    audited_file = ROOT / AUDITED[0]
    span = function_span(audited_file, AUDITED[1])
    files = sorted(p for d in ("gen", "train") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 10
    assert violations(files, audited_file, span) == []
    body = audited_file.read_text().splitlines()[span.start - 1:span.stop - 1]
    calls = [line for line in body if "torch.load(" in line]
    assert len(calls) == 1 and "weights_only=True" in calls[0], calls


def test_lint_catches_a_planted_violation(tmp_path):
    pkg = tmp_path / "gen"
    pkg.mkdir()
    bad = pkg / "bad.py"
    bad.write_text("import torch\n\ndef f(p):\n    return torch.load(p, weights_only=False)\n"
                   "x = AutoModel.from_pretrained('m', trust_remote_code=True)\nimport pickle; pickle.loads(b'')\n")
    found = violations([bad], tmp_path / "none.py", range(0))
    assert [v.split(":")[1] for v in found] == ["4", "5", "6"]
