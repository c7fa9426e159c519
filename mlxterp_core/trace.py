"""Traces: run the model once with probes on the sites asked for, record, intervene.

Raw site names are the module path with ``model.`` in front (the wrapped module is
``model``), as in ``model.model.layers.5.self_attn.q_proj``, plus optional suffixes:

- ``#k``: the k-th call of a module within one forward pass, counted from 0. A module called
  twice, like RoPE (queries, then keys), records ``...rope`` (= ``...rope#0``) and ``...rope#1``.
- ``:input``: the first positional argument the module was called with (its input), instead
  of what it returned. ``...o_proj:input`` is the per-head attention mix before the output
  projection.
- ``:pattern`` (attention modules only, opt-in): the attention probabilities (B, H, T, S),
  see :mod:`mlxterp_core.attention`. Never recorded unless asked for by name.

``__model_output__`` is what the wrapped module returned. Module outputs that are tuples are
recorded (and intervened on) through their first element. Where the model's family is known,
standard names (``layers[5].attn.q``, see :mod:`mlxterp_core.names`) work wherever raw names
do: in ``capture=``, in ``interventions=`` and in ``trace.activations[...]``. So does a module path
without the leading ``model.`` (``layers.5.self_attn``) that is not a standard name
(:func:`resolve_name`).

Activations are recorded after the intervention at that site has run, i.e. they are what
flowed on through the model, as they were at that moment: model code that later updates the
array in place (``h += pos``, ``h *= scale``) does not change the record. Everything recorded
is evaluated together, once, at the end of the forward pass.

What is in this file, and how it connects:

- :class:`Trace` (``model.trace`` / ``model.run``): one forward pass of the user's inputs;
  runs a :class:`Hooks` once and keeps its records as :class:`Activations`.
- :class:`Hooks`: the machinery a trace, generation, patching and the activation stream share.
  It translates names (raw, standard, splice sub-sites) into raw sites and :class:`Edit` s
  (names resolved once per model and request: :func:`_cached_names`), finds the modules to
  probe (:func:`_modules_to_probe`, with :mod:`~mlxterp_core.sites`), installs probes with
  :mod:`~mlxterp_core.module_probes` and attention observers with
  :mod:`~mlxterp_core.attention` for the ``with`` block, and runs passes; ``stop_after``
  stops a pass once a site is recorded (:class:`StopForward`).
- :class:`Recorder`: one pass's state; every probe hands it each call's input and output
  (:meth:`Recorder.visit`: edits, then the record). :class:`_Probe` is the general probe;
  :func:`_recording_call` the lean one of passes that record and change nothing.
- :class:`Activations`: the records, looked up by raw, standard or splice name.
"""

from __future__ import annotations

import fnmatch
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from .attention import patterns_observed
from .errors import InterventionError, MlxterpError, TraceError, UnknownNameError, did_you_mean
from .inputs import ModelInputs
from .interventions import Intervention
from .names import is_raw, parse, transformerlens_key
from .module_probes import PROBE_ATTR, probes_installed, walk_modules
from .sites import (
    INPUT_PORT,
    MODEL_OUTPUT,
    PATTERN_PORT,
    NameSet,
    canonical_site,
    exact_site,
    is_glob,
    layer_of,
    locate_module,
    matches,
    module_part,
    short_sites,
    static_site_names,
    stop_name,
)
from .splice import Splices, dotted, splice_list
from .views import Display

if TYPE_CHECKING:
    from .model import InterpretableModel

# A record is a new handle on the recorded array: the same buffer and graph node (no copy, no
# evaluation, mx.grad flows through it). MLX's in-place operators (``x += y``, ``x *= s``)
# overwrite the descriptor of the one handle they are applied to, so the model's later edits
# of the array it holds cannot reach the record.
snapshot = mx.array.__copy__

class StopForward(BaseException):
    """Raised inside a pass at the site ``Hooks(..., stop_after=...)`` names, once that site is
    recorded: the rest of the forward is never built. Hooks catch it."""


@attrs.frozen
class Edit:
    """An intervention in raw terms: at ``site`` (exact or glob), ``apply(x, site, seen)``."""

    key: str  # the name the user gave (raw or standard), for messages
    site: str
    apply: Callable[[mx.array, str, Mapping[str, mx.array]], mx.array]
    needs: str | None = None  # a raw site whose value ``apply`` reads from ``seen``
    fn: Callable | None = None  # the user's function (None for a splice)
    resolved: Any = None  # the Resolved of a standard name (None for a raw or splice site)


