"""Which way imports go (DESIGN.md, "The plugin surface"): the core imports no plugin and not the
facade, and calls no analysis; a first-party plugin imports the core only through the plugin
surface ``mlxterp.plugin``, and another plugin only through the public names of its top-level
package (its ``__all__``). Imports are read with ast, top-level and inside functions. Each check
is also run on deliberately bad files, so that it can fail."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import mlxterp

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mlxterp_core"
PLUGINS = ROOT / "plugins"
FACADE = "mlxterp"
SURFACE = "mlxterp.plugin"


def plugin_packages() -> list[str]:
    return sorted(p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file())


def imports(path: Path):
    """(line, module, names) of every absolute import in a file, in line order; ``import a.b``
    gives names []."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return sorted(found, key=lambda found: found[0])


def core_violations(core: Path, plugins: list[str]) -> list[str]:
    """Imports of a plugin package or of the facade by any file of ``core``."""
    found = []
    for path in sorted(core.rglob("*.py")):
        for line, module, _ in imports(path):
            top = module.split(".")[0]
            if top in plugins or top == FACADE:
                found.append(f"{path.relative_to(core.parent)}:{line} imports {module}")
    return found


def public_names(package: str) -> set[str]:
    return set(getattr(importlib.import_module(package), "__all__", ()))


def plugin_violations(plugins_dir: Path, plugins: list[str]) -> list[str]:
    """Imports by a plugin's files of the core or the facade other than ``mlxterp.plugin``'s
    public names, and of another plugin other than its top-level package's public names."""
    surface = public_names(SURFACE)
    found = []
    for package in sorted(p for p in plugins_dir.iterdir() if (p / "__init__.py").is_file()):
        for path in sorted(package.rglob("*.py")):
            for line, module, names in imports(path):
                why = why_not_allowed(package.name, module, names, surface, plugins)
                if why:
                    found.append(f"{path.relative_to(plugins_dir)}:{line} imports {module} ({why})")
    return found


def why_not_allowed(own: str, module: str, names: list[str], surface: set[str], plugins: list[str]) -> str | None:
    """Why plugin ``own`` may not import ``names`` from ``module``; None where it may."""
    top = module.split(".")[0]
    if top == "mlxterp_core" or (top == FACADE and module != SURFACE):
        return "plugins use mlxterp.plugin"
    if top == FACADE:
        outside = [n for n in names if n not in surface]
        return f"{', '.join(outside)} not on the surface" if outside else None
    if top in plugins and top != own:
        if module != top:
            return f"a submodule: use {top}'s public names"
        private = [n for n in names if n not in public_names(top)]
        return f"{', '.join(private)} not in {top}.__all__" if private else None
    return None


def test_the_core_imports_no_plugin_and_not_the_facade():
    assert core_violations(CORE, plugin_packages()) == []


def test_plugins_import_the_core_only_through_the_plugin_surface_and_each_other_by_public_names():
    assert plugin_violations(PLUGINS, plugin_packages()) == []


def analysis_calls(core: Path, names: set[str]) -> list[str]:
    """Calls in ``core`` of a plugin's analysis or export as a method or attribute
    (``model.logit_lens(...)``, ``mlxterp.SAE(...)``); the import checks cover the rest."""
    calls = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
                calls.append(f"{path.relative_to(core.parent)}:{node.lineno} calls {node.func.attr}")
    return sorted(calls)


def plugin_callables() -> set[str]:
    """The names of every analysis and export of the first-party plugins."""
    mlxterp.load_plugins([])
    from mlxterp_core.plugins import analyses, exports

    return set(analyses()) | set(exports())


def test_the_core_calls_no_analysis():
    names = plugin_callables()
    assert {"logit_lens", "activation_patching", "steering_vector", "train_sae", "tuned_lens", "SAE"} <= names
    assert analysis_calls(CORE, names) == []


def test_the_checks_catch_bad_imports(tmp_path):
    core = tmp_path / "mlxterp_core"
    core.mkdir()
    (core / "fine.py").write_text("from . import names\nimport mlx.core as mx\nfrom mlxterp_core.trace import Hooks\n")
    (core / "bad.py").write_text("import mlxterp\n\n\ndef f():\n    from mlxterp_analyses.patching import MEMORY_BUDGET\n")
    assert core_violations(core, plugin_packages()) == [
        "mlxterp_core/bad.py:1 imports mlxterp",
        "mlxterp_core/bad.py:5 imports mlxterp_analyses.patching",
    ]
    (core / "demo.py").write_text("def demo(model):\n    probe = print\n    probe(model.logit_lens('Paris'))\n")
    assert analysis_calls(core, plugin_callables()) == ["mlxterp_core/demo.py:3 calls logit_lens"]

    plugins = tmp_path / "plugins"
    package = plugins / "mlxterp_bad"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from mlxterp.plugin import Hooks, hookimpl\n"  # fine: the surface
        "from mlxterp_analyses import logit_lens\n"  # fine: another plugin's public name
        "from .rows import table\n"  # fine: its own module
        "from mlxterp_bad.rows import table\n"  # fine: its own package
    )
    (package / "rows.py").write_text(
        "from mlxterp_core.trace import Hooks\n"
        "from mlxterp import load\n"
        "import mlxterp.interventions\n"
        "from mlxterp.plugin import Hooks, _private\n"
        "\n\ndef table():\n"
        "    from mlxterp_analyses.patching import MEMORY_BUDGET\n"
        "    from mlxterp_analyses import logit_lens, naive_patching\n"
    )
    assert plugin_violations(plugins, [*plugin_packages(), "mlxterp_bad"]) == [
        "mlxterp_bad/rows.py:1 imports mlxterp_core.trace (plugins use mlxterp.plugin)",
        "mlxterp_bad/rows.py:2 imports mlxterp (plugins use mlxterp.plugin)",
        "mlxterp_bad/rows.py:3 imports mlxterp.interventions (plugins use mlxterp.plugin)",
        "mlxterp_bad/rows.py:4 imports mlxterp.plugin (_private not on the surface)",
        "mlxterp_bad/rows.py:8 imports mlxterp_analyses.patching (a submodule: use mlxterp_analyses's public names)",
        "mlxterp_bad/rows.py:9 imports mlxterp_analyses (naive_patching not in mlxterp_analyses.__all__)",
    ]


def core_cycles(core: Path) -> list[list[str]]:
    """The circles among the core's modules made by imports that run (top-level and inside
    functions; those under ``if TYPE_CHECKING:`` only serve type hints and are left out)."""
    modules = {p.stem for p in core.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in core.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in hints or not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith(core.name + "."):
                targets = [node.module.split(".")[1]]
            else:
                continue
            graph[path.stem] |= {t for t in targets if t in modules and t != path.stem}
    cycles, done = [], set()
    for start in sorted(graph):  # a path back to a module from itself is a circle
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start and frozenset(path) not in done:
                    done.add(frozenset(path))
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_the_core_imports_in_one_direction():
    """No circle of imports among the core's modules, except through type hints."""
    assert core_cycles(CORE) == []


def test_the_cycle_check_can_fail(tmp_path):
    core = tmp_path / "core"
    core.mkdir()
    (core / "a.py").write_text("from .b import x\n")
    (core / "b.py").write_text("def f():\n    from .a import y\n")
    (core / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    assert core_cycles(core) == [["a", "b"]]
