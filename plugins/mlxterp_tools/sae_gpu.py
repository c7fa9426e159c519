"""SAE training speed on one device: mlxterp against SAELens on the same job, and mlxterp from a
live model against that model's plain forward.

    python -m mlxterp_tools.sae_gpu [--d-in 2048] [--d-sae 16384] [--k 64] [--batch 4096]
        [--steps 40] [--warmup 10] [--rounds 2] [--data gaussian lowrank] [--no-live] [--no-parts]
        [--json PATH] [--smoke]

1. **The same job in both libraries** (issue 26): a TopK SAE (d_in, d_sae, k) with AuxK, Adam,
   batches of ``--batch`` tokens, float32, from random activations already on the device (one
   array of 16 batches, drawn on the device by each library: the same distribution, not the
   same numbers). mlxterp: ``train_sae`` on the array (its shuffle buffer included); SAELens:
   ``TopKTrainingSAE`` trained by its ``SAETrainer.fit`` from a data provider that yields
   slices of a torch tensor on the device (SAELens's own loop, without a language model). Both
   count a latent dead after ``--dead-steps`` steps without firing. ``--data gaussian``: no
   latent dies, so neither library runs its AuxK pass (SAELens checks the count, mlxterp plans
   it); ``lowrank`` (rank-32 activations plus noise): many die, and both run it. SAELens runs
   twice where CUDA is there: at torch's default float32 matmul precision and with TF32, which
   is what MLX uses for float32 matmuls on CUDA unless ``MLX_ENABLE_TF32=0``.
2. **From a live model** (mlxterp only): a random-weight Llama of SmolLM2-135M's shape, 4-bit in
   groups of 32, float16 (what ``mlxterp_tools.sae_training --model random`` measured), with a
   byte tokenizer over the offline corpus: the plain forward's tokens/s over the same windows
   (32 x 128 tokens), one SAE at layers[15].output (d_sae ``--live-d-sae``, k ``--live-k``) and
   four from one forward (layers 6, 12, 18, 24). Target: one SAE >= 0.5x the plain forward.
3. **Parts** (``--no-parts`` skips them): the step's pieces timed alone on the device at the job's
   size, interleaved rounds, medians: the encoder product, the top-k selection (one argpartition
   over the row, and in groups: ``mlxterp_saes.topk_index``), TopK as trained, the decode as a
   dense product and as a gather of the k rows, an AuxK selection over all latents, one
   elementwise pass over (batch, d_sae).

Training speed is measured without warm-up: each case is run for ``--warmup`` steps and for
``--warmup + --steps`` steps (after one untimed run of the longer length, which compiles the
kernels), and tokens/s is ``steps * batch`` over the difference of the two times (medians of
``--rounds``); each run includes everything ``train_sae`` (or ``SAETrainer.fit``) does. Every
figure goes to the JSON (``--json``) with the device, the versions and the settings; a part
that fails is reported there with its error, and the rest goes on. Peers (torch, SAELens) are
optional; mlxterp never needs them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from typing import Any

import mlx.core as mx

from mlxterp.plugin import InterpretableModel, default_corpus, describe_backend, token_windows

from .harness import SMOLLM2_135M_SHAPE, median_times, package_version, random_llama

SITE = "model.random_activations"  # a raw name: the rows are given, no model is traced
LIVE_SITE = "layers.15.output"
LIVE_FOUR = ["layers.6.output", "layers.12.output", "layers.18.output", "layers.24.output"]
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


def versions() -> dict[str, str]:
    return {n: package_version(n) for n in ("mlx", "mlx-cuda-13", "mlx-lm", "torch", "sae-lens", "nnsight", "transformers")}


def guarded(name: str, function, out=print) -> dict[str, Any]:
    """``function()``'s result, or {"error": ...} (printed) when it raises: one failing part
    never stops the others."""
    try:
        return function()
    except Exception as e:  # noqa: BLE001: a benchmark reports every failure and goes on
        out(f"  {name} FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}


def throughput(fit, warmup: int, steps: int, batch: int, rounds: int) -> dict[str, float]:
    """Tokens/s of ``fit(n)`` (trains n steps, returns its seconds) over ``steps`` steps past
    ``warmup``: ``fit(warmup)`` and ``fit(warmup + steps)``, interleaved, ``rounds`` times,
    after one untimed ``fit(warmup + steps)`` (which compiles every kernel the runs need);
    medians."""
    fit(warmup + steps)
    short, long = [], []
    for _ in range(rounds):
        short.append(fit(warmup))
        long.append(fit(warmup + steps))
    seconds = statistics.median(long) - statistics.median(short)
    found = {"seconds_short": statistics.median(short), "seconds_long": statistics.median(long),
             "whole_run_tokens_per_s": (warmup + steps) * batch / statistics.median(long)}
    if seconds <= 0:  # noise larger than the steps: no figure rather than a wrong one
        return {**found, "unmeasured": "the longer run was not slower than the shorter one"}
    return {"tokens_per_s": steps * batch / seconds, "step_ms": seconds / steps * 1e3, **found}


# -- random activations --------------------------------------------------------------------


def mlx_activations(kind: str, rows: int, d_in: int, seed: int = 0) -> mx.array:
    """(rows, d_in) float32 on MLX's default device: standard normal plus a mean (``gaussian``),
    or rank-32 activations plus a little noise (``lowrank``, where many latents of a TopK SAE
    never fire)."""
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    if kind == "gaussian":
        x = mx.random.normal((rows, d_in), key=k1) + 0.5
    else:
        basis = mx.random.normal((32, d_in), key=k2) / 32**0.5
        x = mx.random.normal((rows, 32), key=k1) @ basis + 0.1 * mx.random.normal((rows, d_in), key=k3)
    mx.eval(x)
    return x


def torch_activations(kind: str, rows: int, d_in: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, d_in, device=device, generator=g) + 0.5
    basis = torch.randn(32, d_in, device=device, generator=g) / 32**0.5
    return torch.randn(rows, 32, device=device, generator=g) @ basis + 0.1 * torch.randn(
        rows, d_in, device=device, generator=g)


# -- the same job in both libraries ----------------------------------------------------------


def mlxterp_job(model, args, kind: str) -> dict[str, Any]:
    """mlxterp's tokens/s on the job (see the module doc), with the dead fraction at the end."""
    from mlxterp_saes import train_sae

    acts = mlx_activations(kind, 16 * args.batch, args.d_in)
    last = {}

    def fit(steps):
        sae = train_sae(model, SITE, acts, architecture="topk", d_sae=args.d_sae, k=args.k, n_tokens=steps * args.batch,
                        batch_size=args.batch, lr=args.lr, dead_tokens=args.dead_steps * args.batch,
                        progress=False, log_every=10**9)
        last["log"] = sae.training_log
        return sae.training_log.seconds

    mx.reset_peak_memory()
    result = throughput(fit, args.warmup, args.steps, args.batch, args.rounds)
    result.update(dead_fraction=last["log"].dead[-1], peak_memory_gib=mx.get_peak_memory() / 2**30)
    return result


