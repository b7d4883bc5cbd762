"""Every module compiles, including the ones only an optional backend imports (a syntax error in the vLLM engine
would otherwise surface only where vLLM is installed)."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("src", "bench", "tests") for p in (ROOT / folder).rglob("*.py"))


def test_sources_were_found():
    assert len(SOURCES) > 50


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_compiles(path: Path, tmp_path: Path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
