"""The local replacement model of one prompt: the model with its attention patterns and
normalisation scales frozen at their values on the prompt, and every MLP output replaced by
transcoder features plus an error node (circuit-tracer's construction,
Ameisen et al. 2025).

One clean forward pass (:class:`Replacement`) records what the replacement model freezes: each
layer's attention probabilities, each normalisation's input, output and scale, each MLP's input
(the site the transcoders read) and output, the token embeddings and the logits; from them the
transcoder features (position 0 zeroed), the reconstructions and the error vectors.

:meth:`Replacement.frozen_pass` then runs the *frozen* model on any number of copies of the
prompt, as a function of additive vectors written at every MLP output and at the embedding:

- attention probabilities are the clean ones (constants);
- a normalisation returns its clean output plus ``gain * C(x - x_clean) * scale_clean``, with
  ``C`` the centring of a LayerNorm (identity for an RMSNorm): the denominator is frozen, the
  numerator live;
- an MLP returns its clean output plus the change of the transcoder's linear skip (if any)
  plus what is written there;
- the embedding returns its value plus what is written there.

The frozen model is linear in what is written, so its gradient is the direct effect of a
source on a target (the attribution graph's edges, :mod:`.attribution`), and writing a feature's
decoder rows into it is circuit-tracer's constrained ``feature_intervention``. Everything the
frozen pass does not need (the MLPs, the attention scores) is never computed: MLX evaluates
only what the result depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlxterp.plugin import Hooks, InputError, MlxterpError, locate_module, module_part

NORM_KINDS = ("rms", "rms_offset", "layer")  # x*s*g, x*s*(1+g) (Gemma), (x-mean)*s*g + b


class GraphError(MlxterpError, ValueError):
    """An attribution graph or feature intervention that cannot be computed as asked, and why."""


class FrozenNorm:
    """A normalisation module's clean input, output and per-token scale, and the linear map it
    applies with that scale frozen."""

    def __init__(self, path: str, kind: str, gain: mx.array | None, eps: float, x: mx.array, y: mx.array):
        self.path, self.kind, self.gain, self.eps = path, kind, gain, eps
        self.x_clean = x.astype(mx.float32)
        self.y_clean = y
        centred = self._centre(self.x_clean)
        self.scale = mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + eps)

    def _centre(self, x: mx.array) -> mx.array:
        return x - mx.mean(x, axis=-1, keepdims=True) if self.kind == "layer" else x

    def linear(self, dx: mx.array) -> mx.array:
        """The frozen norm's change for an input change ``dx`` (float32)."""
        out = self._centre(dx) * self.scale
        if self.gain is not None:
            out = out * (1 + self.gain if self.kind == "rms_offset" else self.gain)
        return out

    def frozen(self, x: mx.array) -> mx.array:
        """Its output for input ``x`` with the clean scale: exactly the clean output when ``x``
        is the clean input."""
        return (self.y_clean.astype(mx.float32) + self.linear(x.astype(mx.float32) - self.x_clean)).astype(self.y_clean.dtype)


def fingerprint(module, path: str, x: mx.array, y: mx.array) -> FrozenNorm:
    """How ``module`` normalises, told from its clean input ``x`` and output ``y``: an RMSNorm
    with gain ``g`` or ``1 + g``, or a LayerNorm (gain and bias optional). A module that is none
    of these is a GraphError (its scale cannot be frozen)."""
    xf, yf = x.astype(mx.float32), y.astype(mx.float32)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
    tolerance = 1e-4 + (1e-3 if y.dtype == mx.float32 else 2e-2) * float(mx.max(mx.abs(yf)).item())
    best = None
    for kind in NORM_KINDS:
        gain = None if weight is None else weight.astype(mx.float32)
        if kind == "rms_offset" and gain is None:
            continue
        candidate = FrozenNorm(path, kind, gain, eps, xf, yf)
        out = candidate.linear(xf)
        if kind == "layer" and bias is not None:
            out = out + bias.astype(mx.float32)
        error = float(mx.max(mx.abs(out - yf)).item())
        if best is None or error < best[0]:
            best = (error, candidate)
    if best is None or best[0] > tolerance:
        raise GraphError(
            f"{path} ({type(module).__name__}) normalises in a way attribution graphs do not know (not an RMSNorm or "
            f"a LayerNorm: the closest differs by {best[0] if best else float('nan'):.3g}); its scale cannot be frozen."
        )
    norm = best[1]
    norm.y_clean = y
    return norm


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


