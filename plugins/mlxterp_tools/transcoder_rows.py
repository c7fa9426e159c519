"""The ``transcoders`` rows of ``mlxterp bench``: training throughput of transcoders on every
layer of the default model (mlxterp_transcoders), in tokens per second, beside the plain
forward's tokens per second on the same windows in the same run: a set of per-layer transcoders
(PLTs) and a cross-layer transcoder (CLT) with the same features per layer.

Both train from texts (the offline corpus), every layer's MLP input and output read from one
forward per batch, so the figures include the model's work; the CLT's decoders (one per pair of
layers, 465 on 30 layers) make its steps the dearer part.
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlxterp.plugin import default_corpus, token_windows
from mlxterp_transcoders import train_transcoders

from .harness import Row, default_model


def training_speed(model, texts, n_tokens: int = 2048, d_features: int = 256, k: int = 16, batch_size: int = 512,
                   context_size: int = 128, forward_batch: int = 4, layers=None) -> dict[str, float]:
    """Tokens per second: the plain forward (the whole model), a TopK PLT set and a TopK CLT
    on ``layers`` (default: all), ``d_features`` features per layer, ``k`` active; and each
    set's peak memory while it trained (MLX's allocator, the model included). Each set first
    trains one batch untimed, so that compiling its step is not in its figure."""
    options = dict(activation="topk", layers=layers, d_features=d_features, k=k, n_tokens=n_tokens, batch_size=batch_size,
                   buffer_tokens=batch_size, context_size=context_size, forward_batch=forward_batch, progress=False,
                   memory_budget=2**40)  # timing only: the estimate is the trainer's to check, not the benchmark's
    windows = list(token_windows(model, texts, context_size, batch_size=forward_batch, max_tokens=n_tokens))
    mx.eval(model.model(windows[0].inputs))  # warm-up: kernels compiled, buffers allocated
    for kind in ("plt", "clt"):
        train_transcoders(model, texts, kind=kind, **{**options, "n_tokens": batch_size})
    start = time.perf_counter()
    for w in windows:
        mx.eval(model.model(w.inputs))
    plain = sum(w.n_tokens for w in windows) / (time.perf_counter() - start)
    trained = max(1, n_tokens // batch_size) * batch_size
    speed = {"plain_tokens_per_s": plain}
    for kind in ("plt", "clt"):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        train_transcoders(model, texts, kind=kind, **options)
        speed[f"{kind}_tokens_per_s"] = trained / (time.perf_counter() - start)
        speed[f"{kind}_peak_memory_gib"] = mx.get_peak_memory() / 2**30
    return speed


def transcoder_rows(repeats: int = 1) -> list[Row]:
    """Training a TopK PLT set and a TopK CLT (256 features per layer, k = 16) on all 30 layers of
    the default model from text, in tokens/s beside the plain forward, with each set's peak
    memory (the model included; ``repeats`` unused: one timed run of each)."""
    model = default_model()
    s = training_speed(model, default_corpus()[:300])
    plain = s["plain_tokens_per_s"]
    return [
        Row(f"transcoders: train a {kind.upper()} on 30 layers (256/layer, k=16) from text",
            f"{s[f'{kind}_tokens_per_s']:.0f} tok/s, peak {s[f'{kind}_peak_memory_gib']:.2f} GiB; plain forward "
            f"{plain:.0f} tok/s: {s[f'{kind}_tokens_per_s'] / plain:.2f}x",
            "reported (vs plain forward)", None, s)
        for kind in ("plt", "clt")
    ]
