"""Transcoders on the default model: issue 23's comparison run and the throughput figures.

    python -m mlxterp_tools.transcoder_training             # the comparison (about 30-60 min on 2 CPU cores)
    python -m mlxterp_tools.transcoder_training --smoke     # everything at a tiny size (a few minutes)
    python -m mlxterp_tools.transcoder_training --model random --skip-run --speed-tokens 65536 \\
        --batch-size 4096 --forward-batch 32                # throughput only, without the GGUF (a GPU)

1. Throughput (the ``mlxterp bench --rows transcoders`` figures at the sizes given): training
   tokens/s of a PLT set and of a CLT on all 30 layers, beside the plain forward's tokens/s.
2. The comparison: a set of per-layer transcoders (PLTs) and a cross-layer transcoder (CLT) on
   all 30 layers, the same features per layer (so the same total), TopK with the same k per
   layer (so the same L0; ``--activation jumprelu --sparsity-coefficient L`` trains JumpReLU
   instead, whose L0s then differ), trained on the same tokens (the same documents of the
   offline corpus, ``mlxterp.default_corpus()`` but the last 150, in the same windows and
   order: the same seed), and evaluated on the last 150 documents (held out): per-layer
   explained variance, L0, dead fraction, and the replacement model's CE loss recovered and KL
   (every MLP replaced, errors off). The report says whether the CLT is the better replacement
   at equal sparsity (more CE recovered and a lower KL, L0s within 10%).

``--model random``: a random-weight Llama of SmolLM2-135M's shape, 4-bit, float16 (as
``sae_training``), for a GPU without the default model's file; its throughput is the default
model's there. Not for a CPU, where MLX's float16 4-bit matmuls are far slower than the
dequantized float32 model ``mlxterp.load()`` prepares.

Writes ``--out``/transcoder_training.json, transcoder_comparison.png (both sets per layer),
{plt,clt}_evaluation.png and {plt,clt}_training.png; ``--save`` also writes both sets in
circuit-tracer's layout (``--out``/plt, ``--out``/clt; the CLT at 256 features per layer is
about 300 MB).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlxterp.plugin import default_corpus, describe_backend, load
from mlxterp_transcoders import evaluate_transcoders, save_transcoders, train_transcoders, training_memory

from .transcoder_rows import training_speed

SMOKE = dict(tokens=1024, features=32, k=4, batch_size=256, eval_tokens=256, speed_tokens=512, forward_batch=2)


def compare(model, train_texts, test_texts, *, features: int, k: int, tokens: int, batch_size: int, eval_tokens: int,
            activation: str = "topk", sparsity_coefficient: float = 2.0, forward_batch: int = 8, out: Path | None = None,
            save: bool = False, say=print) -> dict:
    """Train a PLT set and a CLT on every layer of ``model`` on the same tokens of
    ``train_texts``, evaluate both on ``test_texts``, and return the report (see the module doc)."""
    n_layers = model.architecture.n_layers
    options = dict(d_features=features, activation=activation, k=k, n_tokens=tokens, batch_size=batch_size,
                   buffer_tokens=max(batch_size, min(8192, tokens // 4)), forward_batch=forward_batch, seed=0,
                   sparsity_coefficient=sparsity_coefficient, memory_budget=2**40)
    report: dict = {}
    results = {}
    for kind in ("plt", "clt"):
        need = training_memory(kind, n_layers, model.architecture.d_model, features, batch_size=batch_size,
                               buffer_tokens=options["buffer_tokens"])
        say(f"[{time.strftime('%H:%M:%S')}] training the {kind.upper()} on {n_layers} layers x {features} features "
            f"({activation}{f', k={k}' if activation in ('topk', 'batchtopk') else ''}) on {tokens:,} tokens; "
            f"memory estimate {need['total'] / 2**30:.2f} GiB", flush=True)
        start = time.perf_counter()
        tc = train_transcoders(model, train_texts, kind=kind, **options)
        seconds = time.perf_counter() - start
        say(f"  {tc.training_log}", flush=True)
        say(f"[{time.strftime('%H:%M:%S')}] evaluating the {kind.upper()} on {eval_tokens:,} held-out tokens", flush=True)
        result = evaluate_transcoders(model, tc, test_texts, n_tokens=eval_tokens)
        say(f"  {result}", flush=True)
        results[kind] = result
        report[kind] = {"train_seconds": seconds, "train_tokens_per_s": tc.training_log.tokens_per_second,
                        "training_tokens": tc.training_log.n_tokens, "memory_estimate_bytes": need,
                        "mean_l0": result.mean_l0, "mean_explained_variance": result.mean_explained_variance,
                        "evaluation": result.to_data()}
        if out is not None:
            tc.training_log.plot(out / f"{kind}_training.png")
            result.plot(out / f"{kind}_evaluation.png")
            if save:
                save_transcoders(tc, out / kind)
    plt_, clt = results["plt"], results["clt"]
    equal = abs(plt_.mean_l0 - clt.mean_l0) <= 0.1 * max(plt_.mean_l0, clt.mean_l0)
    report["comparison"] = {
        "total_features_each": features * n_layers, "mean_l0": {"plt": plt_.mean_l0, "clt": clt.mean_l0},
        "equal_sparsity": equal,
        "ce_loss_recovered": {"plt": plt_.ce_loss_recovered, "clt": clt.ce_loss_recovered},
        "kl": {"plt": plt_.kl_replacement, "clt": clt.kl_replacement},
        "mean_explained_variance": {"plt": plt_.mean_explained_variance, "clt": clt.mean_explained_variance},
        "clt_better_replacement": bool(equal and clt.ce_loss_recovered > plt_.ce_loss_recovered
                                       and clt.kl_replacement < plt_.kl_replacement),
    }
    if out is not None:
        plot_comparison(plt_, clt, out / "transcoder_comparison.png")
    return report


def plot_comparison(plt_, clt, path) -> None:
    """Per-layer explained variance and L0 of both sets; their CE recovered and KL."""
    from mlxterp.plugin import finish, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for result, label in ((plt_, "PLTs"), (clt, "CLT")):
        axes[0].plot(result.layers, result.explained_variance, marker="o", markersize=3, label=label)
        axes[1].plot(result.layers, result.l0, marker="o", markersize=3, label=label)
    axes[0].set(title="explained variance of each MLP output", xlabel="layer")
    axes[1].set(title="L0 per layer (held out)", xlabel="layer")
    for ax in axes[:2]:
        ax.legend()
    axes[2].bar(["PLTs", "CLT"], [plt_.ce_loss_recovered, clt.ce_loss_recovered], color=["C0", "C1"])
    axes[2].set(title="replacement model: CE recovered")
    axes[3].bar(["PLTs", "CLT"], [plt_.kl_replacement, clt.kl_replacement], color=["C0", "C1"])
    axes[3].set(title="replacement model: KL to the model", ylabel="nats")
    fig.suptitle(f"{len(plt_.layers)} layers, {plt_.n_tokens:,} held-out tokens")
    fig.tight_layout()
    finish(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens of each set")
    parser.add_argument("--features", type=int, default=256, help="features per layer (the same for both)")
    parser.add_argument("--k", type=int, default=16, help="TopK's active features per token and layer")
    parser.add_argument("--activation", choices=["topk", "jumprelu", "batchtopk", "relu"], default="topk")
    parser.add_argument("--sparsity-coefficient", type=float, default=2.0, help="lambda of jumprelu / relu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--speed-tokens", type=int, default=2048)
    parser.add_argument("--forward-batch", type=int, default=8, help="windows per forward")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-run", action="store_true", help="throughput only")
    parser.add_argument("--smoke", action="store_true", help="everything at a tiny size: " + str(SMOKE))
    parser.add_argument("--save", action="store_true", help="save both sets in circuit-tracer's layout")
    parser.add_argument("--model", choices=["default", "random"], default="default")
    parser.add_argument("--out", default="transcoder-benchmark")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = default_corpus()
    if args.model == "default":
        model = load()
    else:
        from .sae_training import random_model

        model = random_model(corpus)
    train_texts, test_texts = corpus[:-150], corpus[-150:]
    import mlx_lm

    report: dict = {"backend": describe_backend(), "mlx_lm": mlx_lm.__version__, "args": vars(args)}
    print(json.dumps(report), flush=True)
    started = time.perf_counter()
    if not args.skip_speed:
        print(f"[{time.strftime('%H:%M:%S')}] throughput: {args.speed_tokens:,} tokens per case", flush=True)
        report["speed"] = training_speed(model, train_texts, n_tokens=args.speed_tokens, d_features=args.features, k=args.k,
                                         batch_size=min(args.batch_size, args.speed_tokens), forward_batch=args.forward_batch)
        print(json.dumps(report["speed"], indent=2), flush=True)
    if not args.skip_run:
        report.update(compare(model, train_texts, test_texts, features=args.features, k=args.k, tokens=args.tokens,
                              batch_size=args.batch_size, eval_tokens=args.eval_tokens, activation=args.activation,
                              sparsity_coefficient=args.sparsity_coefficient, forward_batch=args.forward_batch,
                              out=out, save=args.save))
        print(json.dumps(report["comparison"], indent=2), flush=True)
    report["seconds"] = time.perf_counter() - started
    (out / "transcoder_training.json").write_text(json.dumps(report, indent=2))
    print(f"[{time.strftime('%H:%M:%S')}] done in {report['seconds']:.0f} s; wrote {out / 'transcoder_training.json'}", flush=True)
    return report


if __name__ == "__main__":
    main()
