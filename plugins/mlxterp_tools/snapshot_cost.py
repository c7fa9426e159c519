"""The cost of snapshot records (issue 10): a capture-everything trace with the trace.py of
7acb50d (records were the model's own array objects) against the current one (each record a
new handle on the same buffer, ``mx.array.__copy__``), interleaved in one run.

    python -m mlxterp_tools.snapshot_cost [rounds]

Run it from a git checkout (it reads the old trace.py with ``git show``). It prints, for a
SmolLM2-135M-shaped random Llama (1 x 32 tokens) and a tiny one (1 x 8 tokens), the median
times and the ratio after/before; the expected cost is one ~0.1 us call per recorded site.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mlxterp.plugin import Hooks, InterpretableModel

from .harness import SMOLLM2_135M_SHAPE, median_times, random_llama

BEFORE_COMMIT = "7acb50d"
TINY = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320)


def old_trace_module():
    root = Path(__file__).resolve().parents[2]  # the checkout: plugins/mlxterp_tools/ is two below
    source = subprocess.run(["git", "-C", str(root), "show", f"{BEFORE_COMMIT}:mlxterp_core/trace.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "trace_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mlxterp_core.trace_before", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mlxterp_core"
    spec.loader.exec_module(module)
    return module


def main(rounds: int = 30) -> None:
    before = old_trace_module()
    for label, shape, tokens in (("SmolLM2-135M shape", {}, 32), ("tiny (4 layers, d=64)", TINY, 8)):
        module = random_llama(**shape)
        model = InterpretableModel(module, validate=False)
        ids = mx.random.randint(0, {**SMOLLM2_135M_SHAPE, **shape}["vocab_size"], (1, tokens)).astype(mx.int32)

        def everything(hooks_class):
            with hooks_class(model) as hooks:
                return hooks(ids)

        (out_before, rec_before), (out_after, rec_after) = everything(before.Hooks), everything(Hooks)
        assert mx.array_equal(out_before, out_after).item() and set(rec_before) == set(rec_after)
        assert mx.array_equal(out_after, module(ids)).item()  # traced output is the plain one
        medians = median_times({
            "plain": lambda: mx.eval(module(ids)),
            "everything, before": lambda: everything(before.Hooks),
            "everything, after": lambda: everything(Hooks),
        }, repeats=rounds, warmup=3)
        ratio = medians["everything, after"] / medians["everything, before"]
        print(f"{label}, 1 x {tokens} tokens, {len(rec_after)} sites: "
              + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in medians.items()) + f"; after/before {ratio:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
