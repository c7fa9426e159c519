"""How a row of ``mlxterp bench`` is measured and printed: :class:`Row`, :func:`median_times`,
:func:`run_rows` and :func:`write_json`, and the models the rows and scripts share (a random
Llama of SmolLM2-135M's shape, the default model loaded once, HF transformers' twin of a Llama).

Every ratio is measured in one run, cases interleaved in a shuffled order each round
(:func:`median_times`), so that drift and other processes hit every case alike.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx

from mlxterp.plugin import InputError, describe_backend, load

SMOLLM2_135M_SHAPE = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    rope_theta=100000,
    tie_word_embeddings=True,
)


def random_llama(**overrides):
    """A randomly initialised mlx-lm Llama (SmolLM2-135M's shape unless overridden)."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**{**SMOLLM2_135M_SHAPE, **overrides}))
    mx.eval(model.parameters())
    return model


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed" (the peers are optional)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def default_model():
    """The default model as ``mlxterp.load()`` prepares it, loaded once for all rows."""
    return load(validate=False)


def interleaved_times(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Wall times of each case in ``repeats`` rounds after ``warmup`` rounds; cases run
    interleaved, in a shuffled order each round (so that no case always follows the same one),
    the same order in every process; ``before()`` runs untimed before each case (a barrier
    across ranks, say)."""
    import random

    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        names = list(cases)
        order.shuffle(names)
        for name in names:
            if before is not None:
                before()
            start = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def median_times(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each case, run as :func:`interleaved_times` runs them."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(cases, repeats, warmup).items()}


@attrs.define
class Row:
    """One result: what was measured, the figure, the target beside it, and whether it was met
    (None where there is nothing to compare against, e.g. a peer that is not installed)."""

    workload: str
    figure: str
    target: str
    met: bool | None = None
    values: dict[str, Any] = attrs.field(factory=dict)  # the raw numbers, for --json


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def at_most(ratio: float, limit: float, what: str = "") -> tuple[str, bool]:
    """The target ``<= limit`` (``what`` names the reference) and whether ``ratio`` meets it."""
    return f"<= {limit:.2f}x{what}", ratio <= limit


def torch_llama(module):
    """HF transformers' Llama on torch's CPU backend with ``module``'s weights in float32, or
    None when torch / transformers are not installed or the model is not a Llama."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    import numpy as np
    from mlx.utils import tree_flatten

    args = getattr(module, "args", None)
    if getattr(args, "model_type", None) != "llama":
        return None
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim or args.hidden_size // args.num_attention_heads,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=max(args.max_position_embeddings or 0, 2048),
        attn_implementation="sdpa",
    )
    peer = LlamaForCausalLM(config).eval()
    weights = {
        name: torch.from_numpy(np.array(value.astype(mx.float32)))
        for name, value in tree_flatten(module.parameters())
    }
    peer.load_state_dict(weights, strict=not args.tie_word_embeddings)
    return peer


def line_by_line() -> None:
    """Print each line as it comes, into a pipe or a log too (Python buffers those by blocks,
    so a long benchmark's log stayed empty until it ended)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def run_rows(table: dict[str, Callable[[int], list[Row]]], keys: list[str] | None = None, repeats: int = 5,
             out=print) -> list[Row]:
    """Run the chosen rows of ``table`` ({key: function(repeats) -> rows}; all by default),
    printing each result as it comes."""
    unknown = [k for k in keys or [] if k not in table]
    if unknown:
        raise InputError(f"unknown benchmark rows {unknown}: choose from {', '.join(table)}")
    out(f"backend: {describe_backend()}")
    out(_line("workload", "figure", "target", "met"))
    rows = []
    for key in keys or list(table):
        for row in table[key](repeats):
            rows.append(row)
            out(_line(row.workload, row.figure, row.target, {True: "yes", False: "NO", None: "-"}[row.met]))
    return rows


WIDTHS = (44, 52, 28)


def _line(*cells: str) -> str:
    """One table line. A cell wider than its column ends its line, and the row goes on below,
    at the next column's place, so the columns stay aligned whatever the names."""
    lines, line = [], ""
    for cell, width in zip(cells, (*WIDTHS, 0)):
        if width and len(cell) > width:
            lines.append(line + cell)
            line = " " * (len(line) + width + 1)
        else:
            line += cell.ljust(width) + " " if width else cell
    return "\n".join([*lines, line.rstrip()])


def write_json(rows: list[Row], path) -> None:
    """The rows as JSON, with the backend and the machine they ran on."""
    import platform
    from pathlib import Path

    document = {
        "backend": describe_backend(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "rows": [attrs.asdict(row) for row in rows],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
