"""The ``sharded`` rows of ``mlxterp bench``: a model sharded across ranks of a ring on this
machine (loopback), per forward pass.

The row starts the ranks itself (a hostfile on free localhost ports, one BLAS thread per rank)
and checks every rank's exit status (``mlx.launch`` exits 0 whatever its ranks do). Each rank
builds the same seeded random models (a Llama for tensor parallelism, a Qwen2 for pipeline
parallelism, both at ``SHAPE``) and times, cases interleaved in the same shuffled order on every
rank (:func:`~mlxterp_tools.harness.median_times`; the same seed everywhere, as the SPMD rule
wants):

- the unsharded model, each rank running it at the same time as the other (the fair baseline:
  the machine's cores are shared alike);
- the sharded model's plain forward (mlx-lm's own collectives);
- a residual-stream trace (every layer's output): target <= 1.1x the sharded plain forward;
- a trace gathering many sharded sites (every layer's q, k, v and z), and how many collectives
  mlxterp adds to a pass (target: one agreement and one gather per dtype, whatever the sites).

Loopback says what the library adds on one machine; Thunderbolt or Ethernet between Macs
(ring or JACCL) adds latency per collective that loopback does not show (docs/guide/sharded.md).

    python -m mlxterp_tools.sharded_rows            # the rows, printed
    python -m mlxterp_tools.sharded_rows --worker OUT   # one rank (started by the row)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .harness import Row, at_most, interleaved_times, milliseconds
from .ring import run_ring

SHAPE = dict(hidden_size=512, num_hidden_layers=12, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=8192, rope_theta=10000.0, tie_word_embeddings=True)
TOKENS = 64
RANKS = 2


def sharded_rows(repeats: int = 5) -> list[Row]:
    """Run the worker on RANKS ring ranks of this machine; the rows from rank 0's figures."""
    with tempfile.TemporaryDirectory(prefix="mlxterp-sharded-bench-") as folder:
        figures = _launch(Path(folder), repeats)
    rows = []
    for mode, found in figures.items():
        t, fast = found["times"], found["fastest"]
        sharded, unsharded = t["sharded plain"], t["unsharded, both ranks at once"]
        label = f"sharded, {mode} over {RANKS} ranks (loopback)"
        rows.append(Row(f"{label}: forward 1x{TOKENS}", f"{milliseconds(sharded)} vs unsharded {milliseconds(unsharded)}"
                        f" run by both ranks: {sharded / unsharded:.2f}x (fastest {fast['sharded plain'] / fast['unsharded, both ranks at once']:.2f}x)",
                        "- (memory, not speed)", None,
                        {"sharded_s": sharded, "unsharded_s": unsharded, "fastest": fast}))
        ratio = t["residual stream"] / sharded
        target, met = at_most(ratio, 1.1, " sharded plain")
        rows.append(Row(f"{label}: residual-stream trace", f"{milliseconds(t['residual stream'])}: {ratio:.3f}x "
                        f"(fastest {fast['residual stream'] / fast['sharded plain']:.3f}x); "
                        f"+{found['collectives']['residual stream']} collectives", target, met,
                        {"trace_s": t["residual stream"], "plain_s": sharded, "ratio": ratio}))
        ratio = t["gathered sites"] / sharded
        added = found["collectives"]["gathered sites"]
        rows.append(Row(f"{label}: {found['gathered']} gathered sites", f"{milliseconds(t['gathered sites'])}: "
                        f"{ratio:.3f}x (fastest {fast['gathered sites'] / fast['sharded plain']:.3f}x); +{added} collectives a pass",
                        "<= 2 collectives (agreement, gather)", added <= 2, {"trace_s": t["gathered sites"], "ratio": ratio,
                                                                  "collectives": added}))
    return rows


def _launch(folder: Path, repeats: int) -> dict:
    command = [sys.executable, "-m", "mlxterp_tools.sharded_rows", "--worker", str(folder), "--repeats", str(repeats)]
    try:
        results = run_ring([command] * RANKS, folder, timeout=1800)
    except TimeoutError as e:
        raise RuntimeError(f"the sharded benchmark's ranks did not finish in 30 minutes: {e}") from None
    for rank, (code, output) in enumerate(results):
        if code != 0:
            raise RuntimeError(f"rank {rank} of the sharded benchmark exited {code}:\n{output[-3000:]}")
    return json.loads((folder / "rank0.json").read_text())


def worker(out: str, repeats: int) -> None:
    import mlx.core as mx
    from mlx_lm.models import llama, qwen2

    from mlxterp.plugin import InterpretableModel

    group = mx.distributed.init()
    counts = {"n": 0}
    for name in ("all_gather", "all_sum"):  # count the collectives a pass issues
        original = getattr(mx.distributed, name)

        def counted(*args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(*args, **kwargs)

        setattr(mx.distributed, name, counted)
    figures = {}
    for mode, family in (("tensor", llama), ("pipeline", qwen2)):
        def build():
            mx.random.seed(0)
            module = family.Model(family.ModelArgs(model_type=family.__name__.rsplit(".", 1)[1], **SHAPE))
            mx.eval(module.parameters())
            return module

        unsharded = build()
        module = build()
        if mode == "tensor":
            module.shard(group)
        else:
            module.model.pipeline(group)
        model = InterpretableModel(module, validate=False)
        n = SHAPE["num_hidden_layers"]
        ids = (mx.arange(TOKENS)[None] * 37 % SHAPE["vocab_size"]).astype(mx.int32)
        residual = [f"layers.{i}.output" for i in range(n)]
        gathered = [f"layers.{i}.attn.{s}" for i in range(n) for s in ("q", "k", "v", "z")]
        if mode == "pipeline":  # every stage's layers, shared with every rank
            gathered = residual + [f"layers.{i}.mlp" for i in range(n)]
        cases = {
            "unsharded, both ranks at once": lambda: mx.eval(unsharded(ids)),
            "sharded plain": lambda: mx.eval(module(ids)),
            "residual stream": lambda: model.run(ids, capture=residual),
            "gathered sites": lambda: model.run(ids, capture=gathered),
        }
        collectives = {}
        for name in ("residual stream", "gathered sites"):
            cases[name]()  # once before counting: a pipeline's stages describe their records the first time
            plain = counts["n"]
            cases["sharded plain"]()
            plain = counts["n"] - plain
            before = counts["n"]
            cases[name]()
            collectives[name] = counts["n"] - before - plain
        times, fastest = _interleaved(cases, repeats, group)
        figures[mode] = {"times": times, "fastest": fastest, "collectives": collectives, "gathered": len(gathered)}
    if group.rank() == 0:
        Path(out, "rank0.json").write_text(json.dumps(figures))


def _interleaved(cases: dict, repeats: int, group, warmup: int = 2) -> tuple[dict, dict]:
    """Median and fastest seconds of each case; rounds of every case in one shuffled order
    (the same on every rank), each case started together (a barrier before it, not timed)."""
    import statistics

    import mlx.core as mx

    seen = interleaved_times(cases, repeats, warmup, before=lambda: mx.eval(mx.distributed.all_sum(mx.array(1), group=group)))
    return ({name: statistics.median(t) for name, t in seen.items()}, {name: min(t) for name, t in seen.items()})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="OUT")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
    else:
        from .harness import run_rows

        run_rows({"sharded": sharded_rows}, ["sharded"], args.repeats)