class Activations(Mapping):
    """The recorded activations of a trace: raw site name -> mx.array.

    Standard names (``layers[5].attn.q``), their aliases, and ``layers[*]...`` (stacked over
    layers, (L, ...)) are looked up too. A name that was not recorded raises
    :class:`UnknownNameError` naming the closest names that were.
    """

    def __init__(self, recorded: dict[str, Any], model: InterpretableModel | None = None,
                 splices: Splices | None = None, ran: bool = True):
        self._recorded = recorded
        self._model = model
        self._splices = splices
        self._ran = ran

    def __getitem__(self, name: str):
        if isinstance(name, tuple):  # a TransformerLens key: ("resid_post", 5)
            name = transformerlens_key(name)
        if name in self._recorded:
            return self._recorded[name]
        if not self._ran:
            raise TraceError(
                f"no activation named {name!r}: this trace has not run. Use it as a block, `with "
                "model.trace(...) as tr:`, or run it with model.run(...) (model.trace(...) alone "
                "only prepares it)."
            )
        canonical = canonical_site(name)
        if canonical in self._recorded:
            return self._recorded[canonical]
        if self._splices is not None:
            spliced = self._splices.name(name)
            if spliced is not None:
                if spliced in self._recorded:
                    return self._recorded[spliced]
                raise UnknownNameError(f"{name!r} ({spliced}) was not recorded in this trace: add it to capture=.")
        if self._model is not None and not is_raw(name):
            return self._standard(name)
        hint = ""
        if self._model is not None and canonical in self._model.site_names():
            hint = " It is a site of this model but was not captured: add it to capture=."
        raise UnknownNameError(
            f"no activation named {name!r} in this trace.{hint}" + did_you_mean(name, self._recorded)
        )

    def _standard(self, name: str):
        values = []
        for resolved in resolve_name(self._model, name):
            if isinstance(resolved, str):  # a module path without the leading 'model.'
                if canonical_site(resolved) not in self._recorded:
                    raise UnknownNameError(f"{name!r} ({resolved}) was not recorded in this trace: add it to capture=.")
                values.append(self._recorded[canonical_site(resolved)])
                continue
            if resolved.site not in self._recorded:
                raise UnknownNameError(
                    f"{resolved.name} ({resolved.site}) was not recorded in this trace: add "
                    f"{name!r} to capture=" + (" (patterns are opt-in)." if resolved.site.endswith(PATTERN_PORT) else ".")
                )
            values.append(resolved.read(self._recorded[resolved.site]))
        return values[0] if len(values) == 1 and "*" not in name else mx.stack(values)

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
        shown = ", ".join(list(self)[:4]) + (", ..." if len(self) > 4 else "")
        return f"Activations({len(self)} sites: {shown})"


class _Probe:
    """What a probed module runs: count the call, intervene and record input and output."""

    __slots__ = ("recorder", "path", "input_site")

    def __init__(self, recorder: Recorder, path: str):
        self.recorder = recorder
        self.path = path
        self.input_site = path + INPUT_PORT  # the first call's, made once

    def _sites(self, calls: dict[str, int]) -> tuple[str, str]:
        """(output site, input site) of this call, counting it: ``path``, then ``path#1`` ..."""
        path = self.path
        k = calls.get(path)
        if k is None:
            calls[path] = 0
            return path, self.input_site
        calls[path] = k = k + 1
        site = f"{path}#{k}"
        return site, site + INPUT_PORT

    def __call__(self, call, module, args, kwargs):
        recorder = self.recorder
        path = self.path
        site, input_site = self._sites(recorder.calls)
        if args and isinstance(args[0], mx.array):
            x = recorder.visit(input_site, args[0])
            if x is not args[0]:
                args = (x, *args[1:])
        if recorder.pattern_paths:  # only attention patterns need to know who is running
            recorder.stack.append(path)
            try:
                out = call(module, *args, **kwargs)
            finally:
                recorder.stack.pop()
        else:
            out = call(module, *args, **kwargs)
        if isinstance(out, mx.array):
            return recorder.visit(site, out)
        if isinstance(out, tuple) and out and isinstance(out[0], mx.array):
            first = recorder.visit(site, out[0])
            if first is not out[0]:
                out = (first, *out[1:])
        return out


