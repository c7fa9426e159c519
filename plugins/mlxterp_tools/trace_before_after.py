"""Two versions of mlxterp's traces side by side, in one process, cases interleaved.

    git -C REPO archive REV mlxterp_core | tar -x -C DIR && mv DIR/mlxterp_core DIR/mlxterp_core_before
    python -m mlxterp_tools.trace_before_after DIR [--rounds 25] [--tokens 128] [--batches 1 8 32] [--json PATH]

'before' is that copy of mlxterp_core (an older revision, imported as mlxterp_core_before: the
package imports itself relatively), 'after' the installed one. On a random Llama of
Llama-3.2-1B's shape in bfloat16 (as mlxterp_tools.gpu_trace), at each batch size: the plain
forward and, for each version, traces capturing nothing, the 16 layer outputs by raw and by
standard names, and everything; first checked to record the same sites, bitwise equal. Then
the Python each version adds to a trace with the graph built but not evaluated
(mlxterp_tools.forward_rows.trace_python_cost, a tiny 16-layer Llama). Medians; ratios to plain.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx

from mlxterp.plugin import InterpretableModel

from .forward_rows import trace_python_cost
from .gpu_trace import LLAMA_3_2_1B
from .harness import median_times, random_llama

WHAT = ("nothing", "resid raw", "resid std", "everything")


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a folder holding mlxterp_core_before")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sys.path.insert(0, args.before)
    from mlxterp_core_before.model import InterpretableModel as Before

    module = random_llama(**LLAMA_3_2_1B)
    module.set_dtype(mx.bfloat16)
    mx.eval(module.parameters())
    models = {"before": Before(module), "after": InterpretableModel(module)}
    n = LLAMA_3_2_1B["num_hidden_layers"]
    capture = {"nothing": [], "resid raw": [f"model.model.layers.{i}" for i in range(n)],
               "resid std": [f"layers.{i}.output" for i in range(n)], "everything": None}
    mx.random.seed(1)
    batches = {b: mx.random.randint(0, 32000, (b, args.tokens)).astype(mx.int32) for b in args.batches}
    mx.eval(list(batches.values()))
    cases = {}
    for b, ids in batches.items():
        cases[f"plain B={b}"] = lambda ids=ids: mx.eval(module(ids))
        for tag, model in models.items():
            for what in WHAT:
                cases[f"{tag} {what} B={b}"] = lambda ids=ids, m=model, c=capture[what]: m.run(ids, capture=c)
    b = args.batches[0]
    for what in WHAT[1:]:  # the same records, bitwise
        old, new = cases[f"before {what} B={b}"](), cases[f"after {what} B={b}"]()
        assert list(old.activations) == list(new.activations), what
        for name, value in old.activations.items():
            assert mx.array_equal(value, new.activations[name]).item(), (what, name)
    medians = median_times(cases, args.rounds, warmup=2)
    print(f"device {mx.default_device()}, T = {args.tokens}, medians of {args.rounds} rounds: ms (ratio to plain)")
    rows = []
    for b in args.batches:
        plain = medians[f"plain B={b}"]
        row, line = {"batch": b, "plain_ms": plain * 1e3}, f"B={b:3d} plain {plain * 1e3:6.2f}"
        for what in WHAT:
            for tag in models:
                t = medians[f"{tag} {what} B={b}"]
                row[f"{tag} {what} ms"] = t * 1e3
                line += f" | {tag} {what} {t * 1e3:6.2f} {t / plain:5.3f}x"
        rows.append(row)
        print(line)
    python = {tag: trace_python_cost(300, wrap=cls) for tag, cls in (("before", Before), ("after", InterpretableModel))}
    for tag, costs in python.items():
        print(f"Python a trace adds, graph not evaluated ({tag}, us):", {k: round(v * 1e6, 1) for k, v in costs.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "rounds": args.rounds, "rows": rows, "python_s": python}, f, indent=2)


if __name__ == "__main__":
    main()
