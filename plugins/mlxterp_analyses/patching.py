"""Activation patching: which activations carry what distinguishes a clean prompt from a
corrupted one.

Run the corrupted prompt with one activation (a layer's MLP or attention output, its residual
stream, one position of it, or one attention head) replaced by its value in the clean run, and
measure how much of the clean behaviour comes back: ``(metric - corrupted) / (clean -
corrupted)``, in percent. The default metric is the logit difference between the clean run's
answer and the corrupted run's answer at the last position.

The sweep is batched: every patched cell is one row of a batch of the corrupted prompt, each row
patched through a row-wise mask (not one pass per cell). Rows reuse the corrupted run where the
patch cannot have changed it (see :mod:`.causal`): a row patched at block l, position p starts at
block l, runs positions p.. only and is unembedded only where the metric reads; models where that
cannot be done exactly run whole forward passes, as many rows at a time as the memory budget
allows. Written against standard names only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import mlx.core as mx

from mlxterp.plugin import interventions, options
from mlxterp.plugin import map_rows
from mlxterp.plugin import Hooks, MlxterpError
from mlxterp.plugin import progress_bar

from .causal import CannotReuse, CorruptedRun, Row, check_control, rows_per_batch, run_rows, start_batches
from .results import PatchingResult
from mlxterp.plugin import ids_text, token_ids, token_text

COMPONENTS = {
    "mlp": "mlp",
    "attn": "attn",
    "self_attn": "attn",
    "resid": "output",
    "resid_post": "output",
    "resid_pre": "input",
    "resid_mid": "resid_mid",
}
MEMORY_BUDGET = 2**30  # bytes per batched forward pass (a rough per-row estimate decides rows)
DISTANCES = ("l2", "cosine", "mse")  # upstream mlxterp's metrics: distance to the clean logits


class PatchingError(MlxterpError):
    """Prompts or options that activation patching cannot work with."""


@attrs.frozen
class Cell:
    layer: int
    position: int | None = None  # None: every (aligned) position
    head: int | None = None


def logit_difference(good: int, bad: int) -> Callable[[mx.array], mx.array]:
    """logits (B, T, V) -> (B,): logit of ``good`` minus logit of ``bad`` at the last position."""

    def metric(logits: mx.array) -> mx.array:
        last = logits[:, -1].astype(mx.float32)
        return last[:, good] - last[:, bad]

    metric.__name__ = "logit_difference"
    return reads_last(1)(metric)


def closeness_to(clean_logits: mx.array, distance: str) -> Callable[[mx.array], mx.array]:
    """logits (B, T, V) -> (B,): minus the ``distance`` ("l2", "cosine" or "mse") of the last
    position's logits from ``clean_logits`` (V,), so that recovery is upstream mlxterp's
    ``(d(corrupted) - d(patched)) / d(corrupted)``."""
    clean = clean_logits.astype(mx.float32)

    def metric(logits: mx.array) -> mx.array:
        last = logits[:, -1].astype(mx.float32)
        if distance == "l2":
            far = mx.sqrt(((last - clean) ** 2).sum(axis=-1))
        elif distance == "mse":
            far = ((last - clean) ** 2).mean(axis=-1)
        else:
            far = 1 - (last * clean).sum(axis=-1) / (mx.linalg.norm(last, axis=-1) * mx.linalg.norm(clean))
        return 0.0 - far  # not -far: the clean run scores 0, not -0

    metric.__name__ = f"minus the {distance} distance to the clean logits"
    return reads_last(1)(metric)


def reads_last(positions: int) -> Callable:
    """Declare that a metric reads only the last ``positions`` positions of the logits (and
    indexes them from the end, ``logits[:, -1]``): sweeps then unembed only those and pass
    logits (B, positions, V). A metric without the declaration gets every position.

    >>> @reads_last(1)
    ... def probability_of_paris(logits): ...
    """

    def declare(metric):
        metric.reads_last = int(positions)
        return metric

    return declare


def activation_patching(
    model,
    clean_text: str | Sequence[int],
    corrupted_text: str | Sequence[int],
    component: str = "mlp",
    layers: list[int] | None = None,
    plot: bool = False,
    positions: str | Sequence[int] | None = None,
    heads: bool = False,
    metric: Callable[[mx.array], mx.array] | str | None = None,
    answers: tuple[Any, Any] | None = None,
    align: str | None = None,
    memory_budget: int = MEMORY_BUDGET,
    save_path=None,
    progress: bool = True,
    saes: Any = None,
) -> PatchingResult:
    """Patch clean activations into the corrupted run; recovery (%) per layer (and position or head).

    Args:
        clean_text: the clean prompt, a string or token ids.
        corrupted_text: the corrupted prompt, a string or token ids.
        component: "mlp", "attn" (or "self_attn"), "resid" (layer output), "resid_pre" (layer
            input) or "resid_mid"; or any block-level standard name ("attn.z", "mlp.act") or
            module path in the block ("mlp.gate_proj"), patched where it stands.
        layers: which layers (default all).
        positions: None patches every position at once; "all" (or a list of positions) patches
            one position per cell.
        heads: patch one attention head per cell (through ``attn.z_heads``, all positions).
        metric: ``logits (B, T, V) -> (B,)``; default: logit difference of the two answers at
            the last position. A metric that reads only the last k positions can say so with
            ``@reads_last(k)`` (it then gets logits (B, k, V)), which makes sweeps faster.
            "l2", "cosine" or "mse" (upstream mlxterp's): how much closer the last position's
            logits come to the clean run's, ``(d(corrupted) - d(patched)) / d(corrupted)``.
        answers: (clean answer, corrupted answer) as token ids or strings; default: each run's
            top prediction at the last position.
        align: prompts of different token counts are an error unless ``align`` is "start" or
            "end": positions are then matched from that end, and only matched positions patched.
        memory_budget: bytes per batched forward pass.
        progress: show a progress bar (only when stderr is a terminal).
        saes: splices (SAEs, transcoders) in every run, clean, corrupted and patched, as in
            ``with model.saes(...)``.
    """
    arch = model.architecture_or_raise("activation patching")
    layers = options.layers(layers, arch.n_layers)
    if positions is not None and positions != "all":
        positions = options.positions(positions, len(token_ids(model, corrupted_text)))
    metric = options.choice(metric, DISTANCES, "metric") if isinstance(metric, str) else options.metric(metric)
    answers = options.pair(answers, "answers")
    align = options.choice(align, (None, "start", "end"), "align")
    memory_budget = options.integer(memory_budget, "memory_budget", 1)
    sub = _component(model, component, heads)
    names = [f"layers.{i}.{sub}" for i in layers]
    with model.saes(saes):
        runs = compare(model, clean_text, corrupted_text, names, answers, metric, align)
        corrupted_ids = runs.corrupted_ids
        cells = _cells(layers, len(corrupted_ids), arch.n_heads, positions, heads)
        sources = {i: runs.clean[f"layers.{i}.{sub}"] for i in layers}
        scores = patch_sweep(model, corrupted_ids, sources, sub, cells, runs.score, runs.offset, memory_budget, progress)
    recovery = runs.recovery(scores).tolist()
    per_layer = len(cells) // len(layers)
    values = [recovery[k * per_layer : (k + 1) * per_layer] for k in range(len(layers))]
    if heads:
        axis, labels = "head", [str(h) for h in range(arch.n_heads)]
    elif positions is not None:
        axis, labels = "position", [token_text(model, corrupted_ids[c.position]) for c in cells[:per_layer]]
    else:
        axis, labels = "layer", []
    result = PatchingResult(
        component=component + (" heads" if heads else ""),
        axis=axis,
        layers=layers,
        labels=labels,
        recovery=values,
        **runs.described(model, clean_text, corrupted_text),
    )
    if plot:
        result.plot(save_path)
    return result


@attrs.frozen
class Comparison:
    """A clean and a corrupted prompt, each run once: where both patching methods start.

    ``clean`` holds the clean run's activations at the names asked for and its logits;
    ``score`` is the metric, ``clean_metric`` / ``corrupted_metric`` its values on the two runs.
    """

    clean_ids: list[int]
    corrupted_ids: list[int]
    offset: int  # corrupted position p matches clean position p + offset
    clean: Any
    clean_answer: int
    corrupted_answer: int
    score: Callable[[mx.array], mx.array]
    clean_metric: float
    corrupted_metric: float

    def recovery(self, scores: mx.array) -> mx.array:
        """Metric values as % of the way from the corrupted run (0) to the clean run (100)."""
        return (scores - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric) * 100

    def described(self, model, clean_text, corrupted_text) -> dict[str, Any]:
        """The fields every patching result shares."""
        return dict(
            clean_text=_text(model, clean_text),
            corrupted_text=_text(model, corrupted_text),
            clean_answer=token_text(model, self.clean_answer),
            corrupted_answer=token_text(model, self.corrupted_answer),
            clean_metric=self.clean_metric,
            corrupted_metric=self.corrupted_metric,
            metric=getattr(self.score, "__name__", "metric"),
        )


def compare(model, clean_text, corrupted_text, names: list[str], answers, metric, align) -> Comparison:
    """Run both prompts (the clean one capturing ``names``), pick the answers and the metric."""
    clean_ids, corrupted_ids = token_ids(model, clean_text), token_ids(model, corrupted_text)
    offset = _alignment(model, clean_ids, corrupted_ids, align)
    clean = model.run([clean_ids], capture=names + ["logits"]).activations
    corrupted_logits = model.run([corrupted_ids], capture=["logits"]).activations["logits"]
    clean_answer, corrupted_answer = _answers(model, answers, clean["logits"], corrupted_logits, distinct=metric is None)
    if isinstance(metric, str):
        metric = closeness_to(clean["logits"][0, -1], metric)
    score = metric or logit_difference(clean_answer, corrupted_answer)
    clean_metric, corrupted_metric = score(clean["logits"]).item(), score(corrupted_logits).item()
    if abs(clean_metric - corrupted_metric) < 1e-6:
        raise PatchingError(
            f"the clean and corrupted runs score the same ({clean_metric:.4f}), so there is nothing "
            "to recover: choose prompts (or answers=, metric=) that the model tells apart."
        )
    return Comparison(clean_ids, corrupted_ids, offset, clean, clean_answer, corrupted_answer, score,
                      clean_metric, corrupted_metric)


def patch_sweep(
    model,
    target_ids: list[int],
    sources: dict[int, mx.array],
    sub: str,
    cells: list[Cell],
    score: Callable[[mx.array], mx.array],
    offset: int = 0,
    memory_budget: int = MEMORY_BUDGET,
    progress: bool = True,
) -> mx.array:
    """The metric of the target prompt with each cell patched from ``sources`` (layer -> the
    activation at ``layers[layer].<sub>`` of the source run), one cell per batch row: (cells,).

    ``offset``: target position p takes the source's position p + offset. Rows re-enter the
    target's own run where they can (:func:`causal_sweep`), else run whole passes
    (:func:`full_sweep`, always under ``model.saes(...)``); both give the same numbers. Under ``mlx.launch`` the cells are split
    across the ranks and the scores gathered (every rank gets them all).
    """
    return map_rows(lambda part: _sweep(model, target_ids, sources, sub, part, score, offset, memory_budget, progress), cells)


def _sweep(model, target_ids, sources, sub, cells, score, offset, memory_budget, progress) -> mx.array:
    try:
        return causal_sweep(model, target_ids, sources, sub, cells, score, offset, memory_budget, progress)
    except CannotReuse:
        return full_sweep(model, target_ids, sources, sub, cells, score, offset, memory_budget, progress)


def causal_sweep(model, target_ids, sources, sub, cells, score, offset=0, memory_budget=MEMORY_BUDGET, progress=True) -> mx.array:
    """:func:`patch_sweep` by re-entering the target's run (see :mod:`.causal`); raises
    CannotReuse where that is not exact for this model."""
    if model.attached_saes:
        # re-entered blocks are called one by one, outside the pass that applies splices
        raise CannotReuse("splices (model.saes) are attached: the sweep runs whole forward passes")
    arch = model.architecture
    run = CorruptedRun(model, target_ids)
    length, per_head = len(target_ids), sub == "attn.z_heads"
    reads = getattr(score, "reads_last", None)
    reads = None if reads is None else max(1, min(int(reads), length))
    aligned = {layer: aligned_source(sources[layer], length, offset, per_head) for layer in sorted({c.layer for c in cells})}
    valid = {layer: v.tolist() for layer, (_, v) in aligned.items()}
    rows = [_row(i, cell, sub, aligned[cell.layer][0], valid[cell.layer], arch) for i, cell in enumerate(cells)]
    example = next(iter(sources.values()))
    width = example.shape[-1] * (example.shape[1] if per_head else 1)
    vocab = run.logits.shape[-1]
    read = length if reads is None else reads
    batches = start_batches(
        rows, lambda span: rows_per_batch(span, read, width, arch.n_layers, vocab, memory_budget), length, arch.n_layers
    )
    sources_at = {layer: source for layer, (source, _) in aligned.items()}
    scores: list[Any] = [None] * len(cells)
    # Unpatched control rows check that re-entering is exact: in the first batch and in the
    # one of the latest start (the two ends: an empty and the longest cache of earlier positions)
    latest = max(range(len(batches)), key=lambda b: min(r.start for r in batches[b]))
    with progress_bar(len(cells), "patching", progress, unit="cell") as bar:
        for number, batch in enumerate(batches):
            controlled = number in (0, latest)
            if controlled:
                batch = [*batch, Row(-1, min(r.layer for r in batch), min(r.start for r in batch))]
            logits = run_rows(run, batch, sub, sources_at, reads)
            values = score(logits)
            mx.eval(values)
            if controlled:
                check_control(run, logits[-1:], reads)
                batch, values = batch[:-1], values[:-1]
            for row, value in zip(batch, values):
                scores[row.index] = value
            bar.update(len(batch))
    return mx.stack(scores)


def _row(index: int, cell: Cell, sub: str, source: mx.array, valid: list[bool], arch) -> Row:
    """How the row of ``cell`` re-enters the target's run (see causal.Row)."""
    length = len(valid)
    positions = [p for p in range(length) if valid[p] and (cell.position is None or p == cell.position)]
    if not positions:  # nothing to patch: the target's own run
        return Row(index, arch.n_layers, length - 1)
    at = mx.array([p in positions for p in range(length)])[:, None]  # (T, 1)
    if sub == "attn.z_heads":
        return Row(index, cell.layer, positions[0], mask=(mx.arange(arch.n_heads) == cell.head)[:, None, None] & at[None])
    if sub in ("input", "output"):
        return Row(index, cell.layer + (sub == "output"), positions[0], mask=at, source=source)
    return Row(index, cell.layer, positions[0], mask=at)


def full_sweep(model, target_ids, sources, sub, cells, score, offset=0, memory_budget=MEMORY_BUDGET, progress=True) -> mx.array:
    """:func:`patch_sweep` by whole forward passes of the target, one row per cell."""
    length = len(target_ids)
    example = next(iter(sources.values()))
    width = example.shape[-1] * (example.shape[1] if example.ndim == 4 else 1)
    rows = _rows_per_pass(length, width, model.architecture.n_layers, memory_budget)
    scores = []
    with progress_bar(len(cells), "patching", progress, unit="cell") as bar:
        for start in range(0, len(cells), rows):
            chunk = cells[start : start + rows]
            ids = mx.array([target_ids] * len(chunk))
            edits = {}
            for layer in sorted({c.layer for c in chunk}):
                source, valid = aligned_source(sources[layer], length, offset, per_head=sub == "attn.z_heads")
                mask = _mask(chunk, layer, valid, source.shape)
                edits[f"layers.{layer}.{sub}"] = _replace_where(mask, source)
            logits = model.run(ids, interventions=edits, capture=["logits"]).activations["logits"]
            scores.append(score(logits))
            mx.eval(scores[-1])
            bar.update(len(chunk))
    return mx.concatenate(scores)


def _replace_where(mask: mx.array, source: mx.array) -> Callable[[mx.array], mx.array]:
    # elementwise: on a model sharded by tensor parallelism each rank patches its own heads
    return interventions.replace_where(mask, source)


def aligned_source(source: mx.array, length: int, offset: int, per_head: bool) -> tuple[mx.array, mx.array]:
    """The source activation re-indexed to target positions, and which target positions have
    a source position; time is axis 2 of a (1, H, T, D) per-head view, else axis 1."""
    axis = 2 if per_head else 1
    span = source.shape[axis]
    wanted = mx.arange(length) + offset
    valid = (wanted >= 0) & (wanted < span)
    index = mx.clip(wanted, 0, span - 1)
    return mx.take(source, index, axis=axis), valid


def _mask(chunk: list[Cell], layer: int, valid: mx.array, shape) -> mx.array:
    """(B, T, 1) or (B, H, T, 1) boolean: where each row patches this layer."""
    length = valid.shape[0]
    per_head = len(shape) == 4
    rows = []
    for cell in chunk:
        if cell.layer != layer:
            rows.append(mx.zeros((shape[1], length) if per_head else (length,), dtype=mx.bool_))
            continue
        at = valid if cell.position is None else valid & (mx.arange(length) == cell.position)
        if per_head:
            head = mx.arange(shape[1]) == cell.head
            rows.append(head[:, None] & at[None, :])
        else:
            rows.append(at)
    return mx.stack(rows)[..., None]


def _rows_per_pass(length: int, width: int, n_layers: int, budget: int, vocab: int = 2**17) -> int:
    """Rows per batched pass from a rough per-row estimate: the logits (a generous vocabulary)
    plus a dozen residual-width activations per layer, in float32."""
    per_row = length * (vocab + n_layers * width * 12) * 4
    return max(1, min(512, budget // per_row))


def _component(model, component: str, heads: bool) -> str:
    """The block-level name ``component`` patches: ``layers.{i}.<it>`` is a standard name or a
    module of the block (``mlp.gate_proj``, resolved as trace keys are)."""
    sub = COMPONENTS.get(component, component)
    if heads:
        if sub != "attn":
            raise PatchingError("heads=True patches attention heads: use component='attn'.")
        return "attn.z_heads"
    if component not in COMPONENTS:
        try:
            Hooks(model, capture=[f"layers.0.{sub}"])  # resolves the name, finds its module; runs nothing
        except MlxterpError as e:
            raise PatchingError(
                f"component {component!r} unknown; choose one of {', '.join(COMPONENTS)}, a block-level standard "
                f"name ('attn.z') or a module path in the block ('mlp.gate_proj'). {e}"
            ) from None
    return sub


def _cells(layers, length: int, n_heads: int, positions, heads: bool) -> list[Cell]:
    if heads:
        return [Cell(layer, head=h) for layer in layers for h in range(n_heads)]
    if positions is None:
        return [Cell(layer) for layer in layers]
    chosen = range(length) if positions == "all" else [p % length for p in positions]
    return [Cell(layer, position=p) for layer in layers for p in chosen]


def _text(model, text) -> str:
    return text if isinstance(text, str) else ids_text(model, text)


def _alignment(model, clean: list[int], corrupted: list[int], align: str | None) -> int:
    if len(clean) == len(corrupted):
        return 0
    if align == "start":
        return 0
    if align == "end":
        return len(clean) - len(corrupted)
    show = lambda ids: " | ".join(repr(token_text(model, t)) for t in ids)  # noqa: E731
    raise PatchingError(
        f"the prompts have different token counts ({len(clean)} clean, {len(corrupted)} "
        f"corrupted), so positions do not correspond:\n  clean:     {show(clean)}\n  corrupted: "
        f"{show(corrupted)}\nRephrase one so both have the same count, or pass align='end' (or "
        "'start') to match positions from that end."
    )


def _answers(model, answers, clean_logits: mx.array, corrupted_logits: mx.array, distinct: bool = True) -> tuple[int, int]:
    """The two answers: given, else each run's top prediction; those must differ (``distinct``)
    where the default metric compares them."""
    if answers is not None:
        return tuple(answer_token(model, a) for a in answers)
    clean_answer = mx.argmax(clean_logits[0, -1]).item()
    corrupted_answer = mx.argmax(corrupted_logits[0, -1]).item()
    if clean_answer == corrupted_answer and distinct:
        raise PatchingError(
            f"both runs predict {token_text(model, clean_answer)!r}: pass answers=(clean, "
            "corrupted) tokens to compare, or a metric=."
        )
    return clean_answer, corrupted_answer


def answer_token(model, answer) -> int:
    if not isinstance(answer, str):
        return options.token(answer, model.embedding_vocab_size, "answers")
    ids = model.encode(answer)
    if len(ids) != 1:
        raise PatchingError(f"answer {answer!r} is {len(ids)} tokens; give a single token (or its id).")
    return ids[0]