def _recording_call(original_call: Callable) -> Callable:
    """The probed ``__call__`` of a trace that records and changes nothing (no interventions,
    no patterns, no globs among the capture entries): the same records as _Probe, made here
    rather than in a probe's own call, and for a module's first call (most calls) without
    asking the recorder what is wanted. The instance's probe is ``(recorder, path, input
    site, whether the first call's input is wanted, whether its output is)``."""

    def __call__(self, *args, **kwargs):
        probe = self.__dict__.get(PROBE_ATTR)
        if probe is None:
            return original_call(self, *args, **kwargs)
        recorder, path, input_site, wants_input, wants_output = probe
        calls = recorder.calls
        if path in calls:  # a later call: path#1, path#2 ...
            k = calls[path] = calls[path] + 1
            site = f"{path}#{k}"
            input_site = site + INPUT_PORT
            if recorder.capture is not None:
                wants_input, wants_output = input_site in recorder.capture, site in recorder.capture
        else:
            calls[path] = 0
            site = path
        if wants_input and args and isinstance(args[0], mx.array):
            recorder.recorded[input_site] = snapshot(args[0])
        out = original_call(self, *args, **kwargs)
        if wants_output:
            if isinstance(out, mx.array):
                recorder.recorded[site] = snapshot(out)
            elif isinstance(out, tuple) and out and isinstance(out[0], mx.array):
                recorder.recorded[site] = snapshot(out[0])
        return out

    return __call__


class Recorder:
    """The state of one forward pass: what to record, what to change, what happened."""

    def __init__(self, capture: list[str] | NameSet | None, edits: list[Edit], patterns: set[str],
                 stop: str | None = None):
        if capture is not None and not isinstance(capture, NameSet):
            capture = NameSet(capture)
        self.capture = capture  # None: everything
        self.exact_edits: dict[str, list[Edit]] = {}
        self.glob_edits: list[Edit] = []
        for edit in edits:
            if is_glob(edit.site):
                self.glob_edits.append(edit)
            else:
                self.exact_edits.setdefault(canonical_site(edit.site), []).append(edit)
        self.keep = {e.needs for e in edits if e.needs}
        self.pattern_paths = patterns
        self.recorded: dict[str, Any] = {}
        self.seen: dict[str, mx.array] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.fired: set[str] = set()
        self.elsewhere: set[str] = set()  # capture entries recorded by another rank (sharded models)
        self.editing = True
        self.stop = stop  # the raw site after which the pass stops (StopForward)

    def start_pass(self, edit: bool = True) -> None:
        """Forget the previous forward pass (its records, call counts and seen values)."""
        self.recorded, self.seen, self.calls, self.stack = {}, {}, {}, []
        self.editing = edit

    def visit(self, site: str, x: mx.array) -> mx.array:
        if self.editing and (self.exact_edits or self.glob_edits):
            for edit in self.exact_edits.get(site, ()):
                x = edit.apply(x, site, self.seen)
                self.fired.add(edit.key)
            for edit in self.glob_edits:
                if matches(site, edit.site):
                    x = edit.apply(x, site, self.seen)
                    self.fired.add(edit.key)
        if self.keep and site in self.keep:
            self.seen[site] = snapshot(x)
        if self.capture is None:
            if not site.endswith(PATTERN_PORT):
                self.recorded[site] = snapshot(x)
        elif site in self.capture:
            self.recorded[site] = snapshot(x)
        if self.stop is not None and site == self.stop:
            raise StopForward
        return x


def checked(fn: Callable, site: str, key: str) -> Callable[[mx.array], mx.array]:
    """``fn`` with its errors, wrong shapes and wrong dtypes reported against ``site``."""

    def run(x: mx.array) -> mx.array:
        try:
            y = fn(x)
        except InterventionError as e:
            raise InterventionError(f"intervention {key!r} at {site}: {e}") from None
        except Exception as e:
            raise InterventionError(f"intervention {key!r} raised at {site}: {type(e).__name__}: {e}") from e
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

    return run


