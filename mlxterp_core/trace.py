"""Traces: run the model once with probes on the sites asked for, record, intervene.

Raw site names are the module path with ``model.`` in front (the wrapped module is
``model``), as in ``model.model.layers.5.self_attn.q_proj``, plus two optional suffixes:

- ``#k``: the k-th call of a module within one forward pass, counted from 0. A module called
  twice, like RoPE (queries, then keys), records ``...rope`` (= ``...rope#0``) and ``...rope#1``.
- ``:input``: the first positional argument the module was called with (its input), instead
  of what it returned. ``...o_proj:input`` is the per-head attention mix before the output
  projection.

``__model_output__`` is what the wrapped module returned. Module outputs that are tuples are
recorded (and intervened on) through their first element.

Activations are recorded after the intervention at that site has run, i.e. they are what
flowed on through the model. Everything recorded is evaluated together, once, at the end of
the forward pass.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .errors import InterventionError, TraceError, UnknownNameError, did_you_mean
from .inputs import ModelInputs, prepare
from .probes import probes_installed, walk_modules

if TYPE_CHECKING:
    from .model import InterpretableModel

MODEL_OUTPUT = "__model_output__"
INPUT_PORT = ":input"
_SITE_GRAMMAR = re.compile(r"^(?P<path>[^#:]+)(?:#(?P<call>\d+))?(?::(?P<port>input))?$")
_GLOB_CHARS = set("*?[")


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


def module_part(name: str) -> str:
    """The module path a site name or pattern refers to: ``a.b#1:input`` -> ``a.b``."""
    return re.split(r"[#:]", name, maxsplit=1)[0]


def canonical_site(name: str) -> str:
    """``path#0`` is the same site as ``path``."""
    return re.sub(r"#0(?=$|:)", "", name)


class NameSet:
    """A set of exact site names and glob patterns."""

    def __init__(self, names: list[str]):
        self.names = names
        self.exact = {canonical_site(n) for n in names if not is_glob(n)}
        self.globs = [re.compile(fnmatch.translate(n)) for n in names if is_glob(n)]

    def __contains__(self, name: str) -> bool:
        return name in self.exact or any(g.match(name) for g in self.globs)


class Activations(Mapping):
    """The recorded activations of a trace: raw site name -> mx.array.

    Looking up a name that was not recorded raises :class:`UnknownNameError` naming the
    closest names that were. A resolver (set by architecture plugins) lets standard names
    such as ``layers[5].attn.q`` be looked up too.
    """

    def __init__(
        self,
        recorded: dict[str, Any],
        resolve: Callable[[str, Activations], Any] | None = None,
        known_sites: Callable[[], list[str]] | None = None,
    ):
        self._recorded = recorded
        self._resolve = resolve
        self._known_sites = known_sites

    def __getitem__(self, name: str):
        if name in self._recorded:
            return self._recorded[name]
        canonical = canonical_site(name)
        if canonical in self._recorded:
            return self._recorded[canonical]
        if self._resolve is not None:
            value = self._resolve(name, self)
            if value is not None:
                return value
        hint = ""
        if self._known_sites is not None and canonical in self._known_sites():
            hint = " It is a site of this model but was not captured: add it to capture=."
        raise UnknownNameError(
            f"no activation named {name!r} in this trace.{hint}"
            + did_you_mean(name, self._recorded)
        )

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._recorded)

    def __len__(self) -> int:
        return len(self._recorded)

    def __repr__(self) -> str:
        return f"Activations({len(self)} sites: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"


class _Probe:
    """What a probed module runs: count the call, intervene and record input and output."""

    __slots__ = ("recorder", "path")

    def __init__(self, recorder: Recorder, path: str):
        self.recorder = recorder
        self.path = path

    def __call__(self, call, module, args, kwargs):
        recorder = self.recorder
        k = recorder.calls[self.path] = recorder.calls.get(self.path, -1) + 1
        site = self.path if k == 0 else f"{self.path}#{k}"
        if args and isinstance(args[0], mx.array):
            x = recorder.visit(site + INPUT_PORT, args[0])
            if x is not args[0]:
                args = (x, *args[1:])
        out = call(module, *args, **kwargs)
        if isinstance(out, mx.array):
            return recorder.visit(site, out)
        if isinstance(out, tuple) and out and isinstance(out[0], mx.array):
            first = recorder.visit(site, out[0])
            if first is not out[0]:
                out = (first, *out[1:])
        return out


