"""``mlxterp info MODEL``: what a model is, and its standard names with their shapes."""

from __future__ import annotations

from mlxterp.plugin import InterpretableModel


def describe_model(model: InterpretableModel, prompt: str = "The capital of France is") -> str:
    """A plain-text report: source, family, sizes, quantization, backend, and every standard
    name of layer 0 (and the model-level names) with its shape on ``prompt``."""
    lines = []
    report = model.load_report or {}
    for key in ("file", "directory", "repo", "name", "format", "quantization", "weights", "kernels", "backend"):
        if key in report:
            lines.append(f"{key:13s} {report[key]}")
    arch = model.architecture
    if arch is None:
        lines.append("family        unknown: raw names only (model.module_names())")
        return "\n".join(lines)
    lines.append(f"family        {arch.family} (schema from plugin {arch.plugin!r})")
    head_dim = arch.head_dim if arch.head_dim is not None else "?"
    lines.append(f"layers        {arch.n_layers}")
    lines.append(f"heads         {arch.n_heads} query, {arch.n_kv_heads} key/value, head dim {head_dim}")
    ids = model.encode(prompt) if model.tokenizer is not None else [0, 1, 2]
    subs = arch.block_names(0)
    names = ["embed", *(f"layers.0.{s}" for s in subs), "ln_final", "logits"]
    trace = model.run([ids], capture=names)
    width = max(len(n) for n in names)
    shown = repr(prompt) if model.tokenizer is not None else str(ids)
    lines.append(f"vocabulary    {trace.activations['logits'].shape[-1]}")
    lines.append(f"\nstandard names on {shown} ({len(ids)} tokens); layers 1..{arch.n_layers - 1} alike:")
    for name in names:
        value = trace.activations[name]
        lines.append(f"  {name:{width}s}  {tuple(value.shape)}  {str(value.dtype).rsplit('.', 1)[-1]}")
    return "\n".join(lines)