class Trace(Display):
    """One run of the model on ``inputs``, with interventions, recording what was asked.

    Use it as a context manager (the forward pass runs on entering the block, so activations
    can be read inside it) or get an already-run one from ``model.run(...)``.

    Attributes:
        activations: site name -> array (raw names; standard names are looked up too).
        output: what the model returned (also ``activations['__model_output__']``).
        saved_values: what ``.save()`` returned inside the block, by name
            (``model.layers[3].output.save()`` -> ``"layers.3.output"``).
        inputs: the (B, T) token ids the model ran on (or the array given).
        lengths: real tokens per row; positions at and after ``lengths[b]`` are padding.
    """

    def __init__(
        self,
        model: InterpretableModel,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
        saes: Any = None,
    ):
        self._model = model
        self._inputs: ModelInputs = model.prepare_inputs(inputs)
        self._interventions = dict(interventions or {})
        self._capture = [capture] if isinstance(capture, str) else capture
        self._saes = splice_list(saes)
        self.activations = Activations({}, ran=False)
        self.output: Any = None
        self.saved_values: dict[str, Any] = {}
        self._ran = False

    @property
    def model(self) -> InterpretableModel:
        """The model this trace runs."""
        return self._model

    @property
    def interventions(self) -> dict[str, Callable]:
        """The interventions given to this trace, by name."""
        return dict(self._interventions)

    def get(self, name: str, default: Any = None) -> Any:
        """What ``.save()`` kept under ``name`` (``"layers.3.output"``), else the activation of
        that name, else ``default``."""
        if name in self.saved_values:
            return self.saved_values[name]
        return self.activations.get(name, default)

    def get_activation(self, name: str, default: Any = None) -> Any:
        """The activation of ``name`` (raw, standard, or a module path without ``model.``), or
        ``default`` where this trace recorded none."""
        return self.activations.get(name, default)

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

    # nnterp-style accessors: tr.layers_output[3] is tr.activations["layers[3].output"]
    @property
    def layers_input(self) -> _LayerAccessor:
        return _LayerAccessor(self, "input")

    @property
    def layers_output(self) -> _LayerAccessor:
        return _LayerAccessor(self, "output")

    @property
    def attentions_output(self) -> _LayerAccessor:
        return _LayerAccessor(self, "attn")

    @property
    def mlps_output(self) -> _LayerAccessor:
        return _LayerAccessor(self, "mlp")

    @property
    def attention_probabilities(self) -> _LayerAccessor:
        return _LayerAccessor(self, "attn.pattern")

    @property
    def logits(self) -> mx.array:
        return self.activations["logits"] if self._model.architecture else self.output

    def _summary(self) -> str:
        inputs = self._inputs.array
        shape = "x".join(map(str, inputs.shape))
        names = list(self._interventions)
        edits = f", interventions: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" if names else ""
        if not self._ran:
            return f"not run yet, inputs {shape}{edits}"
        n = len(self.activations)
        return f"inputs {shape}, {n} site{'s' * (n != 1)} recorded{_sites_shown(self.activations)}{edits}"

    def __enter__(self) -> Trace:
        if not self._ran:
            self.run()
        active_traces(self._model).append(self)
        return self

    def __exit__(self, *exc_info) -> bool:
        stack = active_traces(self._model)
        if stack and stack[-1] is self:
            stack.pop()
        return False  # exceptions in the block propagate

    def run(self) -> Trace:
        """Run the forward pass (once)."""
        if self._ran:
            raise TraceError("this trace has already run; start a new model.trace(...).")
        with Hooks(self._model, self._interventions, self._capture, saes=self._saes) as hooks:
            output, recorded = hooks(self._inputs.array)
            hooks.check_reached()
        self.output = output
        self.activations = Activations(recorded, self._model, hooks.splices)
        self._ran = True
        return self


