"""Attribution patching: activation patching's linear approximation, for every site at once.

Activation patching asks, per cell, how much the metric moves when an activation takes its
clean value in the corrupted run. To first order that is ``(x_clean - x_corrupted) . dM/dx``,
with the gradient taken in the corrupted run (Nanda, "Attribution Patching", 2023; Syed et al.,
2023). One clean forward pass, one corrupted forward pass and one backward pass give the
estimate for every layer x position of the residual stream, the attention and MLP outputs,
and every head's z at once. The gradient flows through the probes with ``mx.value_and_grad``;
quantized layers differentiate with respect to their inputs as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from mlxterp.plugin import options
from mlxterp.plugin import map_rows
from mlxterp.plugin import Hooks

from .patching import COMPONENTS, PatchingError, aligned_source, compare
from .results import AttributionResult
from mlxterp.plugin import token_text

ALL_COMPONENTS = ("resid", "attn", "mlp", "heads")


def attribution_patching(
    model,
    clean_text,
    corrupted_text,
    components: Sequence[str] = ALL_COMPONENTS,
    layers: list[int] | None = None,
    metric: Callable[[mx.array], mx.array] | None = None,
    answers: tuple[Any, Any] | None = None,
    align: str | None = None,
    plot: bool = False,
    save_path=None,
    saes: Any = None,
) -> AttributionResult:
    """Estimated recovery (%) of patching each cell, for every component at once.

    ``components``: any of "resid" (layer output), "resid_pre", "resid_mid", "attn", "mlp"
    (layer x position) and "heads" (layer x head, every position). ``metric``, ``answers`` and
    ``align`` as in activation_patching. ``plot=True`` draws one heatmap per component.
    ``saes``: splices (SAEs, transcoders) in both runs and the gradient, as in
    ``with model.saes(...)``: the gradient flows through them.
    """
    arch = model.architecture_or_raise("attribution patching")
    if model.sharding is not None and model.sharding.mode == "pipeline":
        raise PatchingError(
            "attribution patching needs gradients, which do not cross mlx-lm's pipeline stages (send and recv "
            "have none): use activation_patching on this model, or shard it by tensor parallelism (shard='tensor')."
        )
    layers = options.layers(layers, arch.n_layers)
    components = [components] if isinstance(components, str) else list(components)
    if not components:
        raise options.OptionError(f"components=[]: give at least one of {', '.join(ALL_COMPONENTS)}.")
    metric, answers = options.metric(metric), options.pair(answers, "answers")
    align = options.choice(align, (None, "start", "end"), "align")
    sites = {}
    for component in components:
        if component == "heads":
            sites[component] = "attn.z_heads"
        elif component in COMPONENTS:
            sites[component] = COMPONENTS[component]
        else:
            raise PatchingError(f"component {component!r} unknown; choose from {', '.join([*COMPONENTS, 'heads'])}.")
    names = [f"layers.{i}.{sub}" for sub in dict.fromkeys(sites.values()) for i in layers]
    with model.saes(saes):
        runs = compare(model, clean_text, corrupted_text, names, answers, metric, align)
        clean, corrupted_ids, score = runs.clean, runs.corrupted_ids, runs.score
        resolved = {name: arch.resolve(name)[0] for name in names}

        def estimate(part: list[int]) -> dict[str, mx.array]:
            """Per component, the (len(part), T or H) first-order metric changes at these layers."""
            mine = [name for name in names if int(name.split(".")[1]) in part]

            def corrupted_metric(deltas: dict[str, mx.array]):
                """The metric of the corrupted run with ``deltas`` added at every site (all zero:
                its gradient is dM/dx), and the activations it saw."""
                edits = {name: _adder(deltas[name]) for name in mine}
                with Hooks(model, edits, capture=mine + ["logits"]) as hooks:
                    logits, recorded = hooks(mx.array([corrupted_ids]), evaluate=False)
                values = {name: resolved[name].read(recorded[resolved[name].site]) for name in mine}
                return score(logits).sum(), values

            zeros = {}
            for name in mine:
                shape = list(clean[name].shape)
                shape[2 if name.endswith("z_heads") else 1] = len(corrupted_ids)
                zeros[name] = mx.zeros(shape, dtype=clean[name].dtype)
            (_, corrupted), grads = mx.value_and_grad(corrupted_metric)(zeros)
            changes = {}
            for component, sub in sites.items():
                rows = []
                for i in part:
                    name = f"layers.{i}.{sub}"
                    source, valid = aligned_source(clean[name], len(corrupted_ids), runs.offset, per_head=sub == "attn.z_heads")
                    effect = ((source - corrupted[name]) * grads[name]).astype(mx.float32)
                    if sub == "attn.z_heads":  # (1, H, T, D) -> per head, all (matched) positions
                        effect = (effect * valid[None, None, :, None]).sum(axis=(2, 3))[0]
                    else:  # (1, T, D) -> per position
                        effect = effect.sum(axis=-1)[0] * valid
                    rows.append(effect)
                changes[component] = mx.stack(rows)
            return changes

        # under mlx.launch the layers are split across the ranks and the estimates gathered
        changes = map_rows(estimate, layers)
    # a first-order change of the metric, as % of the clean - corrupted difference
    estimates = {c: runs.recovery(runs.corrupted_metric + change).tolist() for c, change in changes.items()}
    result = AttributionResult(
        layers=layers,
        positions=[token_text(model, t) for t in corrupted_ids],
        heads=[str(h) for h in range(arch.n_heads)],
        estimates=estimates,
        **runs.described(model, clean_text, corrupted_text),
    )
    if plot:
        for component in estimates:
            path = None if save_path is None else _with_suffix(save_path, component)
            result[component].plot(path)
    return result


def _adder(delta: mx.array) -> Callable[[mx.array], mx.array]:
    def add(x: mx.array) -> mx.array:
        return x + delta.astype(x.dtype)

    return add


def _with_suffix(path, component: str):
    from pathlib import Path

    path = Path(path)
    return path.with_name(f"{path.stem}_{component}{path.suffix or '.png'}")
