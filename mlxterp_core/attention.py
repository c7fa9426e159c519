"""Attention probabilities, which fused attention never materialises.

mlx-lm attention modules either call the family module's ``scaled_dot_product_attention``
(imported from ``mlx_lm.models.base``; it dispatches to the fused ``mx.fast`` kernel) or, in a
few families such as Gemma 2, compute ``mx.softmax(scores)`` themselves. While a trace asks for
the ``:pattern`` of an attention module, the family module's name is swapped:

- ``scaled_dot_product_attention`` -> an explicit computation from the very queries, keys,
  values, scale and mask the module passes (so after RoPE, q/k norms, with GQA, causal,
  sliding-window and padding masks and attention sinks), in float32;
- ``mx`` -> a proxy whose ``softmax`` reports its result (the family's own computation, so
  soft-capping and everything else is as the family does it).

Only the modules asked for take the explicit path; every other call goes to the original,
and the swap is undone when the forward pass ends. The probabilities are recorded as
``<attention module path>:pattern`` with shape (B, H, T, S) and can be intervened on: the
module then mixes values with the edited probabilities.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from .errors import UnknownNameError
from .sites import PATTERN_PORT

if TYPE_CHECKING:
    from .trace import Recorder



def strategy(module: nn.Module) -> str | None:
    """'sdpa', 'softmax' or None: how this attention module's probabilities can be seen."""
    names = type(module).__call__.__code__.co_names
    namespace = sys.modules[type(module).__module__]
    if "scaled_dot_product_attention" in names and hasattr(namespace, "scaled_dot_product_attention"):
        return "sdpa"
    if "softmax" in names and getattr(namespace, "mx", None) is mx:
        return "softmax"
    return None


def explicit_attention(queries, keys, values, scale, mask, sinks=None):
    """Attention probabilities (B, H, L, S) in float32, as mx.fast.scaled_dot_product_attention
    computes them implicitly. ``queries`` (B, H, L, D); ``keys``/``values`` (B, Hkv, S, D)."""
    n_heads, n_kv = queries.shape[1], keys.shape[1]
    if n_heads != n_kv:
        keys = mx.repeat(keys, n_heads // n_kv, axis=1)
    scores = (queries.astype(mx.float32) * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        length, span = scores.shape[-2:]
        mask = mx.arange(span - length, span)[:, None] >= mx.arange(span)[None]
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
        else:
            scores = scores + mask.astype(mx.float32)
    if sinks is not None:  # one extra logit per head that takes probability mass, then is dropped
        sink = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (*scores.shape[:-1], 1))
        return mx.softmax(mx.concatenate([sink, scores], axis=-1), axis=-1)[..., 1:]
    return mx.softmax(scores, axis=-1)


def _current(recorder: Recorder) -> str | None:
    """The path of the attention module running now, if its pattern is wanted."""
    if recorder.stack and recorder.stack[-1] in recorder.pattern_paths:
        return recorder.stack[-1]
    return None


def _sdpa_spy(original, recorder: Recorder):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        path = _current(recorder)
        if path is None:
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        if hasattr(cache, "bits"):
            raise UnknownNameError(
                f"{path}{PATTERN_PORT}: attention probabilities are not available with a "
                "quantized KV cache."
            )
        probs = recorder.visit(path + PATTERN_PORT, explicit_attention(queries, keys, values, scale, mask, sinks))
        n_heads, n_kv = queries.shape[1], values.shape[1]
        if n_heads != n_kv:
            values = mx.repeat(values, n_heads // n_kv, axis=1)
        return (probs @ values.astype(mx.float32)).astype(queries.dtype)

    return scaled_dot_product_attention


class _SoftmaxSpy:
    """Stands in for ``mlx.core`` inside one family module; reports ``softmax`` results."""

    def __init__(self, recorder: Recorder):
        self._recorder = recorder

    def __getattr__(self, name):
        return getattr(mx, name)

    def softmax(self, scores, *args, **kwargs):
        probs = mx.softmax(scores, *args, **kwargs)
        path = _current(self._recorder)
        if path is None:
            return probs
        if probs.ndim == 5:  # grouped-query layout (B, Hkv, repeats, L, S)
            b, kv, rep, length, span = probs.shape
            seen = self._recorder.visit(path + PATTERN_PORT, probs.reshape(b, kv * rep, length, span))
            return seen.reshape(probs.shape)
        return self._recorder.visit(path + PATTERN_PORT, probs)


@contextmanager
def patterns_observed(modules: dict[str, nn.Module], recorder: Recorder) -> Iterator[None]:
    """Swap the family modules' attention symbols while the block runs (see module doc)."""
    # decide every module's strategy before swapping anything: a swap changes what strategy() sees
    hows = {path: strategy(module) for path, module in modules.items()}
    for path, how in hows.items():
        if how is None:
            raise UnknownNameError(
                f"{path}{PATTERN_PORT}: {type(modules[path]).__name__} uses neither mlx-lm's "
                "scaled_dot_product_attention nor mx.softmax, so its attention "
                "probabilities cannot be observed."
            )
    with ExitStack() as stack:
        patched: set[tuple[str, str]] = set()
        for path, module in modules.items():
            how = hows[path]
            namespace = sys.modules[type(module).__module__]
            key = (namespace.__name__, how)
            if key in patched:
                continue
            patched.add(key)
            if how == "sdpa":
                spy = _sdpa_spy(namespace.scaled_dot_product_attention, recorder)
                stack.enter_context(_swapped(namespace, "scaled_dot_product_attention", spy))
            else:
                stack.enter_context(_swapped(namespace, "mx", _SoftmaxSpy(recorder)))
        yield


@contextmanager
def _swapped(namespace: ModuleType, name: str, value) -> Iterator[None]:
    original = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, original)