class Hooks:
    """Probes, attention patches and a recorder installed on a model for the duration of a
    ``with`` block, in which the model can be run any number of times (a trace runs it once;
    generation once per token, with a KV cache).

    Calling it runs one forward pass and returns ``(output, recorded)``, everything recorded
    evaluated (``evaluate=False`` leaves them lazy: needed inside ``mx.grad``). ``edit=False``
    runs that pass without the interventions.

    ``saes``: splices (see :mod:`mlxterp_core.splice`) applied in every pass, after those
    attached to the model with ``model.saes(...)``; ``edit=False`` runs without them too.

    ``stop_after``: stop every pass once this site is recorded, so the rest of the forward is
    never built (the one way to stop early: the cache, the trainers and the logit lens use
    it); a pass that stops returns ``(None, recorded)``. A site name, or ``"auto"``: after the
    last block any capture entry is computed in (no stop when an entry is not in a block, such
    as ``logits``, or when everything is captured). A pipeline-parallel model never stops.

    On a model sharded across processes (:mod:`mlxterp_core.sharding`) every rank makes the
    same calls; ``gather`` (default) gives every rank the whole of every recorded tensor, and
    ``gather=False`` leaves each record where it was computed (a tensor-parallel rank's heads
    and columns, a pipeline stage's layers) for analyses that reduce where the data lives.
    """

    def __init__(
        self,
        model: InterpretableModel,
        interventions: Mapping[str, Callable] | None = None,
        capture: list[str] | None = None,
        saes: Any = None,
        stop_after: str | None = None,
        gather: bool = True,
    ):
        self._model = model
        self._interventions = dict(interventions or {})
        self._capture_given = capture
        self.sharding = getattr(model, "sharding", None)
        self.gather = gather
        attached = model.attached_saes
        self.splices = Splices(model, [*attached, *splice_list(saes)]) if attached or saes else None
        self._capture, edits, self._asked, self._capture_set = self._translate()
        if self.sharding is not None:
            edits = self.sharding.edits(self, edits)
        self.stop_site = self._stop_site(stop_after)
        names = [e.site for e in edits] + [e.needs for e in edits if e.needs] + (self._capture or [])
        names += [self.stop_site] if self.stop_site is not None else []
        if self.splices is not None:
            names = [n for n in names if not self._is_spliced(n)]
        if self.sharding is not None:  # a pipeline stage probes only the blocks it runs
            names = self.sharding.probed(names, model.model)
        self._probed, self._pattern_modules = _modules_to_probe(
            model.model, names, capture_all=self._capture is None
        )
        self._edits = edits
        self._recorder = Recorder(self._capture_set, edits, set(self._pattern_modules), self.stop_site)
        self._stack: ExitStack | None = None
        self.stopped = False  # whether the last pass stopped at stop_site

    def __enter__(self) -> Hooks:
        recorder = self._recorder
        capture = recorder.capture
        lean = not (self._edits or recorder.pattern_paths or recorder.stop) and (capture is None or not capture.globs)
        if lean:
            # records, changes nothing: the lean probes of _recording_call
            if capture is None:
                targets = [(m, (recorder, p, p + INPUT_PORT, True, True)) for p, m in self._probed]
            else:
                exact = capture.exact
                targets = [(m, (recorder, p, p + INPUT_PORT, p + INPUT_PORT in exact, p in exact)) for p, m in self._probed]
            probes = probes_installed(targets, make_call=_recording_call)
        else:
            probes = probes_installed([(m, _Probe(recorder, p)) for p, m in self._probed])
        stack = ExitStack()
        try:
            if self._pattern_modules:
                stack.enter_context(patterns_observed(self._pattern_modules, recorder))
            stack.enter_context(probes)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> bool:
        self._stack.close()
        self._stack = None
        return False

    def __call__(self, *args, edit: bool = True, evaluate: bool = True, **kwargs) -> tuple[Any, dict[str, Any]]:
        if self._stack is None:
            raise TraceError("Hooks are used inside their `with` block.")
        if self.sharding is not None:  # every rank takes part: see mlxterp_core.sharding
            return self.sharding.forward(self, args, kwargs, edit, evaluate)
        output = self._forward(args, kwargs, edit)
        self._check_captured()
        if evaluate:
            mx.eval(output, list(self._recorder.recorded.values()))
        return output, self._recorder.recorded

    def _forward(self, args: tuple, kwargs: dict, edit: bool) -> Any:
        """Build one forward pass (lazy): its output, with the records in the recorder."""
        recorder = self._recorder
        recorder.start_pass(edit)
        try:
            output = self._model.model(*args, **kwargs)
        except StopForward:
            output, self.stopped = None, True
        except MlxterpError as e:
            # Said in mlxterp's words already: raised from here, not from deep inside the model
            # code (a notebook shows the user's call, not a page of mlx-lm frames).
            e.__traceback__, e.__cause__, e.__suppress_context__ = None, None, True
            raise e
        else:
            self.stopped = False
            if isinstance(output, mx.array):
                output = recorder.visit(MODEL_OUTPUT, output)
            elif recorder.capture is None or MODEL_OUTPUT in recorder.capture:
                recorder.recorded[MODEL_OUTPUT] = output
        return output

    def _stop_site(self, stop_after: str | None) -> str | None:
        """The raw site ``stop_after`` means (see the class doc), or None: no stop."""
        if stop_after is None or (self.sharding is not None and not self.sharding.can_stop):
            return None
        if stop_after != "auto":
            sites = self._splice_sites(stop_after) or [_site(r) for r in self._resolve(stop_after)]
            if len(sites) != 1 or is_glob(sites[0]):
                raise TraceError(f"stop_after={stop_after!r} names {len(sites)} sites; name one exact site.")
            return sites[0]
        if self._capture_given is None or self.splices is not None or self._model.architecture is None:
            return None  # everything captured, or splices that may sit after any block
        layers = []
        for name in self._capture_given:
            if is_glob(name):
                layers.append(None)
            else:
                layers += [layer_of(r if isinstance(r, str) else r.name) for r in self._resolve(name)]
        last = stop_name(layers)
        return None if last is None else self._resolve(last)[0].site

    @property
    def recorded(self) -> dict[str, Any]:
        """What the current (or last) pass has recorded so far, lazy: a pass that an
        intervention stopped by raising keeps what it recorded before."""
        return self._recorder.recorded

    def call(self, part: Callable, *args, edit: bool = True, **kwargs) -> Any:
        """Run ``part(*args, **kwargs)``, a piece of the model such as one block, as one pass
        with these probes and interventions; what it returns, lazy. Patching sweeps re-enter
        a forward pass at a block this way."""
        if self._stack is None:
            raise TraceError("Hooks are used inside their `with` block.")
        self._recorder.start_pass(edit)
        return part(*args, **kwargs)

    def _is_spliced(self, name: str) -> bool:
        """Whether a raw capture entry is a splice's sub-site (or a pattern over them)."""
        if self.splices is None:
            return False
        if is_glob(name):
            return any(fnmatch.fnmatchcase(n, name) for n in self.splices.by_name)
        return name in self.splices.by_name

    def _splice_sites(self, name: str) -> list[str] | None:
        """The splice sub-sites a capture or intervention name means, or None if it means none."""
        if self.splices is None:
            return None
        if is_glob(name):
            found = [n for n in self.splices.by_name if fnmatch.fnmatchcase(n, dotted(name))]
            return found or None
        found = self.splices.name(name)
        return None if found is None else [found]

    def _translate(self) -> tuple[list[str] | None, list[Edit], dict[str, str], NameSet | None]:
        """Raw capture entries, raw edits, raw entry -> the name the user gave, and the
        capture entries as a NameSet."""
        capture, asked, targets, capture_set = self._names()
        edits = [] if self.splices is None else self.splices.edits(Edit, lambda: self._recorder)
        for key, fn in self._interventions.items():
            for target in targets[key]:
                if isinstance(target, str):  # a raw site or a splice's sub-site
                    edits.append(Edit(key, target, lambda x, site, seen, fn=fn, key=key: checked(fn, site, key)(x), fn=fn))
                    continue
                resolved = target
                if isinstance(fn, Intervention) and fn.heads is not None and fn.n_heads is None and resolved.n_heads:
                    fn = fn.at(n_heads=resolved.n_heads)
                site, raw_edit = resolved.edit(checked(fn, resolved.name, key))
                edits.append(Edit(key, site, lambda x, s, seen, e=raw_edit: e(x, seen), resolved.needs, fn=fn, resolved=resolved))
        return capture, edits, asked, capture_set

    def _names(self) -> tuple[list[str] | None, dict[str, str], dict[str, list], NameSet | None]:
        """What the capture entries and intervention keys name, in raw terms: the raw capture
        entries (None: everything), raw entry -> the name given, intervention key -> its
        targets (raw site names, or the ``Resolved`` of a standard name), and the raw capture
        entries as a NameSet.

        A function of the names, the architecture and the splices alone (never of a module or
        an intervention's function), so without splices it is worked out once per model and
        request (:func:`_cached_names`): a loop of traces with the same names resolves them
        once. Modules are looked up afresh by every trace (:func:`_modules_to_probe`)."""
        if self.splices is None:
            return _cached_names(self)
        return self._resolve_names()

    def _resolve_names(self) -> tuple[list[str] | None, dict[str, str], dict[str, list], NameSet | None]:
        asked: dict[str, str] = {}
        capture = None
        if self._capture_given is not None:
            capture = []
            for name in self._capture_given:
                sites = self._splice_sites(name)
                if sites is None:
                    sites = [_site(r) for r in self._resolve(name)]
                for site in sites:
                    asked.setdefault(site, name)
                capture += sites
        targets: dict[str, list] = {}
        for key in self._interventions:
            spliced = self._splice_sites(key)
            targets[key] = spliced if spliced is not None else self._resolve(key)
        return capture, asked, targets, None if capture is None else NameSet(capture)

    def _resolve(self, name: str) -> list:
        return resolve_name(self._model, name)

    def check_reached(self) -> None:
        """Fail on interventions that never ran in any pass."""
        recorder = self._recorder
        for key in self.splices.keys() if self.splices is not None else ():
            if key not in recorder.fired:
                raise InterventionError(
                    f"the splice {key.removesuffix(' (splice)')} never ran: its site was not reached "
                    f"in this forward pass (module calls seen: {_calls_summary(recorder, key)})."
                )
        for key in self._interventions:
            if key not in recorder.fired:
                raise InterventionError(
                    f"intervention {key!r} never ran: that site was not reached in this forward "
                    f"pass (module calls seen: {_calls_summary(recorder, key)})."
                )

    def _check_captured(self) -> None:
        """Fail on capture entries that matched sites statically but recorded nothing."""
        recorder = self._recorder
        for entry in self._capture or []:
            if entry in recorder.elsewhere:
                continue
            if is_glob(entry):
                reached = any(matches(site, entry) for site in recorder.recorded)
            else:
                reached = canonical_site(entry) in recorder.recorded
            if not reached:
                given = self._asked.get(entry, entry)
                raise UnknownNameError(
                    f"capture {given!r} matched nothing in this forward pass (module calls seen: "
                    f"{_calls_summary(recorder, entry)}); sites that take no array input have no "
                    "':input'."
                )


