"""The residual stream as a sum of components, and each component's direct effect on the logits.

The residual stream entering layer l is ``embed + sum over i < l of (attn_i + mlp_i)`` (the
invariants check this on every family). Attention outputs split further into one term per
head: the output projection is linear, so head h's term is ``o_proj(z with only head h) -
o_proj(0)`` and ``o_proj(0)`` (the bias) is its own term; where the family normalises the
attention output before adding it (Gemma 2/3, OLMo 2/3, GLM 4), that norm is applied with its
per-token scale frozen, as below.

Direct logit attribution (DLA): the final norm is applied to each component with the
per-token scale of the actual final residual stream frozen (the standard linearisation; see
TransformerLens's ``apply_ln_to_stack``), then the unembedding direction of ``logit[a] -
logit[b]`` is read off. The terms sum to the logit difference computed from the final residual
stream, before any soft-capping. No weight is read or rewritten: the norm and the unembedding
are only called (quantized ones stay quantized).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlxterp.plugin import options
from mlxterp.plugin import read_attribute
from mlxterp.plugin import MlxterpError

from .patching import answer_token
from .results import DLAResult, ResidComponents
from mlxterp.plugin import ids_text, token_ids, token_text


def frozen_norm(norm: Callable[[mx.array], mx.array], x: mx.array) -> tuple[Callable[[mx.array], mx.array], mx.array]:
    """A norm module as an affine map with the statistics of ``x`` (..., D) frozen.

    Returns ``(apply, bias)`` with ``apply`` linear and ``apply(x) + bias == norm(x)``, so that
    ``sum(apply(c) for c in parts) + bias == norm(sum(parts))``. Works for RMS norms (any
    weight convention, Gemma's ``1 + w`` included) and LayerNorms (with or without affine
    parameters) by probing the module, never its weights.
    """
    width = x.shape[-1]
    x = x.astype(mx.float32)
    bias = norm(mx.zeros((width,), dtype=mx.float32)).astype(mx.float32)
    probe = mx.random.normal((width,), key=mx.random.key(0))
    centering = mx.allclose(norm(probe + 5.0), norm(probe), atol=1e-4).item()  # LayerNorm-like
    big = 1e3  # large inputs make the norm's epsilon negligible
    if centering:
        signs = mx.where(mx.arange(width) % 2 == 0, 1.0, -1.0)
        centred = signs - signs.mean()
        spread = mx.sqrt((centred**2).mean())
        gain = (norm(big * signs) - bias) * spread / centred
    else:
        gain = norm(big * mx.ones((width,))) - bias

    def shape(c: mx.array) -> mx.array:
        c = c.astype(mx.float32)
        return c - c.mean(axis=-1, keepdims=True) if centering else c

    shaped, target = gain * shape(x), norm(x).astype(mx.float32) - bias
    scale = (shaped * target).sum(axis=-1, keepdims=True) / ((target * target).sum(axis=-1, keepdims=True) + 1e-30)

    def apply(c: mx.array) -> mx.array:
        return gain * shape(c) / scale

    return apply, bias


def decompose_resid(model, text, layer: int | None = None, heads: bool = False) -> ResidComponents:
    """The residual stream entering ``layer`` (default: the final one, before the final norm)
    as a stack of components (C, T, D): embed, then attn i and mlp i for each earlier layer
    (with ``heads=True``: one term per attention head and the attention bias instead of attn i)."""
    arch = model.architecture_or_raise("decompose_resid")
    end = options.boundary(layer, arch.n_layers)
    ids = token_ids(model, text)
    names = ["embed"] + [f"layers.{i}.{s}" for i in range(end) for s in ("attn", "mlp")]
    if heads:
        names += [f"layers.{i}.attn.z" for i in range(end)]
    target = f"layers.{end}.input" if end < arch.n_layers else f"layers.{arch.n_layers - 1}.output"
    acts = model.run([ids], capture=names + [target]).activations
    labels, parts = ["embed"], [acts["embed"][0]]
    for i in range(end):
        if heads:
            per_head, rest = head_terms(model, i, acts[f"layers.{i}.attn.z"], acts[f"layers.{i}.attn"])
            labels += [f"L{i}H{h}" for h in range(per_head.shape[0])] + [f"L{i} attn bias"]
            parts += [*per_head[:, 0], rest[0]]
        else:
            labels.append(f"L{i} attn")
            parts.append(acts[f"layers.{i}.attn"][0])
        labels.append(f"L{i} mlp")
        parts.append(acts[f"layers.{i}.mlp"][0])
    return ResidComponents(
        text=ids_text(model, ids),
        tokens=[token_text(model, t) for t in ids],
        layer=end,
        kind="decomposed",
        labels=labels,
        vectors=mx.stack(parts).astype(mx.float32).tolist(),
        total=acts[target][0].astype(mx.float32).tolist(),
    )


def accumulated_resid(model, text, layer: int | None = None) -> ResidComponents:
    """The residual stream at every layer boundary up to ``layer`` (default: all), (C, T, D):
    embed (entering layer 0), then after layer 0, 1, ..."""
    arch = model.architecture_or_raise("accumulated_resid")
    end = options.boundary(layer, arch.n_layers)
    ids = token_ids(model, text)
    names = ["embed"] + [f"layers.{i}.output" for i in range(end)]
    acts = model.run([ids], capture=names).activations
    return ResidComponents(
        text=ids_text(model, ids),
        tokens=[token_text(model, t) for t in ids],
        layer=end,
        kind="accumulated",
        labels=["embed"] + [f"after L{i}" for i in range(end)],
        vectors=mx.stack([acts[n][0] for n in names]).astype(mx.float32).tolist(),
        total=acts[names[-1]][0].astype(mx.float32).tolist(),
    )


def head_terms(model, layer: int, z: mx.array, attn: mx.array) -> tuple[mx.array, mx.array]:
    """Head h's term of what layer ``layer``'s attention adds to the residual stream, (H, B, T, D),
    and the remainder (the bias terms), (B, T, D); they sum to ``attn`` (checked)."""
    arch = model.architecture
    (z_name,) = arch.resolve(f"layers.{layer}.attn.z")
    (attn_name,) = arch.resolve(f"layers.{layer}.attn")
    if not z_name.site.endswith(":input") or z_name.view is not None:
        raise MlxterpError(f"{arch.family}: attn.z is not the input of an output projection; per-head terms need one.")
    block = f"model.{arch.schema.layers}.{layer}."
    projection = read_attribute(arch.layers[layer], z_name.site[len(block):].removesuffix(":input"))
    n_heads = arch.n_heads
    z = z.astype(mx.float32)
    width = z.shape[-1] // n_heads
    only = (mx.arange(z.shape[-1]) // width)[None, :] == mx.arange(n_heads)[:, None]  # (H, H*D)
    bias = projection(mx.zeros_like(z[..., :1, :]))  # (B, 1, D) broadcast over positions
    per_head = projection(z[None] * only[:, None, None, :].astype(z.dtype)) - bias[None]
    out_site = attn_name.site[len(block):]
    if out_site == arch.schema.attention.module:  # the attention output itself is added
        to_resid = (lambda y: attn_name.read(y)) if attn_name.view is not None else (lambda y: y)
        rest = to_resid(bias) * mx.ones_like(attn)
        per_head = to_resid(per_head)
    else:  # a norm of the attention output is added: freeze its scale at the actual output
        norm = read_attribute(arch.layers[layer], out_site.split(":")[0])
        apply, norm_bias = frozen_norm(norm, per_head.sum(axis=0) + bias)
        per_head = apply(per_head)
        rest = apply(bias) + norm_bias
    total = per_head.sum(axis=0) + rest
    if not mx.allclose(total, attn.astype(mx.float32), rtol=1e-3, atol=1e-3 * (mx.abs(attn).max().item() + 1)).item():
        raise MlxterpError(
            f"{arch.family}: per-head terms of layer {layer} do not add up to its attention output; "
            "this family's attention output is not a linear function of z."
        )
    return per_head, rest


def direct_logit_attribution(
    model,
    text,
    answers: tuple[Any, Any] | None = None,
    position: int = -1,
    heads: bool = True,
) -> DLAResult:
    """Each component's direct contribution to ``logit[a] - logit[b]`` at ``position``.

    ``answers``: (a, b) as token ids or single-token strings; default: the model's top two
    predictions there. Components: embed, attn i (or, with ``heads``, every head and the
    attention bias), mlp i, the final norm's bias and the unembedding's bias. They sum to the
    logit difference computed from the final residual stream (before any soft-capping).
    """
    arch = model.architecture_or_raise("direct logit attribution")
    ids = token_ids(model, text)
    position = options.index(position, len(ids), "position", "position")
    answers = options.pair(answers, "answers")
    parts = decompose_resid(model, ids, heads=heads)
    vectors = mx.array(parts.vectors)[:, position]  # (C, D)
    final = mx.array(parts.total)[position]
    logits = arch.unembed(arch.final_norm(final[None]), softcap=False)[0].astype(mx.float32)
    if answers is None:
        a, b = mx.argsort(-logits)[:2].tolist()
    else:
        a, b = (answer_token(model, t) for t in answers)
    apply, norm_bias = frozen_norm(arch.final_norm, final)

    def unembed(y: mx.array) -> mx.array:
        return arch.unembed(y, softcap=False).astype(mx.float32)

    zero = mx.zeros_like(final)
    cotangent = mx.zeros_like(logits).at[a].add(1.0).at[b].add(-1.0)
    _, (direction,) = mx.vjp(lambda y: unembed(y), [zero], [cotangent])  # d(logit a - logit b)/dy
    unembed_bias = unembed(zero)
    values = (apply(vectors) @ direction).tolist()
    values.append((norm_bias @ direction).item())
    values.append((unembed_bias[a] - unembed_bias[b]).item())
    labels = parts.labels + ["final norm bias", "unembed bias"]
    return DLAResult(
        text=parts.text,
        tokens=parts.tokens,
        position=position,
        answers=[token_text(model, a), token_text(model, b)],
        labels=labels,
        values=values,
        logit_diff=(logits[a] - logits[b]).item(),
        n_heads=arch.n_heads if heads else 0,
    )
