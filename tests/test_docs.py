"""The documentation points only at what a user has: the README and docs/ name no file outside the
repository, every relative link in them resolves, and the sources cite the official Show-o code by
file and function rather than sections of a document users do not have."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from conftest import TESTS

ROOT = TESTS.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted(p for folder in ("showo_mlx", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py"))

# Pointers at things outside the project: the development machine's layout and the internal spec.
OUTSIDE = [
    re.compile(r"\.\./shared"),
    re.compile(r"\bshared/(reference|fixtures|DESIGN)"),
    re.compile(r"/work/"),
    re.compile(r"\bspec\s*§"),
    re.compile(r"\bspec traps?\b", re.IGNORECASE),
    re.compile(r"showo-spec\.md"),
]
# In the sources a bare "§" can only be a section of that spec (the code has no sections).
OUTSIDE_IN_SOURCES = [*OUTSIDE, re.compile("§")]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def comments_and_strings(source: str):
    """(line, text) of every comment and string literal (docstrings included) of a Python file."""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            yield tok.start[0], tok.string


def test_the_scans_see_the_files():
    names = {rel(p) for p in DOCS}
    assert {"README.md", "docs/DESIGN.md", "docs/TRAINING.md", "docs/PERFORMANCE.md"} <= names
    assert "docs/DESIGN-NOTES.md" not in names  # folded into docs/DESIGN.md
    scanned = {rel(p) for p in SOURCES}
    assert {"showo_mlx/maskgit.py", "showo_mlx/t2i.py", "showo_mlx/train/losses.py", "benchmarks/bench_magvit.py"} <= scanned


def test_the_patterns_catch_what_they_are_for():
    bad = ["see ../shared/DESIGN.md", "(spec §6.3)", "spec trap 9", "/work/shared/reference", "spec §10 trap 12"]
    assert all(any(p.search(text) for p in OUTSIDE) for text in bad)
    good = ["`models/modeling_showo.py`, `Showo.t2i_generate`", "docs/TRAINING.md §4", "quantize_spec(q)"]
    assert not any(p.search(text) for p in OUTSIDE for text in good)
    source = 'x = 1  # cumulative (spec trap 8)\ndef f():\n    """As §5.1 says."""\n'
    hits = [line for line, text in comments_and_strings(source) if any(p.search(text) for p in OUTSIDE_IN_SOURCES)]
    assert hits == [1, 3]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_docs_name_nothing_outside_the_project(doc):
    found = [
        f"{rel(doc)}:{n}: {line.strip()[:100]}"
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in OUTSIDE)
    ]
    assert not found, "cite the official code (file and function) or a file of this repository:\n" + "\n".join(found)


def test_sources_cite_the_official_code_not_the_spec():
    found = []
    for path in SOURCES:
        for line, text in comments_and_strings(path.read_text(encoding="utf-8")):
            if any(p.search(text) for p in OUTSIDE_IN_SOURCES):
                found.append(f"{rel(path)}:{line}: {text.strip()[:100]}")
    assert not found, "cite the official code (file and function) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve_inside_the_repository(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))  # code blocks hold code, not links
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT.resolve()) or not path.exists():
            broken.append(target)
    assert not broken, f"{rel(doc)} links to missing or outside files: {broken}"
