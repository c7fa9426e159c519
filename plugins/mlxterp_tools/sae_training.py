"""SAE training on the default model: the longer run and the throughput figures.

    python -m mlxterp_tools.sae_training                 # CPU or Metal: defaults sized for a laptop
    python -m mlxterp_tools.sae_training --tokens 200000 --d-sae 9216 --batch-size 4096   # a GPU
    python -m mlxterp_tools.sae_training --model random --skip-run --speed-tokens 65536 \
        --d-sae 9216 --batch-size 4096 --forward-batch 32   # throughput only, without the GGUF

1. Throughput (the ``mlxterp bench --rows saes`` figures at the sizes given): training tokens/s
   of one TopK SAE and of four SAEs from one forward, beside the plain forward's tokens/s and
   four separate runs.
2. The longer run: a TopK SAE at the middle layer's residual stream (``layers[15].output``)
   trained on the offline corpus (``mlxterp.default_corpus()``, documents before the last 150),
   evaluated on the last 150 documents (held out): L0, explained variance, CE loss recovered,
   dead fraction, and PCA with k components on the same held-out tokens as the sanity bar.

``--model random`` (for a machine without the default model's file, such as a lent GPU): a
random-weight Llama of SmolLM2-135M's shape, quantized to 4 bits in groups of 32 (as the GGUF's
Q4_1 blocks load), float16, with a byte-level BPE of SmolLM2's vocabulary size trained on the
corpus. Its throughput is the default model's (the cost does not depend on the weights' values;
its token counts per text differ, tokens/s does not). ``--skip-run`` measures throughput only.

Writes ``--out``/sae_training.json and the figures (sae_evaluation.png, sae_training.png,
sae_top_activations.png: the top-activating held-out contexts of three features that fire on
about 1% of tokens) that the user guide shows (copy them to docs/images/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.plugin import InterpretableModel, TextRows, default_corpus, describe_backend, load
from mlxterp_saes import explained_variance, train_sae

from .harness import SMOLLM2_135M_SHAPE, random_llama
from .sae_rows import training_speed


def pca_explained_variance(train: np.ndarray, test: np.ndarray, k: int) -> float:
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:k]
    recons = (test - mean) @ basis.T @ basis + mean
    return explained_variance(mx.array(test), mx.array(recons))


def random_model(corpus: list[str]):
    """The ``--model random`` stand-in for the default model (see the module doc)."""
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    module = random_llama()
    nn.quantize(module, group_size=32, bits=4)
    module.set_dtype(mx.float16)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=SMOLLM2_135M_SHAPE["vocab_size"], special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return InterpretableModel(module, tokenizer=TokenizerWrapper(hf))


def site_rows(model, site: str, texts: list[str], chunks: int) -> mx.array:
    """(n, d) float32 rows of ``site`` from the first ``chunks`` forward passes (8 windows of
    128 tokens) over ``texts``, at the rows SAE training reads (the activation stream's rule:
    not padding, not BOS, not a window's first position)."""
    rows = TextRows(model, texts, [site], context_size=128, batch_size=8, repeat=False)
    return mx.concatenate([chunk[site] for _, chunk in zip(range(chunks), rows)]).astype(mx.float32)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=40_000, help="training tokens of the longer run")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--speed-tokens", type=int, default=4096)
    parser.add_argument("--forward-batch", type=int, default=4, help="windows per forward in the throughput runs")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-run", action="store_true", help="throughput only")
    parser.add_argument("--model", choices=["default", "random"], default="default")
    parser.add_argument("--out", default="sae-benchmark")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    corpus = default_corpus()
    model = load() if args.model == "default" else random_model(corpus)
    train_texts, test_texts = corpus[:-150], corpus[-150:]
    import mlx_lm

    report: dict = {"backend": describe_backend(), "mlx_lm": mlx_lm.__version__, "args": vars(args)}
    print(json.dumps(report), flush=True)
    if not args.skip_speed:
        speed = dict(n_tokens=args.speed_tokens, d_sae=args.d_sae, k=args.k,
                     batch_size=min(args.batch_size, args.speed_tokens), forward_batch=args.forward_batch)
        training_speed(model, train_texts, **{**speed, "n_tokens": speed["batch_size"]})  # warm-up: kernels compiled
        report["speed"] = training_speed(model, train_texts, **speed)
        print(json.dumps(report["speed"], indent=2), flush=True)
    if args.skip_run:
        (out / "sae_training.json").write_text(json.dumps(report, indent=2))
        return
    site = "layers.15.output"
    start = time.perf_counter()
    sae = train_sae(model, site, train_texts, architecture="topk", d_sae=args.d_sae, k=args.k,
                            n_tokens=args.tokens, batch_size=args.batch_size, save_dir=out / "sae",
                            # a buffer larger than the run would trace ~2x the tokens it trains on
                            buffer_tokens=min(65_536, max(args.batch_size, args.tokens // 4)))
    seconds = time.perf_counter() - start
    sae.training_log.plot(out / "sae_training.png")
    result = sae.evaluate(model, test_texts, n_tokens=args.eval_tokens)
    result.plot(out / "sae_evaluation.png")
    train_rows = site_rows(model, site, train_texts[:400], 4)
    test_rows = site_rows(model, site, test_texts, 2)
    report["run"] = {
        "site": site, "train_seconds": seconds, "train_tokens_per_s": sae.training_log.tokens_per_second,
        "l0": result.l0, "explained_variance": result.explained_variance, "ce_loss_recovered": result.ce_loss_recovered,
        "ce_increase_nats": result.ce_increase, "dead_fraction": result.dead_fraction, "kl_score": result.kl_score,
        "sae_ev_heldout": explained_variance(test_rows, sae(test_rows)),
        "pca_ev_heldout": pca_explained_variance(np.array(train_rows, dtype=np.float64), np.array(test_rows, dtype=np.float64), args.k),
    }
    # the top-activations view: three features that fire on about 1% of held-out tokens
    density = np.asarray((sae.encode(test_rows) > 0).mean(axis=0))
    features = [int(f) for f in np.argsort(np.abs(np.log(density + 1e-9) - np.log(0.01)))[:3]]
    examples = sae.top_activations(model, test_texts, features, n_tokens=args.eval_tokens)
    examples.plot(out / "sae_top_activations.png")
    report["top_activations"] = {
        "features": features, "density": examples.density, "max_activation": examples.max_activation,
        "top": [["".join(e.tokens[: e.index]) + "[" + e.tokens[e.index] + "]" for e in ex[:5]] for ex in examples.top],
    }
    print(result)
    print(json.dumps(report["run"], indent=2))
    print(json.dumps(report["top_activations"], indent=2))
    (out / "sae_training.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
