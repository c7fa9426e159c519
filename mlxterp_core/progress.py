"""Progress bars for long work, shown where someone is watching and nowhere else.

A bar appears (after :data:`DELAY` seconds: short work shows nothing) when ``progress`` is not
False and the work runs in a terminal (stderr is a tty) or in a Jupyter kernel: there as
tqdm's notebook widget where ipywidgets is installed, else as a plain text bar on stderr. It
never appears in CI logs (the ``CI`` environment variable set) or when stderr is redirected to
a file, and ``MLXTERP_PROGRESS=0`` turns every bar off, ``=1`` on.
"""

from __future__ import annotations

import os
import sys

DELAY = 2.0  # seconds before a bar appears: short work shows nothing


def where() -> str | None:
    """Where a bar would show: "notebook" (a Jupyter kernel), "terminal", or None."""
    forced = (os.environ.get("MLXTERP_PROGRESS") or "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return None
    if os.environ.get("CI") and forced not in ("1", "true", "yes", "on"):
        return None
    if _in_notebook():
        return "notebook"
    if forced in ("1", "true", "yes", "on"):
        return "terminal"
    return "terminal" if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and hasattr(ip, "kernel")


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar of ``total`` steps, shown where someone is watching (see the module doc) and
    ``enabled``. Use it as a context manager and call ``.update(n)``."""
    place = where() if enabled else None
    if place == "notebook" and _has_widgets():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=place is None, delay=DELAY, leave=False,
                file=sys.stderr, dynamic_ncols=place == "terminal")


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def progress_over(items, total, desc: str, enabled: bool = True, unit: str = "it", size=None):
    """Iterate ``items`` under a :func:`progress_bar` that advances by ``size(item)`` (1 by
    default) after each; ``total`` may be None (unknown)."""
    with progress_bar(total, desc, enabled, unit) as bar:
        for item in items:
            yield item
            bar.update(1 if size is None else size(item))
