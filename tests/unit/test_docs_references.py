"""Every document the project refers to is in the repository, and nothing points outside it.

Code, tests, scripts and documents may name a Markdown file (``docs/semantics.md``,
``[design.md](design.md)``) only if it exists, either relative to the naming file or to the
repository root, and Markdown links must resolve. Phrases that pointed at papers outside the
repository (the founders' reference documents, "the seed", numbered sections of them) must
not come back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()

#: Where the project's own text lives (generated and third-party trees are not scanned).
SCANNED_DIRS = ("cma_qemu", "tests", "benchmarks", "docs", "guest", "board_configs", "examples")
SCANNED_TOP = ("README.md", "BENCHMARKS.md", "RELIABILITY.md", "dev.sh", "setup.py",
               "pyproject.toml", "MANIFEST.in", ".ci/run")  # fmt: skip
SUFFIXES = {".py", ".md", ".c", ".h", ".toml", ".sh", ".txt", ".ini", ".in"}
NAMES = {"Makefile", "init", "run"}

MD_MENTION = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)\b")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
OUTSIDE = [
    re.compile(r"behaviou?r doc", re.IGNORECASE),
    re.compile(r"cma-v2-behaviour", re.IGNORECASE),
    re.compile(r"\bthe seed\b", re.IGNORECASE),
    re.compile(r"\bseed's\b", re.IGNORECASE),
    re.compile(r"design brief", re.IGNORECASE),
    re.compile(r"design doc\b", re.IGNORECASE),
    re.compile(r"\bsection \d", re.IGNORECASE),
    re.compile(r"\bshared/spec\b"),
]


def project_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_TOP if (ROOT / name).is_file()]
    for directory in SCANNED_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.parts):
                continue
            if path.is_file() and (path.suffix in SUFFIXES or path.name in NAMES):
                files.append(path)
    return [f for f in files if f != THIS]


FILES = project_files()


def _resolves(mention: str, source: Path) -> bool:
    target = mention.split("#", 1)[0]
    if not target:
        return True  # an anchor in the same document
    return (source.parent / target).exists() or (ROOT / target).exists()


def test_the_scan_sees_the_project() -> None:
    names = {f.relative_to(ROOT).as_posix() for f in FILES}
    assert {"README.md", "docs/semantics.md", "docs/design.md", "cma_qemu/framework.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_documents_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    mentions = set(MD_MENTION.findall(text))
    if path.suffix == ".md":
        mentions |= {
            link
            for link in MD_LINK.findall(text)
            if not link.startswith(("http://", "https://", "mailto:"))
        }
    dangling = sorted(m for m in mentions if not _resolves(m, path))
    assert not dangling, f"{path.relative_to(ROOT)} names documents it does not have: {dangling}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nothing_points_outside_the_repository(path: Path) -> None:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(lines, 1)
        for pattern in OUTSIDE
        if pattern.search(line)
    ]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("see docs/semantics.md", True),
        ("see [design](design.md#layers)", True),  # relative to docs/
        # (built here, so a grep of the repository for document names finds no dangling one)
        ("see docs/nowhere" + ".md", False),
        ("see [x](missing" + ".md)", False),
    ],
)
def test_the_checker_itself(text: str, ok: bool) -> None:
    source = ROOT / "docs" / "semantics.md"
    mentions = MD_MENTION.findall(text) + MD_LINK.findall(text)
    assert mentions
    assert all(_resolves(m, source) for m in mentions) is ok
