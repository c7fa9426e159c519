"""What every SAE architecture shares: the error it raises, the check of a training option, and
the standard (ReLU) SAE's rules, which are the defaults of whatever an architecture module
leaves out (see :mod:`mlxterp_saes.architectures` for the list).

Inference rules take the SAE (its tensors are attributes: ``sae.W_enc``); training rules take
the trainer ``t`` (``t.settings``: train_sae's options; ``t.d_in``, ``t.d_sae``, ``t.scale``,
``t.seen``, ``t.params``, ``t.buffers``).
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlxterp.plugin import MlxterpError


class SAEError(MlxterpError, ValueError):
    """An SAE that cannot be built, loaded, trained or spliced as asked."""


def check_option(name: str, value, low: float, high: float = math.inf, *, whole: bool = False,
                 above: bool = False, default: str | None = None, why: str = "") -> None:
    """Raise an SAEError naming ``name``, ``value`` and the range unless ``value`` is a finite
    number in [low, high] ((low, high] with ``above``), a Python int with ``whole``, or None
    when the option has a ``default`` (said in the message)."""
    if value is None and default is not None:
        return
    kind = int if whole else (int, float)
    number = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if number and (low < value if above else low <= value) and value <= high:
        return
    what = "an integer" if whole else "a number"
    if high < math.inf:
        rule = f"{what} in {'(' if above else '['}{low:g}, {high:g}]"
    else:
        rule = f"{what} {'>' if above else '>='} {low:g}"
    if default is not None:
        rule += f" (or None for {default})"
    raise SAEError(f"train_sae: {name}={value!r} is out of range: {name} must be {rule}{why}.")


# -- inference: the SAE's tensors and maths ----------------------------------------------------


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    """The tensors' names and shapes, in the order files hold them."""
    d_out = cfg.d_out or cfg.d_in
    return {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, d_out), "b_dec": (d_out,), "b_enc": (cfg.d_sae,)}


def check_config(cfg) -> None:
    """Raise an SAEError when the config lacks what this architecture needs."""


def pre_acts(sae, x: mx.array) -> mx.array:
    """(..., d_in) -> (..., d_sae): ``h`` from the processed input (normalised, minus b_dec)."""
    return x @ sae.W_enc + sae.b_enc


def decode(sae, f: mx.array, x: mx.array | None) -> mx.array:
    """(..., d_sae) -> (..., d_out), before any output normalisation is undone."""
    return f.astype(mx.float32) @ sae.W_dec + sae.b_dec


def skip(sae, x: mx.array) -> mx.array | None:
    """(..., d_in) -> (..., d_out): a term the SAE adds to ``decode(f)`` at its site that does
    not go through the features (a skip transcoder's ``x @ W_skip.T``), or None."""
    return None


def fold_decoder_norm(sae, norms: mx.array) -> None:
    """Scale the per-feature encoder tensors by ``norms`` (d_sae,) while the SAE divides W_dec's
    rows by them and multiplies W_enc's columns, so that no reconstruction changes."""
    sae.b_enc = sae.b_enc * norms


def config_fields(cfg) -> dict:
    """The architecture's own top-level fields of a SAELens ``cfg.json``."""
    return {}


# -- training ----------------------------------------------------------------------------------

unit_norm_decoder = False  # keep W_dec's rows at unit norm while training (and start them there)
fold_on_export = True  # export with unit-norm decoder rows (fold_decoder_norm)


def check_options(settings: dict, d_sae: int) -> None:
    """Raise an SAEError (see check_option) for an option of this architecture out of range."""


def init_params(t, x: mx.array) -> dict[str, mx.array]:
    """The trained parameters, from the first batch ``x`` (already multiplied by ``t.scale``):
    W_dec rows random directions (norm 1 with a unit-norm decoder, else 0.1), W_enc = W_dec^T,
    b_dec = the batch mean, b_enc = 0. Their order is the optimiser's."""
    direction = mx.random.normal((t.d_sae, t.d_in), key=mx.random.key(t.settings["seed"]))
    norm = 1.0 if t.arch.unit_norm_decoder else 0.1
    W_dec = direction / mx.linalg.norm(direction, axis=-1, keepdims=True) * norm
    return {"W_enc": W_dec.T, "b_enc": mx.zeros((t.d_sae,)), "W_dec": W_dec, "b_dec": x.mean(axis=0)}


def init_buffers(t) -> dict[str, mx.array]:
    """Running state that is not trained (BatchTopK's threshold); checkpointed by name."""
    return {}


def loss(t, params, h: mx.array, f: mx.array, error: mx.array, dead: mx.array) -> mx.array | None:
    """The architecture's terms added to the shared reconstruction loss (None: nothing)."""
    return None


def after_step(t, f: mx.array) -> dict[str, mx.array]:
    """The buffers after a step whose features were ``f`` (called before ``t.seen`` grows)."""
    return t.buffers


def export(t) -> tuple[dict[str, mx.array], dict]:
    """The SAE's tensors for raw activations and its own SAEConfig fields. The input scale ``s``
    is folded in: ``W_enc * s``, ``W_dec / s``, ``b_dec / s`` (pre-activations are unchanged)."""
    p, s = t.params, t.scale
    return {"W_enc": p["W_enc"] * s, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / s, "b_dec": p["b_dec"] / s}, {}