class Replacement:
    """The replacement model of ``ids`` (one prompt, BOS first) with transcoders ``tc``: the
    clean pass's values and the frozen model (see the module doc).

    Attributes: ``ids``; ``logits`` (T, V) numpy float32; ``reads`` (float32) and ``mlp_out``,
    {layer: (T, d)}; ``embed`` and ``final`` (the final norm's output) (T, d); ``patterns``
    {attention site: (1, H, T, T)}; ``norms`` {norm site: :class:`FrozenNorm`}; ``pre``
    {layer: (T, F)} the transcoder pre-activations and ``post`` the features (position 0
    zeroed); ``errors`` (L, T, d) float32 (position 0 zeroed); these are mx arrays. ``active``
    (n, 3) numpy int32 (layer, pos, feature), lexicographic, and ``values`` (n,) float32.
    """

    zero_positions = 1  # circuit-tracer zeroes features and errors at position 0 (the BOS)

    def __init__(self, model, tc, ids: Sequence[int]):
        self.model, self.tc = model, tc
        arch = model.architecture_or_raise("attribution graphs")
        self.arch = arch
        self.n_layers, self.d_model = arch.n_layers, arch.d_model
        self.ids = [int(i) for i in ids]
        self.n_pos = len(self.ids)
        layers = range(self.n_layers)
        self.read_names = [f"layers.{layer}.{tc.reads}" for layer in layers]
        self.mlp_names = [f"layers.{layer}.mlp" for layer in layers]
        self.pattern_names = [f"layers.{layer}.attn.pattern" for layer in layers]
        resolve = lambda name: arch.resolve(name)[0]  # noqa: E731
        self._read = [resolve(n) for n in self.read_names]
        self._mlp = [resolve(n) for n in self.mlp_names]
        self._pattern = [resolve(n) for n in self.pattern_names]
        self._embed = resolve("embed")
        self._final = resolve("ln_final")
        self.norm_paths = self._norm_paths()
        self._clean_pass()
        self._features()

    # -- the clean pass ------------------------------------------------------------------------

    def _norm_paths(self) -> list[str]:
        """Raw sites of the normalisations to freeze: every norm module outside the MLPs (whose
        outputs are frozen whole) and the attention modules (whose query and key norms only
        shape the frozen patterns)."""
        skip = [r.site for r in self._mlp]
        skip += [module_part(r.site) for r in self._pattern]  # the attention modules
        found = []
        for name, module in self.model.model.named_modules():
            site = "model." + name if name else "model"
            if not _is_norm(module):
                continue
            if any(site == m or site.startswith(m + ".") for m in skip):
                continue
            found.append(site)
        return sorted(found)

    def _clean_pass(self) -> None:
        capture = [*self.read_names, *self.mlp_names, *self.pattern_names, "embed", "ln_final", "logits"]
        capture += [p for path in self.norm_paths for p in (path, path + ":input")]
        with Hooks(self.model, {}, capture=capture) as hooks:
            _, rec = hooks(mx.array([self.ids]))
        self.logits = np.array(rec[self.arch.resolve("logits")[0].site][0].astype(mx.float32))
        self.reads = {i: r.read(rec[r.site])[0].astype(mx.float32) for i, r in enumerate(self._read)}
        self.mlp_out = {i: r.read(rec[r.site])[0] for i, r in enumerate(self._mlp)}
        self.patterns = {r.site: rec[r.site] for r in self._pattern}
        self.embed = rec[self._embed.site][0]
        self.final = rec[self._final.site][0]
        self.norms = {}
        for path in self.norm_paths:
            module = locate_module(self.model.model, path)
            self.norms[path] = fingerprint(module, path, rec[path + ":input"], rec[path])

    def _features(self) -> None:
        tc, z = self.tc, self.zero_positions
        keep = (mx.arange(self.n_pos) >= z)[:, None]
        self.pre = {layer: tc.pre_acts(self.reads[layer], layer) for layer in tc.layers}
        self.post = {layer: mx.where(keep, tc.activate(self.pre[layer], layer), 0.0) for layer in tc.layers}
        errors = []
        for layer in tc.layers:
            recons = tc.reconstruct(self.post, self.reads[layer], layer)
            errors.append(mx.where(keep, self.mlp_out[layer].astype(mx.float32) - recons, 0.0))
        self.errors = mx.stack(errors)
        mx.eval(self.pre, self.post, self.errors)
        post = np.stack([np.array(self.post[layer]) for layer in tc.layers])  # (L, T, F)
        self.active = np.argwhere(post != 0).astype(np.int32)  # lexicographic (layer, pos, feature)
        self.values = post[tuple(self.active.T)].astype(np.float32)

    # -- the frozen model ----------------------------------------------------------------------

    def frozen_pass(self, n_rows: int, writes: dict[int, mx.array] | None = None, embed_write: mx.array | None = None,
                    targets: Sequence[str] = (), stop_after: str | None = None) -> dict[str, mx.array]:
        """Run the frozen model on ``n_rows`` copies of the prompt with ``writes[layer]``
        (n_rows, T, d) added at MLP outputs and ``embed_write`` at the embedding; returns the
        values of the standard names ``targets`` (lazy, float32, (n_rows, T, d))."""
        writes = writes or {}
        tc, hooks_box = self.tc, {}
        interventions: dict[str, Any] = {}

        def freeze_pattern(site):
            clean = self.patterns[site]
            return lambda p: mx.broadcast_to(clean, p.shape).astype(p.dtype)

        for r in self._pattern:
            interventions[r.name] = freeze_pattern(r.site)

        def keep_input(path):
            def fn(x):
                inputs[path] = x
                return x
            return fn

        inputs: dict[str, mx.array] = {}
        for path, norm in self.norms.items():
            interventions[path + ":input"] = keep_input(path)
            interventions[path] = lambda y, norm=norm: norm.frozen(inputs[norm.path])

        def freeze_mlp(layer):
            clean = self.mlp_out[layer]
            read = self._read[layer]

            def fn(y):
                out = mx.broadcast_to(clean.astype(mx.float32), y.shape)
                if tc.skip:
                    x = read.read(hooks_box["hooks"].recorded[read.site]).astype(mx.float32)
                    out = out + tc.skip_term(x - self.reads[layer], layer)
                if layer in writes:
                    out = out + writes[layer]
                return out.astype(y.dtype)
            return fn

        for layer, r in enumerate(self._mlp):
            interventions[r.name] = freeze_mlp(layer)
        if embed_write is not None:
            interventions["embed"] = lambda e: (e.astype(mx.float32) + embed_write).astype(e.dtype)
        # the skip reads the live MLP input of every layer written before the stop
        last = self.n_layers if stop_after is None else next(
            (i for i, name in enumerate(self.read_names) if name == stop_after), self.n_layers)
        capture = [*(r.name for r in self._read[:last] if tc.skip), *targets]
        try:
            with Hooks(self.model, interventions, capture=list(dict.fromkeys(capture)), stop_after=stop_after) as hooks:
                hooks_box["hooks"] = hooks
                _, rec = hooks(mx.array([self.ids] * n_rows), evaluate=False)
        finally:  # the hooks hold the edits, which hold the box: emptied, no cycle keeps this pass's records alive
            hooks_box.clear()
        return {name: self.arch.resolve(name)[0].read(rec[self.arch.resolve(name)[0].site]).astype(mx.float32) for name in targets}