_NAMES_CACHE_SIZE = 256  # requests remembered per model; then the cache starts afresh
# model -> (its architecture, {request: resolved names}); forgotten with the model
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the traces inside a `with model.trace(...)` block, innermost last
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_name(model: InterpretableModel, name: str) -> list:
    """What a name given to a trace means: raw sites (str) and resolved standard names
    (``Resolved``). A raw name is itself; a name in the standard grammar (``layers.5.mlp``,
    ``layers[5]``, the aliases) is the standard name; a module path without the leading
    ``model.`` (``layers.5.self_attn``, upstream mlxterp's keys) is that module's raw site. A
    name that could mean two things is an error naming both (docs/guide/names.md)."""
    if is_raw(name):
        return [name]
    arch = model.architecture
    try:
        parsed = parse(name)
    except UnknownNameError:
        parsed = None
    if parsed is not None and arch is not None:
        try:
            return arch.resolve(parsed)
        except UnknownNameError as missing:
            modules = short_sites(model.model, name)
            if not modules:
                raise
            raise UnknownNameError(
                f"{name!r} could mean the standard name {parsed}, which this {arch.family} model lacks ({missing}), "
                f"or the module {modules[0]}: write {modules[0]!r} for the module."
            ) from None
    modules = short_sites(model.model, name)
    if len(modules) == 1:
        return modules
    if modules:
        raise UnknownNameError(f"{name!r} could mean {' or '.join(modules)}: write the one you mean in full.")
    if parsed is not None or arch is not None:
        return model.architecture_or_raise(name).resolve(name)  # the errors of standard names
    raise UnknownNameError(
        f"{name!r} is neither a standard name nor a module of this {type(model.model).__name__}; raw names are "
        "'model.' + a module path (model.module_names())." + did_you_mean(name, model.site_names())
    )


