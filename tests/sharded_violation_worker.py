"""Run under two ring ranks by test_sharding.py (not a test module itself): ranks that break the
SPMD rule on a sharded tiny model. Each case prints one line per rank, ``CASE <name>: <what was
raised>``; the ranks must stay in step after every case (the next case runs), and the last case
(``stops``) has rank 1 stop taking part, so rank 0 must end itself after MLXTERP_SHARD_TIMEOUT.

    python sharded_violation_worker.py SECONDS_RANK_1_SLEEPS
"""

from __future__ import annotations

import sys
import time

import mlxterp  # noqa: F401  first: the BLAS
import mlx.core as mx
from helpers import tiny_family

from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp_core.sharding import shard

IDS = [[11, 23, 5, 61, 7, 19]]


def report(case: str, fn) -> None:
    """Run ``fn``; print what it raised (or "no error")."""
    try:
        fn()
        outcome = "no error"
    except Exception as e:  # noqa: BLE001  what each rank saw is the test's to judge
        outcome = f"{type(e).__name__}: {e}"
    print(f"CASE {case}: {outcome}", flush=True)


def cases(mode: str, rank: int):
    module = tiny_family("qwen2", vocab_size=128)
    shard(module, mode)
    model = InterpretableModel(module)

    def failing(x):
        if rank == 0:
            raise ValueError("only rank 0 fails here")
        return x

    def layer_fails(x):  # layer 2: run by every rank under tensor parallelism, by rank 0 alone under pipeline
        raise ValueError("the rank that runs layer 2 fails")

    report(f"{mode} different_sites", lambda: model.run(IDS, capture=[f"layers.{1 + rank}.attn.z"]))
    report(f"{mode} different_inputs", lambda: model.run([[11 + rank, 23, 5, 61, 7, 19]], capture=["layers.1.output"]))
    report(f"{mode} one_rank_fails", lambda: model.run(IDS, interventions={"layers.1.attn.z": failing}))
    report(f"{mode} layer_fails", lambda: model.run(IDS, interventions={"layers.2.mlp": layer_fails}))
    report(f"{mode} in_step", lambda: model.run(IDS, capture=["layers.1.attn.z"],
                                                 interventions={"layers.0.attn.z": iv.zero_out.at(heads=[3])}))
    return model


def main() -> None:
    rank = mx.distributed.init().rank()
    cases("tensor", rank)
    model = cases("pipeline", rank)
    started = time.monotonic()
    if rank == 1:
        time.sleep(float(sys.argv[1]))  # stops taking part: rank 0 waits at its next call
    report("stops", lambda: model.run(IDS, capture=["layers.1.output"]))
    print(f"after {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
