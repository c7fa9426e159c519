"""A faster SiLU and softmax for MLX's CPU backend, swapped into a model's MLP and attention
modules.

MLX's CPU wheel for x86 has no SIMD layer: ``exp`` (and so ``sigmoid``, SiLU, mlx-lm's
``swiglu`` and ``softmax``) runs one element at a time through a polynomial that calls
``floor()``, about 40-80 M elements/s, while multiplies and adds vectorise (about 2 G
elements/s). In the default model's forward pass of 8 x 32 tokens the SiLU of the 30 MLPs took
a third of the time, and the softmax inside the attention's fallback path a tenth.

:func:`swiglu` computes ``silu(gate) * x`` from multiplies, adds, one divide and selects only
(sigmoid(g) = (1 + tanh(g / 2)) / 2, with tanh as Eigen's rational approximation on [-7.9, 7.9]),
which ``mx.compile`` turns into vectorised native code: 4-5x faster on the CPU, and within
float32 rounding of the exact value in absolute terms (``|error| <= 2e-7 * (1 + |g|) * |x|``;
where sigmoid(g) is below ~1e-4 the relative error of the tiny result is larger).

:func:`softmax` takes ``exp`` as Cephes does (2^k times a polynomial, k rounded by float
arithmetic and 2^k built from its bits): vectorised, 5-7x faster, relative error below 2e-7
(MLX's own: about 2e-6), exactly 0 below -87.3 (a masked score never becomes a slow denormal),
and its own vector-Jacobian product. :func:`scaled_dot_product_attention` is mlx-lm's with
this softmax in place of the fused kernel's CPU fallback (same GQA layout, causal, boolean and
additive masks); quantized KV caches, attention sinks, other dtypes and devices go to mlx-lm's.

:func:`install` gives each module whose ``__call__`` uses mlx-lm's ``swiglu`` or
``scaled_dot_product_attention`` (Llama, Mistral, Qwen 2/3, ... ) a subclass whose ``__call__``
is the very same code with ours in its globals, the way :mod:`mlxterp_core.module_probes` swaps
classes: the parameter tree, attributes and ``isinstance`` stay as they were, probes and traces
work on top (a trace's attention-pattern spy is seen), and :func:`uninstall` restores the
original classes. ``mlxterp.load()`` installs it on the CPU backend only (``kernels=False``
keeps mlx-lm's own); float16/bfloat16 inputs and other devices fall through to mlx-lm's at
call time.
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .module_probes import stand_in

_TANH_CLAMP = 7.90531110763549805  # tanh(x) rounds to +-1 in float32 beyond this
_TANH_NUMERATOR = (  # odd coefficients, x^1 .. x^13
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16,
)
_TANH_DENOMINATOR = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
# the attribute of a generated class that names the class it stands in for
_ORIGINAL_ATTR = "_mlxterp_kernels_of"
_fast_classes: dict[type, type] = {}


def _tanh(x: mx.array) -> mx.array:
    # clamp by selects: mx.clip / mx.minimum check for NaN with a branch, which stops the
    # compiler from vectorising the loop (NaN still propagates through the polynomials)
    x = mx.where(x > _TANH_CLAMP, _TANH_CLAMP, mx.where(x < -_TANH_CLAMP, -_TANH_CLAMP, x))
    x2 = x * x
    p = _TANH_NUMERATOR[-1]
    for c in reversed(_TANH_NUMERATOR[:-1]):
        p = p * x2 + c
    q = _TANH_DENOMINATOR[-1]
    for c in reversed(_TANH_DENOMINATOR[:-1]):
        q = q * x2 + c
    return x * p / q


@partial(mx.compile, shapeless=True)
def _vectorised_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate * (0.5 + 0.5 * _tanh(0.5 * gate)) * x


def _mlx_lm_swiglu():
    from mlx_lm.models.activations import swiglu as original

    return original


def _mlx_lm_attention():
    from mlx_lm.models.base import scaled_dot_product_attention as original

    return original


def _cpu_float32(*arrays: mx.array) -> bool:
    return all(a.dtype == mx.float32 for a in arrays) and mx.default_device().type == mx.cpu


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` (any shape): vectorised for float32 on the CPU, mlx-lm's otherwise."""
    if _cpu_float32(gate, x):
        return _vectorised_swiglu(gate, x)
    return _mlx_lm_swiglu()(gate, x)


# exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2 (Cephes' expf): the rounding is
# the float32 "magic number" trick and 2^k is built from k's bits, so no floor() and no call
# stops the loop from vectorising; relative error below 1e-7 (MLX's own: about 2e-6)
_EXP_ROUND = 12582912.0  # 1.5 * 2^23: x + this - this rounds x to an integer in float32
_EXP_LN2_HI, _EXP_LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                   5.0000001201e-1)


def _exp_body(x: mx.array) -> mx.array:
    # below -87.3 the result is 0 (not a denormal: a masked score must not slow down the
    # divide and the matmul after it); above 88.3 it is inf (float32's largest is e^88.72)
    y = mx.where(x < -87.3, -87.3, mx.where(x > 88.3, 88.3, x))
    k = (y * 1.4426950408889634 + _EXP_ROUND) - _EXP_ROUND
    r = y - k * _EXP_LN2_HI - k * _EXP_LN2_LO
    p = _EXP_POLYNOMIAL[0]
    for c in _EXP_POLYNOMIAL[1:]:
        p = p * r + c
    e = (p * r * r + r + 1.0) * mx.view((k.astype(mx.int32) + 127) << 23, mx.float32)
    return mx.where(x < -87.3, 0.0, mx.where(x > 88.3, mx.inf, e))


# shapeless compilation cannot infer view's shape; one trace per shape costs well under 1 ms
# and the generated native kernel is shared by every shape
@mx.compile
def _exp_shifted(s: mx.array, m: mx.array) -> mx.array:
    return _exp_body(s - m)