def _site(resolved) -> str:
    """The raw site of what :func:`resolve_name` returns."""
    return resolved if isinstance(resolved, str) else resolved.site


def active_traces(model: InterpretableModel) -> list[Trace]:
    """The model's traces whose ``with`` block is running, innermost last (``model.output``
    reads the innermost)."""
    return _ACTIVE.setdefault(model, [])


def _cached_names(hooks: Hooks) -> tuple[list[str] | None, dict[str, str], dict[str, list], NameSet | None]:
    """``hooks._resolve_names()``, remembered per model, keyed by the request's names and
    checked against the model's current architecture. The result is shared: never mutate it."""
    model = hooks._model
    given = hooks._capture_given
    if given is not None and not isinstance(given, (list, tuple)):
        return hooks._resolve_names()  # an iterator can be read once: remember nothing
    key = (None if given is None else tuple(given), tuple(hooks._interventions))
    try:
        hash(key)
    except TypeError:  # not names: let the resolution report it
        return hooks._resolve_names()
    cache = _NAMES.get(model)
    if cache is None or cache[0] is not model.architecture:
        cache = _NAMES[model] = (model.architecture, {})
    names = cache[1].get(key)
    if names is None:
        names = hooks._resolve_names()  # raises on an unknown name: nothing is remembered
        if len(cache[1]) >= _NAMES_CACHE_SIZE:
            cache[1].clear()
        cache[1][key] = names
    return names