def saelens_job(args, kind: str, tf32: bool) -> dict[str, Any]:
    """SAELens's tokens/s on the same job, or {"skipped": why} when it cannot run here."""
    stubbed = _stub_wandb()
    try:
        import torch
        from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as e:
        return {"skipped": f"SAELens not importable ({e})"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tf32 and device != "cuda":
        return {"skipped": "TF32 is a CUDA setting"}
    previous = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        torch.manual_seed(0)
        acts = torch_activations(kind, 16 * args.batch, args.d_in, device)

        def batches():
            i = 0
            while True:
                yield acts[(i % 16) * args.batch : (i % 16 + 1) * args.batch]
                i += 1

        last = {}

        def fit(steps):
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device,
                                                        dtype="float32"))
            config = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                                      lr=args.lr, lr_end=args.lr, device=device, dead_feature_window=args.dead_steps,
                                      logger=LoggingConfig(log_to_wandb=False))
            trainer = SAETrainer(config, sae, batches())
            _sync(torch, device)
            start = time.perf_counter()
            trainer.fit()
            _sync(torch, device)
            last["trainer"] = trainer
            return time.perf_counter() - start

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = throughput(fit, args.warmup, args.steps, args.batch, args.rounds)
        trainer = last["trainer"]
        result.update(dead_fraction=trainer.dead_neurons.float().mean().item(), device=device,
                      card=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                      tf32=tf32, wandb="a stub (not installed; never called with log_to_wandb=False)" if stubbed
                      else package_version("wandb"))
        if device == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])


