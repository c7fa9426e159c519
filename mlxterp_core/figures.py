"""matplotlib for every plugin's plots: :func:`pyplot` (the Agg backend where there is no
screen), :func:`finish` (write the figure to ``path`` and close it, or return it to show inline)
and :func:`token_label` and :func:`figure_text` (a token as a readable axis label, text for a
title; what no font can draw written as its escape).

A figure shows once in a notebook. A plot method returns its Figure (a :class:`ResultFigure`).
matplotlib's inline backend draws every figure still open in pyplot when the cell ends, and
IPython draws a cell's last value: a ResultFigure that IPython draws (a cell's last line, or
``display(fig)``) is then closed in pyplot, so the backend does not draw it again. A figure
written to ``path`` is closed at once, so it is drawn only where it is displayed.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path


def pyplot():
    import matplotlib

    backend = matplotlib.get_backend().lower()
    if backend != "agg" and "inline" not in backend and not _display_available():
        matplotlib.use("Agg")  # no screen: draw to files (an inline backend draws into a notebook)
    import matplotlib.pyplot as plt

    return plt


def _display_available() -> bool:
    import os

    return "ipykernel" in sys.modules or sys.platform == "darwin" or bool(os.environ.get("DISPLAY"))


def finish(fig, path: str | Path | None):
    """Write ``fig`` to ``path`` (PNG by the extension) and close it; return it."""
    figure, result_figure = _figure_classes()
    if type(fig) is figure:
        fig.__class__ = result_figure  # shown once in a notebook (see the module doc)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        pyplot().close(fig)
    _draw_once_in_ipython()
    return fig


@cache
def _figure_classes():
    """(matplotlib's Figure, ResultFigure), made on first use: importing mlxterp imports no matplotlib."""
    from matplotlib.figure import Figure

    class ResultFigure(Figure):
        """The Figure of a result's ``.plot()``: once IPython has drawn it as an output, it is
        closed in pyplot (see the module doc)."""

    ResultFigure.__module__, ResultFigure.__qualname__ = __name__, "ResultFigure"
    globals()["ResultFigure"] = ResultFigure  # where pickle looks for it
    return Figure, ResultFigure


def __getattr__(name: str):
    if name == "ResultFigure":
        return _figure_classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the image formats matplotlib's inline backend can show a figure in
_FIGURE_FORMATS = ("image/png", "image/jpeg", "image/svg+xml", "application/pdf")


def _draw_once_in_ipython() -> None:
    """In IPython, a ResultFigure drawn as an output is then closed in pyplot, so that the inline
    backend does not draw it again when the cell ends."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "display_formatter", None) is None:
        return
    figure, result_figure = _figure_classes()
    for mime in _FIGURE_FORMATS:
        formatter = shell.display_formatter.formatters.get(mime)
        if formatter is None:
            continue

        def print_figure(fig, formatter=formatter):
            try:
                data = formatter.lookup_by_type(figure)(fig)  # as IPython draws any Figure
            except KeyError:  # no printer of this format for figures
                return None
            if data is not None and _inline_backend() and _open_in_pyplot(fig):
                pyplot().close(fig)
            return data

        formatter.for_type(result_figure, print_figure)


def _inline_backend() -> bool:
    import matplotlib

    return "inline" in matplotlib.get_backend().lower()


def _open_in_pyplot(fig) -> bool:
    if "matplotlib.pyplot" not in sys.modules:
        return False
    from matplotlib._pylab_helpers import Gcf

    return any(manager.canvas.figure is fig for manager in Gcf.get_all_fig_managers())


def token_label(text: str, width: int | None = 10) -> str:
    """A token as a readable label: whitespace-only tokens shown quoted, '$' escaped for mathtext,
    characters no font can draw as their escapes (:func:`figure_text`), cut to ``width``."""
    shown = repr(text) if not text.strip() else text.replace("\n", "\\n")
    shown = figure_text(shown)
    return shown if width is None or len(shown) <= width else shown[: width - 1] + "…"


def figure_text(text: str) -> str:
    """Text for a figure (a title, a label): '$' escaped (no mathtext), and every character
    that none of matplotlib's fonts for ``font.family`` can draw written as its escape
    (``\\u4f60``), so drawing it warns of no missing glyph."""
    drawable = _drawable_codepoints()
    text = "".join(c if ord(c) < 128 or ord(c) in drawable else _escape(c) for c in str(text))
    return text.replace("$", r"\$")


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _drawable_codepoints() -> frozenset[int]:
    from matplotlib import font_manager, rcParams

    properties = font_manager.FontProperties(family=rcParams["font.family"])
    try:  # the fonts matplotlib falls back through (3.6+)
        paths = font_manager.fontManager._find_fonts_by_props(properties)
    except AttributeError:
        paths = [font_manager.findfont(properties)]
    return _codepoints(tuple(str(path) for path in paths))


@cache
def _codepoints(paths: tuple[str, ...]) -> frozenset[int]:
    from matplotlib import ft2font

    return frozenset(code for path in paths for code in ft2font.FT2Font(path).get_charmap())
