"""Run under two ring ranks by test_caching_processes.py: the patching analyses of a tiny model,
each rank writing what it got to OUT/rank<r>.json (not a test module itself)."""

import json
import sys

import mlx.core as mx
from helpers import tiny_llama, train_tokenizer

from mlxterp import InterpretableModel

CLEAN = [5, 17, 42, 9, 33, 71, 2, 88]
CORRUPTED = [5, 17, 60, 9, 33, 71, 2, 88]


def results():
    model = InterpretableModel(tiny_llama(), tokenizer=train_tokenizer())
    patched = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=(3, 4))
    heads = model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True, answers=(3, 4))
    attribution = model.attribution_patching(CLEAN, CORRUPTED, answers=(3, 4))
    return {"resid": patched.recovery, "heads": heads.recovery, "attribution": attribution.estimates}


if __name__ == "__main__":
    group = mx.distributed.init()
    with open(f"{sys.argv[1]}/rank{group.rank()}.json", "w") as f:
        json.dump({"size": group.size(), **results()}, f)
