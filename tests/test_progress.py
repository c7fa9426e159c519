"""Progress bars show where someone is watching: a terminal or a Jupyter kernel (a widget where
ipywidgets is installed, else a text bar), never in CI logs, a redirected stderr, or with
``progress=False``."""

from __future__ import annotations

import io
import sys
import types

import pytest

from mlxterp_core import progress


@pytest.fixture
def notebook(monkeypatch):
    """A Jupyter kernel as mlxterp sees one: IPython's get_ipython() with a kernel."""
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MLXTERP_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "DELAY", 0.0)


def kernel_stderr(monkeypatch) -> io.StringIO:
    """A kernel's stderr, which is no terminal (set in the test itself: pytest's own capture
    resets sys.stderr between a fixture and the test)."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def shown(bar) -> bool:
    return not bar.disable


def test_a_notebook_shows_a_bar_even_though_stderr_is_not_a_terminal(notebook, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # no widgets: the text bar
    stderr = kernel_stderr(monkeypatch)
    with progress.progress_bar(10, "caching", unit="tok") as bar:
        assert shown(bar)
        bar.update(5)
    assert "caching" in stderr.getvalue()


def test_a_notebook_with_ipywidgets_gets_the_widget(notebook):
    pytest.importorskip("ipywidgets")
    from tqdm.notebook import tqdm_notebook

    with progress.progress_bar(10, "caching") as bar:
        assert isinstance(bar, tqdm_notebook)


def test_off_in_ci_when_asked_and_when_nobody_watches(notebook, monkeypatch):
    kernel_stderr(monkeypatch)
    with progress.progress_bar(10, "x", enabled=False) as bar:
        assert not shown(bar)
    monkeypatch.setenv("CI", "true")
    with progress.progress_bar(10, "x") as bar:
        assert not shown(bar)
    monkeypatch.delenv("CI")
    monkeypatch.setenv("MLXTERP_PROGRESS", "0")
    with progress.progress_bar(10, "x") as bar:
        assert not shown(bar)
    monkeypatch.delenv("MLXTERP_PROGRESS")
    monkeypatch.delitem(sys.modules, "ipykernel")  # a plain script, stderr redirected
    with progress.progress_bar(10, "x") as bar:
        assert not shown(bar)
    monkeypatch.setenv("MLXTERP_PROGRESS", "1")
    with progress.progress_bar(10, "x") as bar:
        assert shown(bar)