@mx.custom_function
def _softmax(scores: mx.array) -> mx.array:
    e = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis: vectorised for float32 on the CPU, ``mx.softmax`` otherwise."""
    if _cpu_float32(scores):
        return _softmax(scores)
    return mx.softmax(scores, axis=-1, precise=True)


def _attention(queries, keys, values, scale, mask):
    # what mx.fast.scaled_dot_product_attention computes (and mlx-lm's quantized-cache path
    # spells out), with the vectorised softmax
    B, n_heads, L, D = queries.shape
    n_kv_heads = keys.shape[-3]
    repeats = n_heads // n_kv_heads
    queries = queries * scale
    if repeats > 1:
        queries = mx.reshape(queries, (B, n_kv_heads, repeats, L, D))
        keys, values = mx.expand_dims(keys, -3), mx.expand_dims(values, -3)
    scores = queries @ mx.swapaxes(keys, -1, -2)
    if mask is not None:
        if isinstance(mask, str):
            q_len, k_len = scores.shape[-2:]
            mask = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None]
        if repeats > 1 and mask.ndim > 3:  # (..., H or 1, L, S) -> (..., Hkv or 1, repeats or 1, L, S)
            if mask.shape[-3] == n_heads:
                mask = mx.reshape(mask, (*mask.shape[:-3], n_kv_heads, repeats, *mask.shape[-2:]))
            else:
                mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    out = softmax(scores) @ values
    return mx.reshape(out, (B, n_heads, L, values.shape[-1])) if repeats > 1 else out


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention``, with the vectorised softmax for float32 on the
    CPU (quantized KV caches, attention sinks and other dtypes or devices: mlx-lm's own)."""
    if hasattr(cache, "bits") or sinks is not None or not _cpu_float32(queries, keys, values):
        return _mlx_lm_attention()(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return _attention(queries, keys, values, scale, mask)


@lru_cache(maxsize=512)
def _rope_table(dims: int, base: float, scale: float, offset: int, length: int) -> tuple[mx.array, mx.array]:
    # the angles as mx.fast.rope takes them (float32: scale * position * 2^(-d log2(base)))
    d = np.arange(dims // 2, dtype=np.float32) / np.float32(dims // 2)
    inverse = np.exp2(-d * np.float32(np.log2(base)), dtype=np.float32)
    positions = np.float32(scale) * np.arange(offset, offset + length, dtype=np.float32)
    theta = positions[:, None] * inverse[None]
    return mx.array(np.cos(theta)), mx.array(np.sin(theta))


@mx.compile
def _rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class _RoPE(nn.RoPE):
    """``nn.RoPE`` with the angles' cosines and sines from a table (MLX's CPU fallback of
    ``mx.fast.rope`` takes them element by element with the scalar ``cos``/``sin``)."""

    def __call__(self, x, offset=0):
        if (self.traditional or not isinstance(offset, int) or self.dims % 2 or not _cpu_float32(x)):
            return super().__call__(x, offset)
        cos, sin = _rope_table(self.dims, float(self.base), float(self.scale), offset, x.shape[-2])
        if self.dims == x.shape[-1]:
            return _rotate_half(x, cos, sin)
        return mx.concatenate([_rotate_half(x[..., :self.dims], cos, sin), x[..., self.dims:]], axis=-1)


_RoPE.__name__ = _RoPE.__qualname__ = "RoPE"
_RoPE.__module__ = nn.RoPE.__module__
setattr(_RoPE, _ORIGINAL_ATTR, nn.RoPE)


def _replacements() -> dict[str, tuple[object, object]]:
    """Global name -> (mlx-lm's function, ours) for the functions this module replaces."""
    return {"swiglu": (_mlx_lm_swiglu(), swiglu),
            "scaled_dot_product_attention": (_mlx_lm_attention(), scaled_dot_product_attention)}


def _replaced_names(cls: type) -> tuple[str, ...]:
    """The names of mlx-lm functions that ``cls.__call__`` calls and this module replaces."""
    call = cls.__dict__.get("__call__")
    namespace = sys.modules.get(cls.__module__)
    if not isinstance(call, types.FunctionType):
        return ()
    return tuple(name for name, (original, _) in _replacements().items()
                 if name in call.__code__.co_names and getattr(namespace, name, None) is original)


class _Globals(dict):
    """The globals of a generated ``__call__``: ours for the replaced names, the defining
    module's own for the rest, looked up at call time (so a swap of a module name, such as a
    trace's attention-pattern spy, is seen)."""

    def __init__(self, module_globals: dict, replaced: dict):
        super().__init__(replaced)
        self.module_globals = module_globals

    def __missing__(self, name):
        return self.module_globals[name]  # KeyError: Python then looks in the builtins


def _dispatch(namespace, name: str, original, ours):
    """``ours`` while the module's ``name`` is still mlx-lm's function, else what it is now."""

    def call(*args, **kwargs):
        current = getattr(namespace, name, original)
        return (ours if current is original else current)(*args, **kwargs)

    return call


def _fast_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``cls.__call__`` with ours for ``names``."""
    fast = _fast_classes.get(cls)
    if fast is None:
        call = cls.__dict__["__call__"]
        namespace = sys.modules[cls.__module__]
        replaced = {name: _dispatch(namespace, name, *_replacements()[name]) for name in names}
        scope = _Globals(call.__globals__, replaced)
        fast_call = types.FunctionType(call.__code__, scope, call.__name__, call.__defaults__, call.__closure__)
        fast_call.__kwdefaults__ = call.__kwdefaults__
        fast_call.__qualname__ = call.__qualname__
        fast = stand_in(cls, fast_call, _ORIGINAL_ATTR)
        _fast_classes[cls] = fast
    return fast


def install(model: nn.Module) -> str:
    """Swap in the vectorised SiLU on every MLP module of ``model`` that uses mlx-lm's
    ``swiglu``; a sentence saying what was done (for ``load_report``)."""
    swapped: dict[str, int] = {}
    for _, module in model.named_modules():
        cls = type(module)
        if cls is nn.RoPE:
            object.__setattr__(module, "__class__", _RoPE)
            swapped["rope"] = swapped.get("rope", 0) + 1
            continue
        names = () if _ORIGINAL_ATTR in cls.__dict__ else _replaced_names(cls)
        if not names:
            continue
        object.__setattr__(module, "__class__", _fast_class(cls, names))
        for name in names:
            swapped[name] = swapped.get(name, 0) + 1
    if not swapped:
        return "MLX's own (no module uses mlx-lm's swiglu or scaled_dot_product_attention)"
    what = {"swiglu": "vectorised SiLU", "scaled_dot_product_attention": "vectorised softmax",
            "rope": "RoPE angles from a table"}
    done = ", ".join(f"{what[name]} in {n} modules" for name, n in swapped.items())
    return f"{done} (MLX's CPU exp is scalar; kernels=False turns it off)"


def uninstall(model: nn.Module) -> None:
    """Give every module that :func:`install` changed its original class back."""
    for _, module in model.named_modules():
        original = type(module).__dict__.get(_ORIGINAL_ATTR)
        if original is not None:
            object.__setattr__(module, "__class__", original)
