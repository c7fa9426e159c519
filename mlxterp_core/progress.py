"""Progress bars for long work: tqdm on stderr, shown only where someone can see it."""

from __future__ import annotations

import sys

DELAY = 2.0  # seconds before a bar appears: short work shows nothing


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar of ``total`` steps; silent unless ``enabled`` and stderr is a terminal.
    Use it as a context manager and call ``.update(n)``."""
    from tqdm.auto import tqdm

    shown = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown, delay=DELAY, leave=False, file=sys.stderr)


def progress_over(items, total, desc: str, enabled: bool = True, unit: str = "it", size=None):
    """Iterate ``items`` under a :func:`progress_bar` that advances by ``size(item)`` (1 by
    default) after each; ``total`` may be None (unknown)."""
    with progress_bar(total, desc, enabled, unit) as bar:
        for item in items:
            yield item
            bar.update(1 if size is None else size(item))
