"""TopK (SAELens ``topk``; Gao et al. 2024): ``f`` keeps the ReLU of the k largest
pre-activations of each token, zero elsewhere. Trained with unit-norm decoder rows and the AuxK
loss that revives dead latents: ``aux_coefficient * min(n_dead / k_aux, 1) * ||e^ - e||^2 /
||e - mean e||^2``, with ``e = x - x^`` (detached) and ``e^`` decoded from the ``k_aux`` largest
dead pre-activations *without* ``b_dec`` (the fix of sparsify PR #134).

The AuxK pass costs what the dead latents need, not what all latents would: the trainer plans
it from their number (``t.aux_plan``, see :func:`loss`), so that with no dead latent there is no
pass, and with a few it reads only their columns and decoder rows, with no second top-k when
they are at most ``k_aux``.

``cfg.json`` carries ``k``; decoder norms are never folded (that would change which k features
win), so a file's ``rescale_acts_by_decoder_norm`` is folded into the encoder at load instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxterp.plugin import on_cpu

from . import base
from .base import SAEError, check_option

name = "topk"
unit_norm_decoder = True
fold_on_export = False
auxk = True

# On a GPU, MLX's argpartition sorts the whole row: a merge sort whose rows wider than one
# block (4096 float32 on CUDA) take extra passes over global memory. The k largest entries of a
# row are among the k largest of each of its groups, so rows cut into groups of about GROUP
# entries are sorted within blocks, and only the G * k candidates once more. 0 turns it off.
GROUP = 2048


def topk_index(h: mx.array, k: int, group: int | None = None) -> mx.array:
    """(..., n) -> (..., k) int32: where the k largest entries of each row are, in no order;
    exactly k positions even when values tie. Rows wider than two groups of ``group`` entries
    (default: GROUP on a GPU; none on the CPU, where argpartition selects without sorting) are
    cut into equal groups of about that many first, when each holds at least 4k."""
    k, n = int(k), h.shape[-1]
    group = (0 if on_cpu() else GROUP) if group is None else group
    groups = _groups(n, k, group) if group and n > 2 * group else 0
    if not groups:
        return mx.argpartition(-h, kth=k - 1, axis=-1)[..., :k]
    width, lead = n // groups, h.shape[:-1]
    grouped = h.reshape(*lead, groups, width)
    local = mx.argpartition(-grouped, kth=k - 1, axis=-1)[..., :k]  # (..., groups, k)
    candidates = mx.take_along_axis(grouped, local, axis=-1).reshape(*lead, groups * k)
    positions = (local + (mx.arange(groups, dtype=local.dtype) * width)[:, None]).reshape(*lead, groups * k)
    best = mx.argpartition(-candidates, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(positions, best, axis=-1)


def _groups(n: int, k: int, group: int) -> int:
    """The number of equal groups of about ``group`` entries a row of ``n`` is cut into for
    :func:`topk_index` (one that divides n, each group holding at least 4k), or 0 for none."""
    for groups in range(-(-n // group), n // (4 * k) + 1):
        if n % groups == 0:
            return groups
    return 0


def topk_relu(h: mx.array, k: int) -> mx.array:
    """ReLU of the k largest entries of the last axis, zero elsewhere; exactly k chosen even
    when values tie."""
    k = int(k)
    if k >= h.shape[-1]:
        return nn.relu(h)
    index = mx.stop_gradient(topk_index(h, k))
    values = nn.relu(mx.take_along_axis(h, index, axis=-1))
    return mx.put_along_axis(mx.zeros(h.shape, h.dtype), index, values, axis=-1)


def check_config(cfg) -> None:
    if not cfg.k:
        raise SAEError("a topk SAE needs k (cfg field 'k').")


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return topk_relu(h, sae.cfg.k)


def fold_decoder_norm(sae, norms: mx.array) -> None:
    raise SAEError(
        "folding decoder norms changes which k features a TopK SAE picks; TopK SAEs keep "
        "their decoder as trained (SAELens refuses this too)."
    )


def config_fields(cfg) -> dict:
    return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}


# -- training ----------------------------------------------------------------------------------


def check_options(settings: dict, d_sae: int) -> None:
    check_k(settings, d_sae)
    k = settings["k"]
    if k != int(k):
        raise SAEError(
            f"train_sae: k={k!r} is out of range: k must be a whole number in [1, {d_sae}] (topk keeps "
            "exactly k features per token)."
        )
    check_auxk(settings, d_sae)


def check_k(settings: dict, d_sae: int) -> None:
    why = f" ({settings['architecture']} needs k > 0 active features per token, at most d_sae = {d_sae})"
    check_option("k", settings["k"], 1, d_sae, why=why)


def check_auxk(settings: dict, d_sae: int) -> None:
    check_option("k_aux", settings["k_aux"], 1, d_sae, whole=True, default="d_in // 2")
    check_option("aux_coefficient", settings["aux"], 0)


def train_activation(t, params, h: mx.array) -> mx.array:
    return topk_relu(h, int(t.settings["k"]))


def loss(t, params, h, f, error, dead) -> mx.array | None:
    """The AuxK term (see the module docstring), also BatchTopK's.

    ``t.aux_plan`` says what the pass needs this step (the trainer knows how many latents are
    dead, ``n_dead``): None when none is, so the term and its gradient are zero; else
    ``(width, select)``: the dead latents fit in ``width`` columns (``width < d_sae``: only those
    columns of ``h`` and rows of ``W_dec`` are read, dead ones first), and ``select`` is False
    when ``n_dead <= k_aux``, so that every dead latent is decoded with no top-k. Each plan gives
    the result of the plain pass (``(d_sae, True)``), up to the order of float sums."""
    plan = getattr(t, "aux_plan", (t.d_sae, True))
    if plan is None:
        return None
    width, select = plan
    k_aux = t.settings["k_aux"] or max(1, t.d_in // 2)
    scale = mx.minimum(dead.sum() / k_aux, 1.0)
    e = mx.stop_gradient(error)
    W_dec = params["W_dec"]
    if width < t.d_sae:
        columns = dead_first(dead)[:width]
        h, W_dec, dead = mx.take(h, columns, axis=1), mx.take(W_dec, columns, axis=0), mx.take(dead, columns)
    if select:
        f_aux = topk_relu(mx.where(dead, h, -mx.inf), min(k_aux, width))
    else:  # every dead latent is among the k_aux largest
        f_aux = mx.where(dead, mx.maximum(h, 0), 0.0)
    e_hat = f_aux @ W_dec  # no b_dec: the residual has none
    norm = ((e - e.mean(axis=0)) ** 2).sum(axis=-1).mean() + 1e-12
    return t.settings["aux"] * scale * ((e_hat - e) ** 2).sum(axis=-1).mean() / norm


def dead_first(dead: mx.array) -> mx.array:
    """(d_sae,) bool -> (d_sae,) int32: the latents' indices, the dead ones first, each part in
    order."""
    n = dead.shape[0]
    return mx.argsort(mx.where(dead, 0, n) + mx.arange(n)).astype(mx.int32)


def export(t) -> tuple[dict[str, mx.array], dict]:
    weights, _ = base.export(t)
    return weights, {"k": int(t.settings["k"])}