class Recorder:
    """The state of one forward pass: what to record, what to change, what happened."""

    def __init__(self, capture: NameSet | None, interventions: dict[str, Callable]):
        self.capture = capture  # None: record everything
        self.exact_interventions = {
            canonical_site(k): (k, fn) for k, fn in interventions.items() if not is_glob(k)
        }
        self.glob_interventions = [
            (re.compile(fnmatch.translate(k)), k, fn) for k, fn in interventions.items() if is_glob(k)
        ]
        self.recorded: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        self.fired: set[str] = set()

    def visit(self, site: str, x: mx.array) -> mx.array:
        edits = []
        if site in self.exact_interventions:
            edits.append(self.exact_interventions[site])
        for pattern, key, fn in self.glob_interventions:
            if pattern.match(site):
                edits.append((key, fn))
        for key, fn in edits:
            x = _apply(fn, x, site, key)
            self.fired.add(key)
        if self.capture is None or site in self.capture:
            self.recorded[site] = x
        return x


def _apply(fn: Callable, x: mx.array, site: str, key: str) -> mx.array:
    try:
        y = fn(x)
    except InterventionError as e:
        raise InterventionError(f"intervention {key!r} at {site}: {e}") from e
    except Exception as e:
        raise InterventionError(
            f"intervention {key!r} raised at {site}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(y, mx.array):
        raise InterventionError(
            f"intervention {key!r} at {site} returned {type(y).__name__}, not an mx.array "
            f"of shape {tuple(x.shape)} (did the function forget to return?)."
        )
    if y.shape != x.shape or y.dtype != x.dtype:
        raise InterventionError(
            f"intervention {key!r} at {site} returned shape {tuple(y.shape)} {y.dtype}; the "
            f"activation there is {tuple(x.shape)} {x.dtype}. Return the same shape and dtype "
            "(e.g. .astype(x.dtype), or broadcast a vector with x + v)."
        )
    return y


class Trace:
    """One run of the model on ``inputs``, with interventions, recording what was asked.

    Use it as a context manager (the forward pass runs on entering the block, so activations
    can be read inside it) or get an already-run one from ``model.run(...)``.

    Attributes:
        activations: raw site name -> array (see the module docstring for names).
        output: what the model returned (also ``activations['__model_output__']``).
        inputs: the (B, T) token ids the model ran on (or the array given).
        lengths: real tokens per row; positions at and after ``lengths[b]`` are padding.
    """

    def __init__(
        self,
        model: InterpretableModel,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
    ):
        self._model = model
        self._inputs: ModelInputs = prepare(inputs, model.tokenizer)
        self._interventions = dict(interventions or {})
        self._capture = [capture] if isinstance(capture, str) else capture
        self.activations = Activations({})
        self.output: Any = None
        self._ran = False

    @property
    def inputs(self) -> mx.array:
        return self._inputs.array

    @property
    def lengths(self) -> tuple[int, ...]:
        return self._inputs.lengths

    @property
    def mask(self) -> mx.array:
        """(B, T) boolean, True at real (non-padding) positions."""
        return self._inputs.mask

    def __enter__(self) -> Trace:
        if not self._ran:
            self.run()
        self._model._active_traces.append(self)
        return self

    def __exit__(self, *exc_info) -> bool:
        stack = self._model._active_traces
        if stack and stack[-1] is self:
            stack.pop()
        return False  # exceptions in the block propagate

    def run(self) -> Trace:
        """Run the forward pass (once)."""
        if self._ran:
            raise TraceError("this trace has already run; start a new model.trace(...).")
        module = self._model.model
        recorder = Recorder(
            None if self._capture is None else NameSet(self._capture), self._interventions
        )
        names = list(self._interventions) + (self._capture or [])
        targets = _probe_targets(module, recorder, names, capture_all=self._capture is None)
        with probes_installed(targets):
            output = module(self._inputs.array)
            if isinstance(output, mx.array):
                output = recorder.visit(MODEL_OUTPUT, output)
            elif recorder.capture is None or MODEL_OUTPUT in recorder.capture:
                recorder.recorded[MODEL_OUTPUT] = output
            self._check_reached(recorder)
            mx.eval(output, list(recorder.recorded.values()))
        self.output = output
        self.activations = Activations(
            recorder.recorded,
            resolve=self._model._resolve_activation,
            known_sites=self._model.site_names,
        )
        self._ran = True
        return self

    def _check_reached(self, recorder: Recorder) -> None:
        """Fail on names that matched sites statically but never ran in this forward pass."""
        for key in self._interventions:
            if key not in recorder.fired:
                raise InterventionError(
                    f"intervention {key!r} never ran: that site was not reached in this forward "
                    f"pass (module calls seen: {_calls_summary(recorder, key)})."
                )
        for name in self._capture or []:
            pattern = NameSet([name])
            if not any(site in pattern for site in recorder.recorded):
                raise UnknownNameError(
                    f"capture {name!r} matched nothing in this forward pass (module calls seen: "
                    f"{_calls_summary(recorder, name)}); sites that take no array input have no "
                    "':input'."
                )


def _probe_targets(root: nn.Module, recorder: Recorder, names: list[str], capture_all: bool):
    """The (module, probe) pairs for every module a wanted name can refer to.

    Exact names are looked up by their path alone, so a trace that asks for a few sites costs
    a few lookups, not a walk of the whole model. Unknown names fail here, before anything
    runs.
    """
    exact = _check_exact([n for n in names if not is_glob(n)], root)
    globs = [n for n in names if is_glob(n)]
    if not capture_all and not globs:
        return [(m, _Probe(recorder, path)) for path, m in exact.items()]
    sites = walk_modules(root)[1:]
    paths = [path for path, _ in sites]
    for name in globs:
        part = module_part(name)
        if not any(fnmatch.fnmatchcase(p, part) for p in paths) and not fnmatch.fnmatchcase(
            MODEL_OUTPUT, name
        ):
            raise UnknownNameError(
                f"pattern {name!r} matches no site of this model." + did_you_mean(part, paths)
            )
    if capture_all:
        return [(m, _Probe(recorder, path)) for path, m in sites]
    wanted = NameSet([module_part(n) for n in names])
    return [(m, _Probe(recorder, path)) for path, m in sites if path in wanted]


def _check_exact(names: list[str], root: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module for exact site names; an unknown name fails with suggestions."""
    found: dict[str, nn.Module] = {}
    for name in names:
        if canonical_site(name) == MODEL_OUTPUT:
            continue
        path = module_part(name)
        module = locate_module(root, path) if _SITE_GRAMMAR.match(name) else None
        if module is None:
            known = [p for p, _ in walk_modules(root)[1:]]
            raise UnknownNameError(
                f"no site named {name!r} in this model. Raw names are 'model.' + a module "
                "path, optionally followed by '#k' (k-th call) and ':input'."
                + did_you_mean(name, _static_site_names(known))
            )
        found[path] = module
    return found


def locate_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path ('model.layers.0'), or None; the root is 'model'."""
    head, _, rest = path.partition(".")
    if head != "model" or not rest:
        return None
    node = root
    for part in rest.split("."):
        if isinstance(node, dict):  # nn.Module is a dict of its children
            node = node.get(part)
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, nn.Module) else None


def _static_site_names(paths: list[str]) -> list[str]:
    return [MODEL_OUTPUT] + [n for p in paths for n in (p, p + INPUT_PORT)]


def _calls_summary(recorder: Recorder, name: str) -> str:
    part = module_part(name)
    counts = [f"{p} x{n + 1}" for p, n in recorder.calls.items() if fnmatch.fnmatchcase(p, part)]
    return ", ".join(counts[:5]) or "none"
