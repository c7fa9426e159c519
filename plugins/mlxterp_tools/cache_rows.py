"""The ``cache`` rows: ``cache_activations`` of the default model over the default corpus,
tokens/s against the plain forward of the same windows."""

from __future__ import annotations

import mlx.core as mx

from mlxterp.plugin import default_corpus, token_windows

from .harness import Row, default_model, median_times


def _plain_forward_cut(module, ids, layers: int | None):
    """The bare mlx-lm Llama forward of ``ids`` through its first ``layers`` blocks (None: the
    whole model, head included), evaluated: what caching is compared against."""
    if layers is None:
        mx.eval(module(ids))
        return
    from mlx_lm.models.base import create_attention_mask

    inner = module.model
    h = inner.embed_tokens(ids)
    mask = create_attention_mask(h, None)
    for block in inner.layers[:layers]:
        h = block(h, mask, cache=None)
    mx.eval(h)


def cache_speed(model=None, *, sites=("layers[*]",), cut: int | None = None, batch_size: int = 8,
                context_size: int = 128, batches: int = 4, repeats: int = 3, dtype=None,
                peers=None) -> dict[str, float]:
    """Tokens/s of ``model.cache_activations`` (all of it: planning, the forward passes, the
    background writer, checksums, the manifest) against the plain forward of the same windows
    (cut after ``cut`` blocks, or whole), interleaved rounds, medians. ``model``: default model.
    ``peers``: a function ``(windows, folder) -> {name: case}`` of other cases that do the same
    work on the same windows (token ids (B, T) each), timed in the same rounds."""
    import tempfile

    model = model or default_model()
    corpus = default_corpus()
    max_tokens = batch_size * context_size * batches
    windows = [b.inputs for b in token_windows(model, corpus, context_size, batch_size=batch_size, max_tokens=max_tokens)]
    with tempfile.TemporaryDirectory(prefix="mlxterp-bench-cache-") as folder:
        cases = {
            "plain": lambda: [_plain_forward_cut(model.model, ids, cut) for ids in windows],
            "cache": lambda: model.cache_activations(corpus, list(sites), f"{folder}/mlxterp", context_size=context_size,
                                                     batch_size=batch_size, max_tokens=max_tokens, dtype=dtype,
                                                     overwrite=True, progress=False),
        }
        if peers is not None:
            cases.update(peers(windows, folder))
        medians = median_times(cases, repeats)
    return {name: max_tokens / seconds for name, seconds in medians.items()}


def cache_rows(repeats: int = 3) -> list[Row]:
    """Caching the default model's activations against its plain forward, in tokens/s. Over the
    default corpus (4 batches of 8 x 128 tokens): all 30 layer outputs against the full plain
    forward, and one site (layers[14]) against the plain forward cut after block 15."""
    repeats = max(1, min(repeats, 3))
    model = default_model()
    rows = []
    for workload, sites, cut, limit in (
        ("cache: 30 layer outputs vs forward", ("layers[*]",), None, 0.85),
        ("cache: layers[14] vs forward to block 15", ("layers[14]",), 15, 1 / 1.05),
    ):
        speed = cache_speed(model, sites=sites, cut=cut, repeats=repeats)
        ratio = speed["cache"] / speed["plain"]
        figure = f"{speed['cache']:.0f} tok/s vs plain {speed['plain']:.0f} tok/s: {ratio:.2f}x"
        values = {"cache_tokens_per_s": speed["cache"], "plain_tokens_per_s": speed["plain"], "ratio": ratio}
        rows.append(Row(workload, figure, f">= {limit:.2f}x plain tok/s", ratio >= limit, values))
    return rows
