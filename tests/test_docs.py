"""The documentation cannot drift: every ```python block of README.md and docs/ runs (page by
page, in order, on the default model), and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlxterp

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = [page for page in PAGES if "```python\n" in page.read_text()]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plots the examples write land here
    namespace: dict = {"__name__": f"docs:{page.name}"}
    try:
        for number, block in enumerate(python_blocks(page), start=1):
            exec(compile(block, f"{page.relative_to(ROOT)} block {number}", "exec"), namespace)
    finally:
        mlxterp.load_plugins([])  # a page may register plugins of its own


def test_every_page_has_been_found():
    names = {str(p.relative_to(ROOT)) for p in RUNNABLE}
    assert {"README.md", "docs/quickstart.md", "docs/guide/tracing.md", "docs/guide/analyses.md"} <= names


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "guide" / "analyses" / "index.html").is_file()
    assert f"mlxterp {mlxterp.__version__}" in (tmp_path / "site" / "index.html").read_text()  # the version documented


def test_the_reference_documents_every_method_as_users_call_it():
    """docs/reference.md holds what docs/make_reference.py writes from the code: every method the
    plugins add to InterpretableModel, with its signature without ``model``, and every plugin's
    public classes and functions (rerun the script after changing one)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_reference
    finally:
        sys.path.pop(0)
    assert make_reference.section() in (ROOT / "docs" / "reference.md").read_text(), "run python docs/make_reference.py"
