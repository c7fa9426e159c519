"""Site names: the grammar every raw name follows, sets of names and patterns, the module a
name refers to, and the block a name is computed in.

A raw site is ``model.`` + a module path, optionally followed by ``#k`` (the k-th call of the
module in one forward pass, from 0) and by ``:input`` (what the module received) or ``:pattern``
(an attention module's probabilities, opt-in); ``__model_output__`` is what the wrapped module
returned. Standard names (``layers[5].attn.q``) are parsed by :mod:`mlxterp_core.names` and
mapped onto raw sites by :mod:`mlxterp_core.architecture`. Everything here is a function of the
strings and the module tree alone: no trace, no model run.
"""

from __future__ import annotations

import fnmatch
import functools
import re

import mlx.nn as nn

from .module_probes import walk_modules
from .names import is_raw, parse

MODEL_OUTPUT = "__model_output__"
INPUT_PORT = ":input"
PATTERN_PORT = ":pattern"
SITE_GRAMMAR = re.compile(r"^(?P<path>[^#:]+)(?:#(?P<call>\d+))?(?::(?P<port>input|pattern))?$")
_RAW_LAYER = re.compile(r"\.layers\.(\d+)(?=$|[.#:])")


def is_glob(name: str) -> bool:
    """Whether a name is a glob pattern (``layers.*.output``, ``model.model.layers.[0-3]``)."""
    return "*" in name or "?" in name or "[" in name


def module_part(name: str) -> str:
    """The module path a site name or pattern refers to: ``a.b#1:input`` -> ``a.b``."""
    if "#" not in name and ":" not in name:
        return name
    return re.split(r"[#:]", name, maxsplit=1)[0]


def canonical_site(name: str) -> str:
    """``path#0`` is the same site as ``path``."""
    return re.sub(r"#0(?=$|:)", "", name) if "#0" in name else name


def matches(site: str, pattern: str) -> bool:
    """Whether a recorded site answers a capture entry; ':pattern' sites only when named."""
    if is_glob(pattern):
        if site.endswith(PATTERN_PORT) and not pattern.endswith(PATTERN_PORT):
            return False
        return fnmatch.fnmatchcase(site, pattern)
    return site == canonical_site(pattern)


class NameSet:
    """A set of exact site names and glob patterns."""

    def __init__(self, names: list[str]):
        self.exact = {canonical_site(n) for n in names if not is_glob(n)}
        self.globs = [n for n in names if is_glob(n)]

    def __contains__(self, site: str) -> bool:
        if site in self.exact:
            return True
        return bool(self.globs) and any(matches(site, g) for g in self.globs)


@functools.lru_cache(maxsize=8192)
def exact_site(name: str) -> tuple[str | None, bool]:
    """(module path, whether the name follows the site grammar) of an exact site name; the
    path is None for the model output. A function of the string alone, so it is cached."""
    if canonical_site(name) == MODEL_OUTPUT:
        return None, True
    return module_part(name), SITE_GRAMMAR.match(name) is not None


@functools.lru_cache(maxsize=8192)
def _path_steps(path: str) -> tuple[tuple[str, int | None], ...] | None:
    """'model.layers.0' -> (('layers', None), ('0', 0)): each key, and its list index if it
    is one; None when the path does not start at the root 'model'."""
    head, _, rest = path.partition(".")
    if head != "model" or not rest:
        return None
    return tuple((part, int(part) if part.isdigit() else None) for part in rest.split("."))


def locate_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path ('model.layers.0'), or None; the root is 'model'.

    Looked up afresh on every call (only the parsing of the path is cached), so a module that
    was replaced since the last trace is the one found."""
    steps = _path_steps(path)
    if steps is None:
        return None
    node = root
    for key, index in steps:
        if isinstance(node, dict):  # nn.Module is a dict of its children
            node = node.get(key)
        elif isinstance(node, (list, tuple)) and index is not None and index < len(node):
            node = node[index]
        else:
            return None
    return node if isinstance(node, nn.Module) else None


def short_sites(root: nn.Module, name: str) -> list[str]:
    """The raw sites a name without the leading ``model.`` can stand for (upstream mlxterp's
    keys, ``layers.5.self_attn``): ``model.`` + name, or ``model.<child>.`` + name for a child
    module of the root (mlx-lm's ``model.model.``), where a module has that path (for a glob,
    where it matches one). Empty when none does; more than one when the name could mean either."""
    if is_raw(name):
        return []
    prefixes = ["model."] + [f"model.{key}." for key, child in root.items() if isinstance(child, nn.Module)]
    candidates = [prefix + name for prefix in prefixes]
    if is_glob(name):
        paths = [path for path, _ in walk_modules(root)[1:]]
        return [c for c in candidates if any(fnmatch.fnmatchcase(p, module_part(c)) for p in paths)]
    return [c for c in candidates if SITE_GRAMMAR.match(c) and locate_module(root, module_part(c)) is not None]


def static_site_names(paths: list[str]) -> list[str]:
    """Every raw site name known before running, for module ``paths``: outputs and inputs."""
    return [MODEL_OUTPUT] + [n for p in paths for n in (p, p + INPUT_PORT)]


def layer_of(name: str) -> int | None:
    """The block a site is computed in: ``layers.5.attn.q`` and ``model.model.layers.5.mlp``
    -> 5, ``embed`` -> -1 (before the first block); None for a site after the blocks or not in
    one (``ln_final``, ``logits``, a raw module outside ``layers``) and for ``layers[*]`` or a
    negative index (resolve those against the model first)."""
    if is_raw(name):
        match = _RAW_LAYER.search(name)
        return int(match.group(1)) if match else None
    parsed = parse(name)
    if parsed.layer is None:
        return -1 if parsed.sub == "embed" else None
    return parsed.layer if isinstance(parsed.layer, int) and parsed.layer >= 0 else None


def stop_name(layers) -> str | None:
    """The standard name after which a pass that needs only sites of blocks ``layers`` (-1:
    before the first block; None: after the blocks, or unknown) can stop, for
    ``Hooks(..., stop_after=...)``; None when it must run to the end."""
    layers = list(layers)
    if not layers or any(layer is None for layer in layers):
        return None
    last = max(layers)
    return f"layers.{last}.output" if last >= 0 else "layers.0.input"
