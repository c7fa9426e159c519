"""The SAE: a sparse autoencoder (or transcoder) in SAELens's tensor names and orientation,
in MLX, and the splice that puts it into a trace.

Shapes (``x @ W_enc`` convention, no transposes): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``,
``W_dec (d_sae, d_out)``, ``b_dec (d_out,)`` with ``d_out = d_in`` for an SAE; an architecture
may add or replace some (``threshold (d_sae,)`` for JumpReLU, ``W_skip`` for a skip transcoder).

Encode (SAELens ``process_sae_in`` then the architecture)::

    x~ = normalise(x) - b_dec * apply_b_dec_to_input
    h  = x~ @ W_enc + b_enc                          # the pre-activations ('pre')
    f  = the architecture's activation of h          # standard: ReLU(h)

Decode: ``x^ = f @ W_dec + b_dec``, then the normalisation undone (SAEs only). A skip
transcoder's output adds ``x @ W_skip.T`` to that (:meth:`SAE.reconstruct`; SAELens's
``forward``), while its ``decode`` is the dictionary alone, as SAELens's is. What is specific
to each architecture lives in its module of
:mod:`mlxterp_saes.architectures`. Everything runs in float32 on activations cast up; the
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

from mlxterp.plugin import Display, UnknownNameError, transformerlens_name

from .architectures import Architecture, get_architecture
from .architectures.base import SAEError

# covariance_whitening: SAELens trains on whitened inputs and folds the whitening into the
# weights before saving; at inference it applies nothing (the identity), and so do we
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in", "covariance_whitening")
RESHAPES = ("none", "hook_z")
SUB_SITES = ("pre", "features", "recons", "error")


@attrs.frozen
class SAEConfig:
    """What an SAE is, beyond its tensors (the fields of a SAELens v6 ``cfg.json``).

    ``site`` / ``site_out`` are mlxterp standard names (``layers.8.output``); ``hook_name`` /
    ``hook_name_out`` the same sites in TransformerLens vocabulary, as SAELens stores them.
    ``reshape_activations`` is SAELens's ("hook_z": the SAE reads attention heads, (..., H, D));
    None derives it from the site (see :attr:`reshape`). ``metadata`` keeps every other field
    of the file so that saving writes it back.
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
    reshape_activations: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_transcoder(self) -> bool:
        return get_architecture(self.architecture).transcoder

    @property
    def reshape(self) -> str:
        """SAELens's ``reshape_activations``: as given (a file's value is kept), else "hook_z"
        for an SAE whose TransformerLens hook name (given, or that of ``site``) ends in
        ``hook_z``, else "none". Transcoders never reshape."""
        if self.reshape_activations is not None:
            return self.reshape_activations
        hook = self.hook_name or (self.site and hook_name_of(self.site)) or ""
        return "hook_z" if hook.endswith("hook_z") and not self.is_transcoder else "none"


