"""Run at interpreter startup by ``mlxterp.pth``: load MKL just before ``mlx.core`` is first
imported, whoever imports it first (see ``mlxterp_core/blas.py``).

Until ``mlx.core`` is imported this costs one finder in ``sys.meta_path`` that returns None
for every other module; nothing is imported here. ``MLXTERP_BLAS=reference`` turns it off.
"""

import sys


class _BeforeMLX:
    """A meta path finder that finds nothing: it only sees ``mlx.core`` go by, first."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core" and not self.done:
            self.done = True  # stays in sys.meta_path: removing it mid-import skips a finder
            try:
                import mlxterp_core  # noqa: F401  (its __init__ loads the BLAS, before mlx)
            except Exception:  # never break someone's import of mlx over a faster BLAS
                pass
        return None


if "mlx.core" not in sys.modules and not any(isinstance(f, _BeforeMLX) for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeMLX())
