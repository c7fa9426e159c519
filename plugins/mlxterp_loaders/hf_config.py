"""Hugging Face ``config.json`` as mlx-lm reads it, whichever transformers version wrote it.

transformers 5 keeps the RoPE settings only under ``rope_parameters`` (per layer type for
models with sliding-window layers: ``{"full_attention": {...}, "sliding_attention": {...}}``)
and writes its own field names where mlx-lm still reads the older ones (``num_local_experts``
for ``num_experts``, ``num_hidden_layers`` for EXAONE's ``num_layers``, no GPT-2 ``n_ctx``).
mlx-lm then refuses the folder (a required field is missing) or, worse, builds the model with
its default RoPE base. :func:`legacy_keys` returns the older keys to add; keys already present
are never changed, so a folder saved by transformers 4 loads exactly as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlxterp.plugin import LoadError

# mlx-lm's name <- transformers 5's name, per model_type ("*": every model type)
_RENAMED = {
    "*": {"num_experts": "num_local_experts"},  # (transformers 5's attribute_map, reversed)
    "gpt2": {"n_ctx": "n_positions"},
    "gpt_neox": {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"},
    "exaone": {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps"},
}
# model types whose sliding-window layers have a RoPE base of their own in mlx-lm
_LOCAL_BASE = {"gemma3_text": "rope_local_base_freq", "gemma3": "rope_local_base_freq"}
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys mlx-lm reads that ``config`` lacks, derived from the transformers 5 keys it has.

    Raises LoadError naming the key when the config says something mlx-lm cannot represent
    (sliding-window layers with a RoPE of their own in a family where mlx-lm has one RoPE).
    """
    model_type = config.get("model_type", "")
    added: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if key not in config and key not in added and value is not None:
            added[key] = value

    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        per_type = all(isinstance(v, dict) for v in rope.values())
        full = (rope.get("full_attention") or next(iter(rope.values()))) if per_type else rope
        add("rope_theta", full.get("rope_theta"))
        add("partial_rotary_factor", full.get("partial_rotary_factor"))
        kind = full.get("type") or full.get("rope_type")  # mlx-lm's order of the two keys
        if kind not in (None, "default"):
            scaling = {k: v for k, v in full.items() if k not in _NOT_SCALING}
            add("rope_scaling", {**scaling, "type": kind, "rope_type": kind})
        sliding = rope.get("sliding_attention") if per_type else None
        if sliding is not None:
            _sliding_rope(model_type, full, sliding, add)
    if model_type.startswith("gemma3") and "layer_types" in config:
        add("sliding_window_pattern", _period(config["layer_types"]))
    for table in (_RENAMED["*"], _RENAMED.get(model_type, {})):
        for old, new in table.items():
            add(old, added.get(new, config.get(new)))
    args_class = _mlx_lm_args(config)
    if args_class is not None:  # only what this family's mlx-lm class reads
        fields = {f.name for f in dataclasses.fields(args_class)}
        added = {k: v for k, v in added.items() if k in fields}
    return added


def _sliding_rope(model_type: str, full: dict, sliding: dict, add) -> None:
    local = _LOCAL_BASE.get(model_type)
    if (sliding.get("type") or sliding.get("rope_type", "default")) != "default":
        raise LoadError(
            f"config.json: rope_parameters.sliding_attention scales RoPE ({sliding}); mlx-lm's "
            f"{model_type} gives sliding-window layers plain RoPE, so this model would be wrong."
        )
    if local is not None:
        add(local, sliding.get("rope_theta"))
    elif sliding.get("rope_theta", full.get("rope_theta")) != full.get("rope_theta"):
        raise LoadError(
            f"config.json: rope_parameters.sliding_attention.rope_theta is "
            f"{sliding.get('rope_theta')} and rope_parameters.full_attention.rope_theta is "
            f"{full.get('rope_theta')}; mlx-lm's {model_type} uses one rope_theta for every layer. "
            "Set both to the value the model was trained with."
        )


def _period(layer_types: list[str]) -> int:
    """Gemma 3's sliding_window_pattern: every n-th layer is global."""
    n = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else len(layer_types) + 1
    expected = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != expected:
        raise LoadError(
            f"config.json: layer_types {layer_types} is not every {n}-th layer global, the only "
            "layout mlx-lm's gemma3 builds (sliding_window_pattern)."
        )
    return n


def check_required(config: dict[str, Any]) -> None:
    """Fail, naming the keys, when mlx-lm's ModelArgs for this model_type needs keys the config
    lacks (before mlx-lm fails with a bare TypeError)."""
    args_class = _mlx_lm_args(config)
    if args_class is None:
        return
    missing = [
        f.name for f in dataclasses.fields(args_class)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in config
    ]
    if missing:
        version = config.get("transformers_version", "an unknown version")
        raise LoadError(
            f"config.json (saved by transformers {version}) has no {', '.join(map(repr, missing))}, "
            f"which mlx-lm's {args_class.__module__}.ModelArgs requires. Add the key(s) to "
            "config.json with the value the model was trained with."
        )


def _mlx_lm_args(config: dict[str, Any]) -> type | None:
    """mlx-lm's ModelArgs dataclass for this config, if it reads the config's top-level keys."""
    from mlx_lm.models.base import BaseModelArgs
    from mlx_lm.utils import _get_classes

    try:
        _, args_class = _get_classes(config)
    except Exception:  # an unknown model_type: mlx-lm will say so
        return None
    own_reader = getattr(args_class.from_dict, "__func__", None) is not BaseModelArgs.from_dict.__func__
    if not dataclasses.is_dataclass(args_class) or own_reader:  # e.g. a nested text_config
        return None
    return args_class