def _sites_shown(activations: Activations, n: int = 3) -> str:
    """': name (shape), ...' for the first n recorded sites (the model output last)."""
    names = [name for name in activations if name != MODEL_OUTPUT][:n]
    if not names:
        return ""

    def shape(name: str) -> str:
        value = activations[name]
        return "x".join(map(str, value.shape)) if isinstance(value, mx.array) else type(value).__name__

    more = ", ..." if len(activations) > len(names) + (MODEL_OUTPUT in activations) else ""
    return ": " + ", ".join(f"{name} ({shape(name)})" for name in names) + more


class _LayerAccessor:
    def __init__(self, trace: Trace, sub: str):
        self._trace, self._sub = trace, sub

    def __getitem__(self, layer: int) -> mx.array:
        return self._trace.activations[f"layers.{layer}.{self._sub}"]


def _modules_to_probe(root: nn.Module, names: list[str], capture_all: bool):
    """(path, module) for every module a wanted name can refer to, and the attention modules
    whose patterns are wanted (path -> module).

    Exact names are looked up by their path alone, so a trace that asks for a few sites costs
    a few lookups, not a walk of the whole model. Unknown names fail here, before anything
    runs.
    """
    paths, pattern_paths, globs = _split_names(tuple(names))
    if paths is not None:  # every exact name is well formed: look their modules up
        exact = {}
        for path, name in paths:
            module = locate_module(root, path)
            if module is None:
                _check_exact([name], root)  # raises, with suggestions
            exact[path] = module
    else:
        exact = _check_exact([n for n in names if not is_glob(n)], root)
    patterns = {path: exact[path] for path in pattern_paths}
    if not capture_all and not globs:
        return list(exact.items()), patterns
    sites = walk_modules(root)[1:]
    paths = [path for path, _ in sites]
    for name in globs:
        part = module_part(name)
        matched = [p for p in paths if fnmatch.fnmatchcase(p, part)]
        if not matched and not fnmatch.fnmatchcase(MODEL_OUTPUT, name):
            raise UnknownNameError(f"pattern {name!r} matches no site of this model." + did_you_mean(part, paths))
        if name.endswith(PATTERN_PORT):
            by_path = dict(sites)
            patterns.update({p: by_path[p] for p in matched})
    if capture_all:
        return sites, patterns
    wanted = NameSet([module_part(n) for n in names])
    return [(path, m) for path, m in sites if path in wanted], patterns


@functools.lru_cache(maxsize=1024)
def _split_names(names: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...] | None, tuple[str, ...], tuple[str, ...]]:
    """The names a trace probes, sorted out once per tuple of names (a function of the
    strings alone): ((module path, the first exact name on it) for every path, in order;
    or None if some exact name breaks the site grammar), the module paths of exact
    ':pattern' names, and the glob names."""
    paths: dict[str, str] = {}
    well_formed = True
    for name in names:
        if is_glob(name):
            continue
        path, ok = exact_site(name)
        well_formed = well_formed and ok
        if path is not None:
            paths.setdefault(path, name)
    patterns = tuple(module_part(n) for n in names if n.endswith(PATTERN_PORT) and not is_glob(n))
    globs = tuple(n for n in names if is_glob(n))
    return (tuple(paths.items()) if well_formed else None), patterns, globs


def _check_exact(names: list[str], root: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module for exact site names; an unknown name fails with suggestions."""
    found: dict[str, nn.Module] = {}
    for name in names:
        path, well_formed = exact_site(name)
        if path is None:
            continue
        module = locate_module(root, path) if well_formed else None
        if module is None:
            known = [p for p, _ in walk_modules(root)[1:]]
            raise UnknownNameError(
                f"no site named {name!r} in this model. Raw names are 'model.' + a module "
                "path, optionally followed by '#k' (k-th call) and ':input' (or ':pattern')."
                + did_you_mean(name, static_site_names(known))
            )
        found[path] = module
    return found


def _calls_summary(recorder: Recorder, name: str) -> str:
    part = module_part(name)
    counts = [f"{p} x{n + 1}" for p, n in recorder.calls.items() if fnmatch.fnmatchcase(p, part)]
    return ", ".join(counts[:5]) or "none"
