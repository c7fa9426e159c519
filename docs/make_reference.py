"""The part of docs/reference.md that documents the analyses as users call them: one entry per
method that plugins add to ``InterpretableModel``, headed by its signature without ``model``
(what ``help(model.logit_lens)`` shows), with its docstring; then each plugin's public classes
and functions. ``tests/test_docs.py`` checks that reference.md holds what this writes, so the
reference follows the code.

    python docs/make_reference.py      # rewrite the section in docs/reference.md
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference.md"
BEGIN = "<!-- analyses: written by docs/make_reference.py -->"
END = "<!-- end of what docs/make_reference.py writes -->"
# the plugins whose public names are documented below their methods, in this order
PLUGINS = ["mlxterp_analyses", "mlxterp_heads", "mlxterp_lenses", "mlxterp_probes", "mlxterp_saes", "mlxterp_transcoders",
           "mlxterp_circuits", "mlxterp_upstream", "mlxterp_upstream.visualization"]
TITLES = {"mlxterp_analyses": "Analyses", "mlxterp_heads": "Attention heads", "mlxterp_lenses": "Tuned lens",
          "mlxterp_probes": "Linear probes", "mlxterp_saes": "SAEs and transcoders",
          "mlxterp_transcoders": "Transcoders and cross-layer transcoders", "mlxterp_circuits": "Attribution graphs",
          "mlxterp_upstream": "Upstream mlxterp's names", "mlxterp_upstream.visualization": "mlxterp.visualization"}


def signature(function) -> str:
    """``name(a, b=1, ...)`` as a bound method: the model parameter left out, defaults as values."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    shown = inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in parameters],
                              return_annotation=inspect.Signature.empty)
    return f"{function.__name__}{shown}"


def section() -> str:
    """The generated section, markers included."""
    import importlib

    import mlxterp  # noqa: F401  (loads the plugins)
    from mlxterp_core import plugins

    methods = plugins.analyses()
    lines = [BEGIN, ""]
    for package in PLUGINS:
        module = importlib.import_module(package)
        own = sorted(name for name, f in methods.items() if f.__module__.split(".")[0] == package)
        public = [n for n in getattr(module, "__all__", []) if n not in own and not n.startswith("_")]
        lines += [f"## {TITLES[package]}", ""]
        if own:
            lines += ["Methods of every `InterpretableModel` (`model.<name>(...)`):", ""]
        for name in own:
            function = methods[name]
            lines += [f"### `model.{signature(function)}`", "",
                      f"::: {function.__module__}.{function.__name__}",
                      "    options:", "      show_root_heading: false", "      show_signature: false", ""]
        kinds = {n: getattr(module, n) for n in public}
        classes = [n for n, obj in kinds.items() if inspect.isclass(obj)]
        functions = [n for n, obj in kinds.items() if inspect.isfunction(obj)]
        for name in classes + functions:
            obj = kinds[name]
            lines += [f"::: {obj.__module__}.{obj.__qualname__}", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write() -> None:
    text = REFERENCE.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section(), text)
    else:
        text = text.rstrip() + "\n\n" + section()
    REFERENCE.write_text(text)


if __name__ == "__main__":
    write()
