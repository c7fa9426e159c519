"""Train a tuned lens on the default model and corpus, and print its held-out per-layer KL
table (Markdown) for docs/guide/tuned_lens.md.

    python docs/make_lens_table.py [num_steps] [tokens_per_step]

Training uses the first 2,500 paragraphs of ``default_corpus()``; the KL is measured on 4,096
tokens of the last 300 (never trained on). It also writes docs/images/tuned_lens_kl.png and
tuned_lens.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlxterp
from mlxterp_core.corpus import default_corpus

IMAGES = Path(__file__).resolve().parent / "images"


def main(num_steps: int = 64, tokens_per_step: int = 2048) -> None:
    model = mlxterp.load()
    documents = default_corpus()
    started = time.perf_counter()
    lens = model.train_tuned_lens(documents[:2500], num_steps=num_steps, tokens_per_step=tokens_per_step,
                                  context_size=128, batch_size=8)
    trained = time.perf_counter() - started
    evaluation = model.evaluate_tuned_lens(lens, documents[-300:], context_size=128, max_tokens=4096)
    evaluation.plot(IMAGES / "tuned_lens_kl.png")
    model.tuned_lens("The capital of France is", lens).plot(IMAGES / "tuned_lens.png")
    print(f"{num_steps} steps x {tokens_per_step} tokens in {trained:.0f} s; held-out {evaluation.n_tokens} tokens")
    print(evaluation.table())
    worse = [layer for layer, t, g in zip(evaluation.layers, evaluation.tuned_kl, evaluation.logit_kl) if t >= g]
    print("layers where the tuned lens is not better:", worse or "none")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:3]])