def _stub_wandb() -> bool:
    """Put an empty ``wandb`` module in place when wandb is not installed: SAELens's trainer
    imports it, and calls it only when logging to wandb, which this job never does (wandb and
    its telemetry packages are ~25 MB that a lent GPU machine would have to be sent)."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    if "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None:
        return False
    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # others probe it with find_spec
    sys.modules["wandb"] = stub
    return True


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


# -- from a live model -----------------------------------------------------------------------


def live_model(smoke: bool = False):
    """A random Llama of SmolLM2-135M's shape, 4-bit in groups of 32, float16, with a byte
    tokenizer: it does the default model's work per token. ``smoke``: a 4-layer toy in
    float32 (MLX's CPU backend runs float16 and 4-bit products slowly)."""
    import mlx.nn as nn

    from .cache_gpu import ByteTokenizer

    shape = TINY_SHAPE if smoke else {}
    module = random_llama(**shape)
    if not smoke:
        nn.quantize(module, group_size=32, bits=4)
        module.set_dtype(mx.float16)
    mx.eval(module.parameters())
    vocab = {**SMOLLM2_135M_SHAPE, **shape}["vocab_size"]
    return InterpretableModel(module, tokenizer=ByteTokenizer(vocab))


def live_job(model, args) -> dict[str, Any]:
    """Tokens/s of the plain forward, of one SAE and of four SAEs from one forward, trained from
    text on ``model`` (see the module doc)."""
    from mlxterp_saes import train_sae

    texts = default_corpus()[:-150]
    n_layers = len(model.model.layers)
    site, four = (LIVE_SITE, LIVE_FOUR) if n_layers >= 25 else ("layers.1.output", [f"layers.{i}.output" for i in range(4)])
    options = dict(architecture="topk", d_sae=args.live_d_sae, k=args.live_k, batch_size=args.batch,
                   context_size=128, forward_batch=args.batch // 128, lr=args.lr, progress=False, log_every=10**9)
    max_tokens = (args.warmup + args.steps) * args.batch
    windows = list(token_windows(model, texts, 128, batch_size=args.batch // 128, max_tokens=max_tokens))
    mx.eval(model.model(windows[0].inputs))

    def plain():
        for w in windows:
            mx.eval(model.model(w.inputs))

    seconds = median_times({"plain": plain}, args.rounds)["plain"]
    plain_tps = sum(w.n_tokens for w in windows) / seconds

    def trainer(sites):
        def fit(steps):
            sae = train_sae(model, sites, texts, n_tokens=steps * args.batch, **options)
            return (sae[0] if isinstance(sae, list) else sae).training_log.seconds
        return fit

    one = throughput(trainer(site), args.warmup, args.steps, args.batch, args.rounds)
    joint = throughput(trainer(four), args.warmup, args.steps, args.batch, args.rounds)
    result = {"plain_tokens_per_s": plain_tps, "one_sae": one, "four_saes": joint, "site": site, "four": four,
              "target_one_sae_vs_plain": 0.5}
    if "tokens_per_s" in one:
        result.update(one_sae_vs_plain=one["tokens_per_s"] / plain_tps, met=one["tokens_per_s"] / plain_tps >= 0.5)
    if "tokens_per_s" in joint:
        result["four_saes_vs_plain"] = joint["tokens_per_s"] / plain_tps
    return result


# -- the step's parts ------------------------------------------------------------------------


def parts(args) -> dict[str, float]:
    """Median milliseconds of the step's pieces alone, at the job's size (see the module doc)."""
    from mlxterp_saes import topk_index, topk_relu

    B, d_in, d_sae, k = args.batch, args.d_in, args.d_sae, args.k
    k_aux = d_in // 2
    keys = mx.random.split(mx.random.key(1), 3)
    x = mx.random.normal((B, d_in), key=keys[0])
    W_enc = mx.random.normal((d_in, d_sae), key=keys[1]) / d_in**0.5
    W_dec = W_enc.T
    h = x @ W_enc
    dead = mx.random.uniform(shape=(d_sae,), key=keys[2]) < 0.1
    index = topk_index(h, k, group=0)
    values = mx.maximum(mx.take_along_axis(h, index, axis=-1), 0)
    f = topk_relu(h, k)
    mx.eval(x, W_enc, W_dec, h, dead, index, values, f)
    group = 2048  # topk_index's group size on a GPU (mlxterp_saes.architectures.topk.GROUP)
    cases = {
        "encoder product (B, d_in) x (d_in, d_sae)": lambda: mx.eval(x @ W_enc),
        "top-k: argpartition of the row": lambda: mx.eval(topk_index(h, k, group=0)),
        f"top-k: in groups of ~{group}": lambda: mx.eval(topk_index(h, k, group=group)),
        "TopK as trained (topk_relu)": lambda: mx.eval(topk_relu(h, k)),
        "decode: dense product (B, d_sae) x (d_sae, d_in)": lambda: mx.eval(f @ W_dec),
        "decode: gather of the k rows": lambda: mx.eval((values[:, None, :] @ W_dec[index])[:, 0]),
        f"AuxK top-{k_aux} over all latents (argpartition)": lambda: mx.eval(
            topk_index(mx.where(dead, h, -mx.inf), k_aux, group=0)),
        "one elementwise pass over (B, d_sae)": lambda: mx.eval(h * 2.0),
    }
    medians = median_times(cases, max(3, args.rounds * 5), warmup=2)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


# -- everything ------------------------------------------------------------------------------


def smoke_sizes(args) -> None:
    """Tiny sizes for a check of the whole script on a CPU."""
    args.d_in, args.d_sae, args.k, args.batch = 64, 512, 8, 256
    args.steps, args.warmup, args.rounds, args.dead_steps = 3, 2, 1, 2
    args.live_d_sae, args.live_k = 256, 8


def run(args, out=print, progress=None) -> dict[str, Any]:
    """Every part of this benchmark (see the module doc), printed as it goes; the document the
    JSON holds. ``progress(report)``, when given, is called with the document so far after each
    part (a caller writes it out, so that a run cut short keeps what it measured)."""
    progress = progress or (lambda report: None)
    report: dict[str, Any] = {"backend": describe_backend(), "device": str(mx.default_device()),
                              "machine": platform.machine(), "versions": versions(),
                              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out")}}
    model = live_model(smoke=args.smoke)
    jobs: dict[str, Any] = {}
    for kind in args.data:
        out(f"SAE job ({kind} activations): d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, "
            f"{args.steps} steps past {args.warmup}")
        ours = guarded(f"mlxterp ({kind})", lambda: mlxterp_job(model, args, kind), out)
        row = {"mlxterp": ours}
        out(f"  mlxterp {_tps(ours)}")
        for tf32 in (False, True):
            name = "saelens_tf32" if tf32 else "saelens"
            theirs = guarded(f"SAELens ({kind}, tf32={tf32})", lambda: saelens_job(args, kind, tf32), out)
            row[name] = theirs
            out(f"  SAELens{' (TF32)' if tf32 else ''} {_tps(theirs)}")
        peers = [row[n]["tokens_per_s"] for n in ("saelens", "saelens_tf32") if "tokens_per_s" in row[n]]
        if peers and "tokens_per_s" in ours:
            row["vs_best_saelens"] = ours["tokens_per_s"] / max(peers)
            row["target"] = ">= 1.0x the faster SAELens row"
            row["met"] = row["vs_best_saelens"] >= 1.0
            out(f"  mlxterp / faster SAELens: {row['vs_best_saelens']:.2f}x (target >= 1.0x): {_met(row['met'])}")
        jobs[kind] = row
        report["job"] = jobs
        progress(report)
    report["job"] = jobs
    if args.live:
        out(f"live model: plain forward vs training from text (d_sae {args.live_d_sae}, k {args.live_k}, "
            f"batch {args.batch})")
        live = guarded("live model", lambda: live_job(model, args), out)
        if "plain_tokens_per_s" in live:
            ratio = f"{live['one_sae_vs_plain']:.2f}x (target >= 0.5x: {_met(live['met'])})" if "met" in live else "-"
            four = f" = {live['four_saes_vs_plain']:.2f}x" if "four_saes_vs_plain" in live else ""
            out(f"  plain forward {live['plain_tokens_per_s']:,.0f} tok/s; one SAE {_tps(live['one_sae'])} = {ratio}; "
                f"four from one forward {_tps(live['four_saes'])} each{four}")
        report["live"] = live
        progress(report)
    if args.parts:
        out("the step's parts alone (median ms):")
        found = guarded("parts", lambda: parts(args), out)
        for name, ms in found.items():
            if isinstance(ms, float):
                out(f"  {name:52s} {ms:8.3f} ms")
        report["parts_ms"] = found
    return report


def _tps(result: dict) -> str:
    if "tokens_per_s" in result:
        return f"{result['tokens_per_s']:,.0f} tok/s ({result['step_ms']:.2f} ms/step, dead {result.get('dead_fraction', 0):.1%})"
    return result.get("skipped") or result.get("unmeasured") or result.get("error", "?")


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step (a multiple of 128)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps, past the warm-up")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dead-steps", type=int, default=5, help="steps without firing before a latent is dead")
    parser.add_argument("--data", nargs="+", default=["gaussian", "lowrank"], choices=["gaussian", "lowrank"])
    parser.add_argument("--live-d-sae", type=int, default=9216)
    parser.add_argument("--live-k", type=int, default=32)
    parser.add_argument("--no-live", dest="live", action="store_false", help="skip the live-model case")
    parser.add_argument("--no-parts", dest="parts", action="store_false", help="skip the step's parts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="write every figure here too")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke_sizes(args)
    print(f"{describe_backend()}; {versions()}", flush=True)
    def write(report):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    write(run(args, progress=write))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
