"""The ``saes`` rows of ``mlxterp bench``: SAE training throughput (mlxterp_saes) on the
default model, in tokens per second, beside the plain forward's tokens per second on the same
windows in the same run, for one SAE and for four SAEs trained from one forward pass (against
four separate runs: the speed-up of sharing the forward).

Every case trains from texts (the offline Python reference corpus), traced on the fly with the
forward stopped after the last layer needed, so the figure includes the model's work.
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlxterp.plugin import default_corpus, token_windows
from mlxterp_saes import train_sae

from .harness import Row, default_model

SITE = "layers.15.output"
FOUR = ["layers.6.output", "layers.12.output", "layers.18.output", "layers.24.output"]


def training_speed(model, texts, n_tokens: int = 2048, d_sae: int = 4608, k: int = 32,
                   batch_size: int = 512, context_size: int = 128, forward_batch: int = 4,
                   site: str = SITE, four: list[str] = FOUR) -> dict[str, float]:
    """Tokens per second: plain forward (full model), one SAE at ``site``, four SAEs (at
    ``four``) from one forward, and four separate runs (their total time)."""
    options = dict(architecture="topk", d_sae=d_sae, k=k, n_tokens=n_tokens, batch_size=batch_size,
                   buffer_tokens=batch_size, context_size=context_size, forward_batch=forward_batch, progress=False)
    windows = list(token_windows(model, texts, context_size, batch_size=forward_batch, max_tokens=n_tokens))
    mx.eval(model.model(windows[0].inputs))  # warm-up: kernels compiled, buffers allocated
    train_sae(model, four, texts, **{**options, "n_tokens": batch_size})
    start = time.perf_counter()
    for w in windows:
        mx.eval(model.model(w.inputs))
    tokens = sum(w.n_tokens for w in windows)
    plain = tokens / (time.perf_counter() - start)

    def timed(sites):
        start = time.perf_counter()
        train_sae(model, sites, texts, **options)
        return time.perf_counter() - start

    one = timed(site)
    joint = timed(four)
    separate = sum(timed(s) for s in four)
    trained = n_tokens // batch_size * batch_size
    return {"plain_tokens_per_s": plain, "one_sae_tokens_per_s": trained / one,
            "four_saes_tokens_per_s": trained / joint, "four_separate_tokens_per_s": trained / separate,
            "speedup_four_from_one_forward": separate / joint}


def sae_rows(repeats: int = 1) -> list[Row]:
    """Training TopK SAEs from text on the default model, in tokens/s beside the plain forward.
    One SAE, and four SAEs from one forward against four separate runs (``repeats`` unused: one
    timed run of each)."""
    model = default_model()
    texts = default_corpus()[:300]
    s = training_speed(model, texts)
    plain = s["plain_tokens_per_s"]
    rows = [
        Row("saes: train 1 TopK SAE (4608, k=32) from text", f"{s['one_sae_tokens_per_s']:.0f} tok/s; plain forward "
            f"{plain:.0f} tok/s: {s['one_sae_tokens_per_s'] / plain:.2f}x", "reported (vs plain forward)", None, s),
        Row("saes: train 4 SAEs from one forward", f"{s['four_saes_tokens_per_s']:.0f} tok/s; separate "
            f"{s['four_separate_tokens_per_s']:.0f} tok/s: {s['speedup_four_from_one_forward']:.2f}x faster",
            "> 1x (approaches 4x for small SAEs)", s["speedup_four_from_one_forward"] > 1, s),
    ]
    return rows