def prompt_ids(model, prompt) -> list[int]:
    """The prompt as token ids with a special token first, as circuit-tracer's
    ``ensure_tokenized``: text is encoded without added special tokens; ids are kept when the
    first is special, else the BOS (or pad, or end-of-sequence) id is prepended."""
    from mlxterp.plugin import token_ids

    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty: give the text (or token ids) to trace.")
        if tokenizer is None:
            raise InputError("this model has no tokenizer: give the prompt as token ids.")
        encoded = tokenizer.encode(prompt, add_special_tokens=False) if _accepts_special(tokenizer) else tokenizer.encode(prompt)
        ids = list(getattr(encoded, "ids", encoded))
        ids = token_ids(model, ids)
    else:
        ids = token_ids(model, prompt)
    if not ids:
        raise InputError("the prompt is empty: give the text (or token ids) to trace.")
    if tokenizer is None:
        return ids  # no way to tell a special token: position 0 is taken as the BOS
    specials = _special_ids(tokenizer)
    if ids[0] not in specials:
        first = next((getattr(tokenizer, a, None) for a in ("bos_token_id", "pad_token_id", "eos_token_id")
                      if getattr(tokenizer, a, None) is not None), None)
        if first is None:
            raise InputError(
                "attribution graphs start with a special token (circuit-tracer's convention: position 0 is not "
                "explained); this model's tokenizer has none to prepend: give ids that start with one."
            )
        ids = [int(first), *ids]
    return ids


def _accepts_special(tokenizer) -> bool:
    try:
        tokenizer.encode("a", add_special_tokens=False)
    except TypeError:
        return False
    return True


def _special_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    found = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("bos_token_id", "pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            found.add(value)
    return found
