"""Transcoders: sparse features that read an MLP's input and reconstruct its output.

A per-layer transcoder (PLT) at layer l: ``a = sigma(x_l @ W_enc^T + b_enc)`` from the MLP's
input ``x_l`` (``layers[l].ln2``, or ``layers[l].resid_mid`` as the file says), and
``y^_l = a @ W_dec + b_dec [+ skip]`` for the MLP's output (``layers[l].mlp``). A cross-layer
transcoder (CLT) has one encoder per layer and one decoder per pair (source l, target m >= l):
``y^_m = sum_{l <= m} a_l @ W_dec[l -> m] + b_dec_m [+ skip]``, features read at one layer
writing to the MLP outputs of that layer and every later one. Both are one class here: a PLT is
a CLT whose features write only to their own layer.

Weights keep circuit-tracer's conventions: ``W_enc[l]`` is (F, d) (the transpose of SAELens's),
``W_dec[l]`` is (F, targets, d) with slot t writing to the t-th covered layer from l (a PLT has
one slot), a PLT skip is applied as ``x @ W_skip.T`` and a CLT's as ``x @ W_skip`` (circuit-
tracer's own difference). sigma is ReLU, JumpReLU (``h * [h > threshold]``, per feature) or
TopK.

Spliced into a model (``model.trace(..., transcoders=tc)``, ``with model.transcoders(tc):``),
every covered MLP output becomes ``y^ + error`` with ``error = y - y^`` (on by default, so an
unedited splice changes nothing), and ``layers.l.mlp.transcoder.{pre,features,recons,error}``
are sites like any other: readable, interventable, differentiable. A CLT's features at layer l
are read by the splices of every later layer in the same forward pass: an edit of them moves
every later reconstruction by the feature's decoder rows there.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from mlxterp.plugin import Display, MlxterpError

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_SITES = ("ln2", "resid_mid")  # what a transcoder may read at its layer
SUB_SITES = ("pre", "features", "recons", "error")
PREFIX = "transcoder"


class TranscoderError(MlxterpError, ValueError):
    """Transcoders that cannot be loaded, built, spliced or trained as asked, and what to do."""


class Transcoders(Display):
    """A set of per-layer transcoders (``kind="plt"``) or a cross-layer transcoder
    (``kind="clt"``) over the MLPs of ``layers`` (see the module doc).

    Attributes:
        kind: "plt" or "clt".
        layers: the model layers covered, ascending.
        reads: the standard sub-name each layer's features read ("ln2" or "resid_mid").
        activation: "relu", "jumprelu" or "topk" (``k`` features per token and layer).
        W_enc, b_enc, threshold, W_dec, b_dec, W_skip: per covered layer (lists), as in the
            module doc; ``threshold`` and ``W_skip`` are None where absent.
        use_error_term: splice ``recons + error`` (True, exact) or ``recons`` alone.
        metadata: what the files said (model name, scan, ...).
    """

    def __init__(self, kind: str, layers: Sequence[int], W_enc: list[mx.array], b_enc: list[mx.array],
                 W_dec: list[mx.array], b_dec: list[mx.array], *, activation: str = "relu",
                 threshold: list[mx.array] | None = None, W_skip: list[mx.array] | None = None,
                 k: int | None = None, reads: str = "ln2", metadata: dict[str, Any] | None = None):
        if kind not in ("plt", "clt"):
            raise TranscoderError(f"kind={kind!r}: a transcoder set is 'plt' (per layer) or 'clt' (cross-layer).")
        if activation not in ACTIVATIONS:
            raise TranscoderError(f"activation={activation!r}: use one of {', '.join(ACTIVATIONS)}.")
        if reads not in INPUT_SITES:
            raise TranscoderError(f"reads={reads!r}: transcoders read one of {', '.join(INPUT_SITES)} (the MLP's input).")
        layers = [int(layer) for layer in layers]
        if not layers or layers != sorted(set(layers)):
            raise TranscoderError(f"layers {layers}: give the covered layers once each, ascending.")
        self.kind, self.layers, self.reads, self.activation, self.k = kind, layers, reads, activation, k
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = list(W_enc), list(b_enc), list(W_dec), list(b_dec)
        self.threshold = None if threshold is None else list(threshold)
        self.W_skip = None if W_skip is None else list(W_skip)
        self.metadata = dict(metadata or {})
        self.use_error_term = True
        self._pass: dict[int, tuple[mx.array, mx.array]] = {}  # covered index -> (features, unedited)
        self._check()

    # -- sizes -----------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return int(self.W_enc[0].shape[1])

    @property
    def d_features(self) -> int:
        """Features per layer."""
        return int(self.W_enc[0].shape[0])

    @property
    def n_features(self) -> int:
        """Features over every covered layer."""
        return self.d_features * len(self.layers)

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    def sites(self) -> list[tuple[str, str]]:
        """(read, written) standard names per covered layer: ``("layers.5.ln2", "layers.5.mlp")``."""
        return [(f"layers.{layer}.{self.reads}", f"layers.{layer}.mlp") for layer in self.layers]

    def _index(self, layer: int) -> int:
        if layer not in self.layers:
            raise TranscoderError(f"layer {layer} is not covered: these transcoders cover layers {self.layers}.")
        return self.layers.index(layer)

    def _check(self) -> None:
        n, f, d = len(self.layers), self.d_features, self.d_model
        lists = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                 "threshold": self.threshold, "W_skip": self.W_skip}
        for name, values in lists.items():
            if values is not None and len(values) != n:
                raise TranscoderError(f"{name} has {len(values)} layers; these transcoders cover {n} ({self.layers}).")
        for p in range(n):
            targets = 1 if self.kind == "plt" else n - p
            want = {"W_enc": (f, d), "b_enc": (f,), "W_dec": (f, targets, d), "b_dec": (d,), "threshold": (f,), "W_skip": (d, d)}
            for name, values in lists.items():
                if values is not None and tuple(values[p].shape) != want[name]:
                    raise TranscoderError(
                        f"{name} of layer {self.layers[p]} has shape {tuple(values[p].shape)}; expected {want[name]} "
                        f"({self.kind}, {f} features, d_model {d}{', decoders to ' + str(targets) + ' layers' if name == 'W_dec' else ''})."
                    )
        if self.activation == "jumprelu" and self.threshold is None:
            raise TranscoderError("a JumpReLU transcoder needs a threshold per feature.")
        if self.activation == "topk" and not (self.k and 1 <= self.k <= f):
            raise TranscoderError(f"a TopK transcoder needs k in [1, {f}], got {self.k!r}.")

    # -- maths -----------------------------------------------------------------------------

    def pre_acts(self, x: mx.array, layer: int) -> mx.array:
        """(..., d) -> (..., F): ``x @ W_enc^T + b_enc`` at ``layer`` (float32)."""
        p = self._index(layer)
        return x.astype(mx.float32) @ self.W_enc[p].T + self.b_enc[p]

    def activate(self, h: mx.array, layer: int) -> mx.array:
        """Features from pre-activations at ``layer``."""
        if self.activation == "relu":
            return mx.maximum(h, 0)
        if self.activation == "jumprelu":
            return mx.where(h > self.threshold[self._index(layer)], h, 0.0)
        from mlxterp_saes import topk_relu

        return topk_relu(h, self.k)

    def encode(self, x: mx.array, layer: int) -> mx.array:
        """(..., d) -> (..., F) feature activations at ``layer``."""
        return self.activate(self.pre_acts(x, layer), layer)

    def decode(self, features: dict[int, mx.array], layer: int) -> mx.array:
        """(..., d): the dictionary's output at ``layer``'s MLP from the features of every
        covered source layer up to it (a PLT: its own), ``+ b_dec``; no skip (see
        :meth:`reconstruct`)."""
        p = self._index(layer)
        out = self.b_dec[p]
        for q in range(p + 1) if self.kind == "clt" else (p,):
            source = self.layers[q]
            if source in features:
                out = out + features[source].astype(mx.float32) @ self.W_dec[q][:, p - q if self.kind == "clt" else 0]
        return out

    def skip_term(self, x: mx.array, layer: int) -> mx.array | None:
        """The linear skip's output at ``layer`` (None without one)."""
        if self.W_skip is None:
            return None
        W = self.W_skip[self._index(layer)]
        return x.astype(mx.float32) @ (W.T if self.kind == "plt" else W)

    def reconstruct(self, features: dict[int, mx.array], x: mx.array, layer: int) -> mx.array:
        """The prediction of ``layer``'s MLP output: :meth:`decode` plus the skip of its input ``x``."""
        out = self.decode(features, layer)
        skip = self.skip_term(x, layer)
        return out if skip is None else out + skip

    def __call__(self, inputs: dict[int, mx.array]) -> dict[int, mx.array]:
        """Every covered layer's reconstruction from its MLP input ({layer: (..., d)})."""
        features = {layer: self.encode(inputs[layer], layer) for layer in self.layers}
        return {layer: self.reconstruct(features, inputs[layer], layer) for layer in self.layers}

    def evaluate(self, model, texts, **options) -> Any:
        """``mlxterp.evaluate_transcoders(model, self, texts, **options)``: per-layer
        reconstruction and the replacement model's CE loss and KL (a TranscoderEvaluation)."""
        from .evaluate import evaluate_transcoders

        return evaluate_transcoders(model, self, texts, **options)

    def with_error_term(self, on: bool = True) -> Transcoders:
        """The same transcoders (weights shared) splicing with or without the error term."""
        other = copy.copy(self)
        other.use_error_term = on
        other._pass = {}
        return other

    # -- the splice protocol (mlxterp_core.splice) ------------------------------------------

    @property
    def splices(self) -> list[_LayerSplice]:
        """One splice per covered layer, at ``layers[l].mlp``."""
        return [_LayerSplice(self, layer) for layer in self.layers]

    # -- display ---------------------------------------------------------------------------

    def _summary(self) -> str:
        what = "cross-layer transcoder" if self.kind == "clt" else "per-layer transcoders"
        span = f"layers {self.layers[0]}..{self.layers[-1]}" if self.layers == list(range(self.layers[0], self.layers[-1] + 1)) else f"layers {self.layers}"
        act = f"topk k={self.k}" if self.activation == "topk" else self.activation
        skip = ", skip" if self.skip else ""
        return f"{what}, {span}, {self.d_features} features per layer x d_model {self.d_model}, {act}{skip}, reads {self.reads}"


