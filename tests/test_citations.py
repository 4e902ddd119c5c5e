"""Docstrings and comments cite the papers (section, equation) or name the official code; they never point at files
outside the repository (the specification notes the implementation was written from)."""

from __future__ import annotations

import re
from pathlib import Path

import lafs

SRC = Path(lafs.__file__).resolve().parent

# a spec's name (lafs_spec, kprpe_spec.md, ...) or one of the notes that lived beside the repository
OUTSIDE = re.compile(r"\b\w+_spec\b|shared/docs|\becosystem\.md|\bARCHITECTURE\.md")
PYTHON_NAMES = {"find_spec", "module_from_spec"}  # importlib's, not a document


def outside_references(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".txt")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits = [m.group() for m in OUTSIDE.finditer(line) if m.group() not in PYTHON_NAMES]
            if hits:
                found.append(f"{path.relative_to(root)}:{n}: {', '.join(hits)}")
    return found


def test_no_reference_to_files_outside_the_repository():
    assert outside_references() == []


def test_a_reference_is_named(tmp_path):
    (tmp_path / "m.py").write_text('"""Scale (lafs_spec §9.11) and spec = importlib.util.find_spec(name)."""\n')
    (tmp_path / "c.yaml").write_text("# see ../shared/docs/kprpe_spec.md\n")
    assert outside_references(tmp_path) == ["c.yaml:1: shared/docs, kprpe_spec", "m.py:1: lafs_spec"]
