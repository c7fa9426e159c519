"""The SAE: a sparse autoencoder (or transcoder) in SAELens's tensor names and orientation,
in MLX, and the splice that puts it into a trace.

Shapes (``x @ W_enc`` convention, no transposes): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``,
``W_dec (d_sae, d_out)``, ``b_dec (d_out,)`` with ``d_out = d_in`` for an SAE; ``threshold
(d_sae,)`` for JumpReLU; ``b_gate``, ``b_mag``, ``r_mag (d_sae,)`` (and no ``b_enc``) for Gated;
``W_skip (d_out, d_in)`` for a skip transcoder.

Encode (SAELens ``process_sae_in`` then the architecture)::

    x~ = normalise(x) - b_dec * apply_b_dec_to_input
    h  = x~ @ W_enc + b_enc                          # the pre-activations ('pre')
    standard / transcoder:  f = ReLU(h)
    jumprelu:               f = ReLU(h) * [h > threshold]   (strict)
    topk:                   f = ReLU of the k largest h, zero elsewhere (exactly k chosen)
    gated:                  f = [x~ @ W_enc + b_gate > 0] * ReLU(x~ @ (W_enc * exp(r_mag)) + b_mag)

Decode: ``x^ = f @ W_dec + b_dec`` (``+ x @ W_skip.T`` for a skip transcoder), then the
normalisation undone (SAEs only). Everything runs in float32 on activations cast up; the
model's weights are never touched, so quantized models work.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp_core.errors import MlxterpError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
SUB_SITES = ("pre", "features", "recons", "error")


class SAEError(MlxterpError, ValueError):
    """An SAE that cannot be built, loaded or spliced as asked."""


@attrs.frozen
class SAEConfig:
    """What an SAE is, beyond its tensors (the fields of a SAELens v6 ``cfg.json``).

    ``site`` / ``site_out`` are mlxterp standard names (``layers.8.output``); ``hook_name`` /
    ``hook_name_out`` the same sites in TransformerLens vocabulary, as SAELens stores them.
    ``metadata`` keeps every other field of the file so that saving writes it back.
    """

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    site: str | None = None
    site_out: str | None = None
    hook_name: str | None = None
    hook_name_out: str | None = None
    model_name: str | None = None
    context_size: int | None = None
    prepend_bos: bool = True
    dtype: str = "float32"
    metadata: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS


class SAE(nn.Module):
    """A sparse autoencoder (or transcoder): ``encode``, ``decode``, ``sae(x)``, and a splice.

    Give it to ``model.trace(text, saes=[sae])``: the site ``sae.site`` is replaced by
    ``decode(f) + error`` with ``error = x - decode(encode(x))`` computed before any edit, so
    an unedited splice changes nothing and editing feature ``i`` by ``delta`` moves the site by
    exactly ``delta * W_dec[i]``. Its sub-sites ``<site>.sae.pre``, ``.sae.features``,
    ``.sae.recons`` and ``.sae.error`` are readable and interventable like any site.
    ``sae.with_error_term(False)`` splices the reconstruction alone.
    """

    prefix = "sae"
    sub_sites = SUB_SITES

    def __init__(self, cfg: SAEConfig, weights: dict[str, mx.array] | None = None):
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {cfg.architecture!r}; mlxterp reads {', '.join(ARCHITECTURES)} "
                "(BatchTopK SAEs are saved as 'jumprelu')."
            )
        if cfg.normalize_activations not in NORMALISATIONS:
            raise SAEError(f"unknown normalize_activations {cfg.normalize_activations!r}; known: {', '.join(NORMALISATIONS)}.")
        if cfg.architecture == "topk" and not cfg.k:
            raise SAEError("a topk SAE needs k (cfg field 'k').")
        if cfg.is_transcoder and cfg.apply_b_dec_to_input:
            raise SAEError("a transcoder has apply_b_dec_to_input=False (b_dec lives in the output space).")
        self.cfg = cfg
        self.use_error_term = True
        self.log_sparsity = None  # log10 feature densities, when a file or a training run gave them
        d_out = cfg.d_out or cfg.d_in
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, d_out), "b_dec": (d_out,)}
        if cfg.architecture == "gated":
            shapes.update(b_gate=(cfg.d_sae,), b_mag=(cfg.d_sae,), r_mag=(cfg.d_sae,))
        else:
            shapes["b_enc"] = (cfg.d_sae,)
        if cfg.architecture in ("jumprelu", "jumprelu_transcoder"):
            shapes["threshold"] = (cfg.d_sae,)
        if cfg.architecture == "skip_transcoder":
            shapes["W_skip"] = (d_out, cfg.d_in)
        weights = dict(weights or {})
        missing = [name for name in shapes if name not in weights]
        if weights and missing:
            raise SAEError(f"{cfg.architecture} SAE weights lack {', '.join(missing)} (have {', '.join(sorted(weights))}).")
        for name, shape in shapes.items():
            value = weights.get(name, mx.zeros(shape))
            if tuple(value.shape) != shape:
                raise SAEError(
                    f"tensor {name} has shape {tuple(value.shape)}, expected {shape} for d_in={cfg.d_in}, "
                    f"d_sae={cfg.d_sae}" + (f", d_out={d_out}" if cfg.is_transcoder else "") + "."
                )
            setattr(self, name, value.astype(mx.float32))
        object.__setattr__(self, "tensor_names", tuple(shapes))
        if cfg.rescale_acts_by_decoder_norm:
            self._fold_rescale()

    # -- the splice protocol (mlxterp_core.splice) ---------------------------------------

    @property
    def site(self) -> str:
        """The site whose tensor the splice replaces (a transcoder's output site)."""
        name = self.cfg.site_out if self.cfg.is_transcoder else self.cfg.site
        if name is None:
            raise SAEError(
                "this SAE does not say which site it reads: load it with site='layers.8.output' "
                "(or set cfg hook_name)."
            )
        return name

    @property
    def reads(self) -> str | None:
        return self.cfg.site if self.cfg.is_transcoder else None

    def splice(self, x: mx.array, visit, source: mx.array | None) -> mx.array:
        """``decode(f) + error`` at the site (see the class docstring); ``x`` is the site's tensor."""
        inputs = source if self.cfg.is_transcoder else x
        x_in = self._flat(inputs, self.cfg.d_in, "input")
        target = self._flat(x, self.cfg.d_out or self.cfg.d_in, "output")
        pre_clean = self.pre_acts(x_in)
        f_clean = self.activation(pre_clean, x_in)
        pre = visit("pre", pre_clean)
        f = visit("features", f_clean if pre is pre_clean else self.activation(pre, x_in))
        recons_clean = self.decode(f_clean, x_in)
        recons = visit("recons", recons_clean if f is f_clean else self.decode(f, x_in))
        error_clean = target - recons_clean
        error = visit("error", error_clean)
        if self.use_error_term:
            if recons is recons_clean and error is error_clean:
                return x  # decode(f) + (x - decode(f)) is x: exactly, not to rounding
            # = recons + error, written as x plus the edits' changes so that what no edit
            # touched stays exactly x (not x to float rounding)
            out = target
            if recons is not recons_clean:
                out = out + (recons - recons_clean)
            if error is not error_clean:
                out = out + (error - error_clean)
        else:
            out = recons
        return out.reshape(x.shape).astype(x.dtype)

    def with_error_term(self, on: bool = True) -> SAE:
        """The same SAE (weights shared) splicing with or without the error term."""
        other = copy.copy(self)
        other.use_error_term = on
        return other

    def _flat(self, x: mx.array, width: int, what: str) -> mx.array:
        if not isinstance(x, mx.array):
            try:
                x = mx.array(x)
            except (TypeError, ValueError):
                x = None
        if x is None or x.ndim == 0 or not (mx.issubdtype(x.dtype, mx.number) or x.dtype == mx.bool_):
            raise SAEError(f"SAE {what}: expected an array of numbers (..., {width}), got {type(x).__name__}.")
        if x.ndim == 4 and x.shape[-1] * x.shape[-2] == width:  # hook_z SAEs: (B, T, H, D)
            x = x.reshape(*x.shape[:-2], width)
        if x.shape[-1] != width:
            name = self.cfg.site if what == "input" else self.site
            raise SAEError(
                f"SAE {what} width {width} does not match the site {name} (last axis {x.shape[-1]}, shape "
                f"{tuple(x.shape)}): this SAE was trained for another model or site."
            )
        return x.astype(mx.float32)

    # -- maths ---------------------------------------------------------------------------

    def pre_acts(self, x: mx.array) -> mx.array:
        """(..., d_in) -> (..., d_sae): ``h`` (for Gated, the magnitude path's pre-activation)."""
        x = self._normalise(self._flat(x, self.cfg.d_in, "input"))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.cfg.architecture == "gated":
            return x @ (self.W_enc * mx.exp(self.r_mag)) + self.b_mag
        return x @ self.W_enc + self.b_enc

    def activation(self, h: mx.array, x: mx.array | None = None) -> mx.array:
        """Features from pre-activations (Gated needs the input ``x`` for its gate)."""
        arch = self.cfg.architecture
        if arch in ("standard", "transcoder", "skip_transcoder"):
            return nn.relu(h)
        if arch in ("jumprelu", "jumprelu_transcoder"):
            return mx.where(h > self.threshold, nn.relu(h), 0.0)
        if arch == "topk":
            return topk_relu(h, self.cfg.k)
        # gated: the gate is its own linear map of the input
        if x is None:
            raise SAEError("a gated SAE's activation needs the input x for its gate: use encode(x).")
        x = self._normalise(x.astype(mx.float32))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        gate = (x @ self.W_enc + self.b_gate) > 0
        return mx.where(gate, nn.relu(h), 0.0)

    def encode(self, x: mx.array) -> mx.array:
        """(..., d_in) -> (..., d_sae) float32 feature activations."""
        x = self._flat(x, self.cfg.d_in, "input")
        return self.activation(self.pre_acts(x), x)

    def decode(self, f: mx.array, x: mx.array | None = None) -> mx.array:
        """(..., d_sae) -> (..., d_out) float32. ``x`` (the input) is needed by skip
        transcoders and by SAEs that normalise their input per token."""
        out = self._flat(f, self.cfg.d_sae, "features") @ self.W_dec + self.b_dec
        if self.cfg.architecture == "skip_transcoder":
            if x is None:
                raise SAEError("a skip transcoder's decode needs the input x: decode(f, x).")
            out = out + x.astype(mx.float32) @ self.W_skip.T
        if not self.cfg.is_transcoder:
            out = self._denormalise(out, x)
        return out

    def __call__(self, x: mx.array) -> mx.array:
        """The reconstruction ``decode(encode(x))`` (a transcoder's prediction of its output site)."""
        x = self._flat(x, self.cfg.d_in, "input")
        return self.decode(self.encode(x), x)

    def _normalise(self, x: mx.array) -> mx.array:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (math.sqrt(self.cfg.d_in) / mx.linalg.norm(x, axis=-1, keepdims=True))
        if mode == "layer_norm":
            mu = x.mean(axis=-1, keepdims=True)
            return (x - mu) / (_torch_std(x) + 1e-5)
        return x

    def _denormalise(self, out: mx.array, x: mx.array | None) -> mx.array:
        mode = self.cfg.normalize_activations
        if mode not in ("constant_norm_rescale", "layer_norm"):
            return out
        if x is None:
            raise SAEError(f"this SAE normalises each input ({mode}); decode needs it: decode(f, x).")
        x = x.astype(mx.float32)
        if mode == "constant_norm_rescale":
            return out / (math.sqrt(self.cfg.d_in) / mx.linalg.norm(x, axis=-1, keepdims=True))
        return out * (_torch_std(x) + 1e-5) + x.mean(axis=-1, keepdims=True)

    # -- weights -------------------------------------------------------------------------

    def _fold_rescale(self) -> None:
        """TopK with ``rescale_acts_by_decoder_norm``: fold the decoder norms into the encoder
        (SAELens ``fold_W_dec_norm``) so that features are unchanged and W_dec rows have unit
        norm; the rescale is then a no-op and is switched off."""
        norms = mx.linalg.norm(self.W_dec, axis=-1)
        safe = mx.where(norms > 0, norms, 1.0)
        self.W_dec = self.W_dec / safe[:, None]
        self.W_enc = self.W_enc * safe[None, :]
        self.b_enc = self.b_enc * safe
        self.cfg = attrs.evolve(self.cfg, rescale_acts_by_decoder_norm=False)

    def fold_W_dec_norm(self) -> SAE:
        """Make every W_dec row unit norm without changing any reconstruction (in place)."""
        if self.cfg.architecture == "topk":
            raise SAEError(
                "folding decoder norms changes which k features a TopK SAE picks; TopK SAEs keep "
                "their decoder as trained (SAELens refuses this too)."
            )
        norms = mx.linalg.norm(self.W_dec, axis=-1)
        safe = mx.where(norms > 0, norms, 1.0)
        self.W_dec = self.W_dec / safe[:, None]
        self.W_enc = self.W_enc * safe[None, :]
        if self.cfg.architecture == "gated":
            self.b_gate = self.b_gate * safe
            self.b_mag = self.b_mag * safe
        else:
            self.b_enc = self.b_enc * safe
        if "threshold" in self:
            self.threshold = self.threshold * safe
        return self

    def state_dict(self) -> dict[str, mx.array]:
        """The tensors by their SAELens names."""
        return {name: self[name] for name in self.tensor_names}

    def save(self, path, sparsity: mx.array | None = None):
        """Write a SAELens v6 folder (cfg.json, sae_weights.safetensors[, sparsity.safetensors])."""
        from .formats import save_sae

        return save_sae(self, path, sparsity=sparsity)

    def evaluate(self, model, texts, **options):
        """L0, explained variance, MSE, dead/dense fractions, CE loss recovered and KL of this
        SAE spliced into ``model`` on ``texts``: an :class:`~mlxterp_saes.evaluate.SAEEvaluation`."""
        from .evaluate import evaluate

        return evaluate(self, model, texts, **options)

    # -- features ------------------------------------------------------------------------

    def top_activations(self, model, texts, features, **options):
        """Top-activating contexts, quantiles and density of ``features`` over ``texts``
        (:func:`mlxterp_saes.features.top_activations`)."""
        from .features import top_activations

        return top_activations(self, model, texts, features, **options)

    def steer(self, feature: int, scale: float, positions=None) -> dict:
        """Interventions adding ``scale * W_dec[feature]`` at the site (for trace / generate)."""
        from .features import steer

        return steer(self, feature, scale, positions)

    def ablate(self, features, value: float = 0.0, positions=None) -> dict:
        """Interventions setting ``features`` to ``value`` through the splice (use with saes=[sae])."""
        from .features import ablate

        return ablate(self, features, value, positions)

    def attribution(self, model, text, metric=None, answer=None, top: int = 10):
        """Gradient x activation of a metric to every feature and the error term
        (:func:`mlxterp_saes.features.feature_attribution`)."""
        from .features import feature_attribution

        return feature_attribution(self, model, text, metric=metric, answer=answer, top=top)

    def feature_name(self, sub: str = "features") -> str:
        """The trace name of one of this SAE's sub-sites: ``layers.8.output.sae.features``."""
        if sub not in SUB_SITES:
            raise SAEError(f"an SAE's sub-sites are {', '.join(SUB_SITES)}; got {sub!r}.")
        return f"{self.site}.{self.prefix}.{sub}"

    def direction(self, feature: int) -> mx.array:
        """W_dec[feature], (d_out,): what one unit of the feature adds to the site."""
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
            raise SAEError(f"feature={feature!r:.40}: expected a feature index (an int).")
        if not 0 <= int(feature) < self.cfg.d_sae:
            raise SAEError(f"feature {feature} is out of range: this SAE has {self.cfg.d_sae} features (0..{self.cfg.d_sae - 1}).")
        return self.W_dec[int(feature)]

    def __repr__(self) -> str:
        c = self.cfg
        what = f"{c.site} -> {c.site_out}" if c.is_transcoder else c.site
        extra = f", k={c.k}" if c.k else ""
        return f"SAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}, site={what})"


def topk_relu(h: mx.array, k: int) -> mx.array:
    """ReLU of the k largest entries of the last axis, zero elsewhere; exactly k chosen even
    when values tie."""
    k = int(k)
    if k >= h.shape[-1]:
        return nn.relu(h)
    index = mx.stop_gradient(mx.argpartition(-h, kth=k - 1, axis=-1)[..., :k])
    values = nn.relu(mx.take_along_axis(h, index, axis=-1))
    return mx.put_along_axis(mx.zeros_like(h), index, values, axis=-1)


def _torch_std(x: mx.array) -> mx.array:
    """Standard deviation over the last axis with Bessel's correction (torch's default)."""
    n = x.shape[-1]
    return mx.sqrt(mx.var(x, axis=-1, keepdims=True) * n / max(n - 1, 1))