class _LayerSplice:
    """The splice of one covered layer: at ``layers[l].mlp``, reading ``layers[l].<reads>``."""

    prefix = PREFIX
    sub_sites = SUB_SITES

    def __init__(self, tc: Transcoders, layer: int):
        self.tc, self.layer = tc, layer
        self.site = f"layers.{layer}.mlp"
        self.reads = f"layers.{layer}.{tc.reads}"

    def splice(self, x: mx.array, visit, source: mx.array) -> mx.array:
        tc, layer = self.tc, self.layer
        state = tc._pass
        if layer == tc.layers[0]:
            state.clear()  # a new forward pass
        pre_clean = tc.pre_acts(source, layer)
        f_clean = tc.activate(pre_clean, layer)
        pre = visit("pre", pre_clean)
        f = visit("features", f_clean if pre is pre_clean else tc.activate(pre, layer))
        state[layer] = (f, f_clean)
        sources = [q for q in state if q <= layer] if tc.kind == "clt" else [layer]
        recons_clean = tc.reconstruct({q: state[q][1] for q in sources}, source, layer)
        edited = any(state[q][0] is not state[q][1] for q in sources)
        recons_now = tc.reconstruct({q: state[q][0] for q in sources}, source, layer) if edited else recons_clean
        recons = visit("recons", recons_now)
        target = x.astype(mx.float32)
        error_clean = target - recons_clean
        error = visit("error", error_clean)
        if not tc.use_error_term:
            return recons.astype(x.dtype)
        if recons is recons_clean and error is error_clean:
            return x  # recons + (x - recons) is x: exactly, not to rounding
        out = target  # = recons + error, as x plus what the edits changed
        if recons is not recons_clean:
            out = out + (recons - recons_clean)
        if error is not error_clean:
            out = out + (error - error_clean)
        return out.astype(x.dtype)
