"""matplotlib for every plugin's plots: :func:`pyplot` (the Agg backend where there is no
screen), :func:`finish` (write the figure to ``path`` and close it, or return it to show inline)
and :func:`token_label` (a token as a readable axis label)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _display_available():
        matplotlib.use("Agg")  # no screen: draw to files
    import matplotlib.pyplot as plt

    return plt


def _display_available() -> bool:
    import os
    import sys

    return "ipykernel" in sys.modules or sys.platform == "darwin" or bool(os.environ.get("DISPLAY"))


def finish(fig, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        pyplot().close(fig)
    return fig


def token_label(text: str, width: int = 10) -> str:
    """A token as a readable label: whitespace-only tokens shown quoted, '$' escaped for mathtext."""
    shown = repr(text) if not text.strip() else text.replace("\n", "\\n")
    shown = shown.replace("$", r"\$")
    return shown if len(shown) <= width else shown[: width - 1] + "…"