class SAE(Display, nn.Module):
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
        arch = get_architecture(cfg.architecture)
        if cfg.normalize_activations not in NORMALISATIONS:
            raise SAEError(f"unknown normalize_activations {cfg.normalize_activations!r}; known: {', '.join(NORMALISATIONS)}.")
        if cfg.reshape_activations not in (None, *RESHAPES):
            raise SAEError(f"unknown reshape_activations {cfg.reshape_activations!r}; known: {', '.join(RESHAPES)}.")
        arch.check_config(cfg)
        if arch.transcoder and cfg.apply_b_dec_to_input:
            raise SAEError("a transcoder has apply_b_dec_to_input=False (b_dec lives in the output space).")
        self.cfg = cfg
        self.use_error_term = True
        self.log_sparsity = None  # log10 feature densities, when a file or a training run gave them
        d_out = cfg.d_out or cfg.d_in
        shapes = arch.tensors(cfg)
        weights = dict(weights or {})
        missing = [name for name in shapes if name not in weights]
        if weights and missing:
            raise SAEError(f"{cfg.architecture} SAE weights lack {', '.join(missing)} (have {', '.join(sorted(weights))}).")
        for name, shape in shapes.items():
            value = weights.get(name, mx.zeros(shape))
            if tuple(value.shape) != shape:
                raise SAEError(
                    f"tensor {name} has shape {tuple(value.shape)}, expected {shape} for d_in={cfg.d_in}, "
                    f"d_sae={cfg.d_sae}" + (f", d_out={d_out}" if arch.transcoder else "") + "."
                )
            setattr(self, name, value.astype(mx.float32))
        object.__setattr__(self, "tensor_names", tuple(shapes))
        self.d_head = None  # hook_z SAEs: the head size of the last (..., H, D) input encoded
        if cfg.rescale_acts_by_decoder_norm:
            self._fold_rescale()

    @property
    def architecture(self) -> Architecture:
        """The rules of ``cfg.architecture`` (:mod:`mlxterp_saes.architectures`)."""
        return get_architecture(self.cfg.architecture)

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
        recons_clean = self.reconstruct(f_clean, x_in)
        recons = visit("recons", recons_clean if f is f_clean else self.reconstruct(f, x_in))
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

    def _heads(self, x: mx.array | None, width: int) -> int | None:
        """D when ``x`` is (..., H, D) with H * D = ``width``: any such input of a hook_z SAE
        (SAELens merges the last two axes), a (B, T, H, D) one of any SAE; else None."""
        if not isinstance(x, mx.array) or x.ndim < 2 or x.shape[-1] == width or x.shape[-1] * x.shape[-2] != width:
            return None
        return int(x.shape[-1]) if x.ndim == 4 or self.cfg.reshape == "hook_z" else None

    def _flat(self, x: mx.array, width: int, what: str) -> mx.array:
        if not isinstance(x, mx.array):
            try:
                x = mx.array(x)
            except (TypeError, ValueError):
                x = None
        if x is None or x.ndim == 0 or not (mx.issubdtype(x.dtype, mx.number) or x.dtype == mx.bool_):
            raise SAEError(f"SAE {what}: expected an array of numbers (..., {width}), got {type(x).__name__}.")
        if self._heads(x, width):
            x = x.reshape(*x.shape[:-2], width)
        if x.shape[-1] != width:
            name = self.cfg.site if what == "input" else self.site
            raise SAEError(
                f"SAE {what} width {width} does not match the site {name} (last axis {x.shape[-1]}, shape "
                f"{tuple(x.shape)}): this SAE was trained for another model or site."
            )
        return x.astype(mx.float32)

    # -- maths ---------------------------------------------------------------------------

    def process_input(self, x: mx.array) -> mx.array:
        """``x~``: the input normalised and, with ``apply_b_dec_to_input``, minus ``b_dec``."""
        x = self._normalise(x.astype(mx.float32))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def pre_acts(self, x: mx.array) -> mx.array:
        """(..., d_in) -> (..., d_sae): ``h`` (for Gated, the magnitude path's pre-activation)."""
        return self.architecture.pre_acts(self, self.process_input(self._flat(x, self.cfg.d_in, "input")))

    def activation(self, h: mx.array, x: mx.array | None = None) -> mx.array:
        """Features from pre-activations (Gated needs the input ``x`` for its gate)."""
        return self.architecture.activation(self, h, x)

    def encode(self, x: mx.array) -> mx.array:
        """(..., d_in) -> (..., d_sae) float32 feature activations. A hook_z SAE also takes
        attention heads, (..., H, D) (and remembers D, for decode)."""
        if self.cfg.reshape == "hook_z" and self._heads(x, self.cfg.d_in):
            self.d_head = self._heads(x, self.cfg.d_in)
        x = self._flat(x, self.cfg.d_in, "input")
        return self.activation(self.pre_acts(x), x)

    def decode(self, f: mx.array, x: mx.array | None = None) -> mx.array:
        """(..., d_sae) -> (..., d_out) float32: the dictionary's output, ``f @ W_dec + b_dec``
        with the normalisation undone (SAELens's ``decode``; a skip transcoder's skip is not in
        it: see :meth:`reconstruct`). ``x`` (the input) is needed by SAEs that normalise their
        input per token. A hook_z SAE returns heads, (..., H, D), as SAELens's does, when it
        knows D: from ``x`` given as heads, else from the last heads it encoded (flat ``x``, or
        no heads seen: flat)."""
        d_out = self.cfg.d_out or self.cfg.d_in
        heads = self._heads(x, self.cfg.d_in) if x is not None else self.d_head
        x = None if x is None else self._flat(x, self.cfg.d_in, "input")
        out = self.architecture.decode(self, self._flat(f, self.cfg.d_sae, "features"), x)
        if not self.cfg.is_transcoder:
            out = self._denormalise(out, x)
        if heads and self.cfg.reshape == "hook_z":
            out = out.reshape(*out.shape[:-1], d_out // heads, heads)
        return out

    def reconstruct(self, f: mx.array, x: mx.array) -> mx.array:
        """(..., d_sae), (..., d_in) -> (..., d_out): what the SAE predicts at its site,
        ``decode(f, x)`` plus a skip transcoder's ``x @ W_skip.T`` (SAELens's ``forward``). The
        splice's ``recons`` sub-site is this, so ``recons + error`` is the site exactly."""
        out = self.decode(f, x)
        skip = self.architecture.skip(self, self._flat(x, self.cfg.d_in, "input"))
        return out if skip is None else out + skip

    def __call__(self, x: mx.array) -> mx.array:
        """The reconstruction ``reconstruct(encode(x), x)``: ``decode(encode(x))`` for an SAE, a
        transcoder's prediction of its output site (skip included); heads in, heads out."""
        return self.reconstruct(self.encode(x), x)

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
        # SAELens divides by std + 1e-5 going in but multiplies by std alone coming out
        # (run_time_activation_ln_out ignores its eps): rows of small spread depend on it
        return out * _torch_std(x) + x.mean(axis=-1, keepdims=True)

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
        norms = mx.linalg.norm(self.W_dec, axis=-1)
        safe = mx.where(norms > 0, norms, 1.0)
        self.architecture.fold_decoder_norm(self, safe)  # its per-feature tensors; may refuse
        self.W_dec = self.W_dec / safe[:, None]
        self.W_enc = self.W_enc * safe[None, :]
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

    def _summary(self) -> str:
        c = self.cfg
        what = f"{c.site} -> {c.site_out}" if c.is_transcoder else c.site
        extra = f", k={c.k}" if c.k else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}, site={what}"


def hook_name_of(site: str) -> str | None:
    """TransformerLens's hook name of a standard site (``blocks.8.hook_resid_post``), or None
    for a raw site or one TransformerLens has no name for."""
    if site.startswith("model."):
        return None
    try:
        return transformerlens_name(site)
    except UnknownNameError:
        return None


def site_width(model, site: str) -> int:
    """The last axis of ``site`` in ``model`` (an InterpretableModel), without computing
    anything: a one-token forward built lazily and never evaluated (MLX knows shapes first)."""
    from mlxterp.plugin import Hooks, is_raw

    with Hooks(model, capture=[site], stop_after="auto") as hooks:
        _, recorded = hooks(mx.zeros((1, 1), dtype=mx.int32), evaluate=False)
    if is_raw(site):
        return int(recorded[site].shape[-1])
    resolved = model.architecture.resolve(site)[0]
    return int(resolved.read(recorded[resolved.site]).shape[-1])


def _torch_std(x: mx.array) -> mx.array:
    """Standard deviation over the last axis with Bessel's correction (torch's default)."""
    n = x.shape[-1]
    return mx.sqrt(mx.var(x, axis=-1, keepdims=True) * n / max(n - 1, 1))
