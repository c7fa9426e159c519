"""The invariants that say a family's standard names are right, checked on a real forward pass.

An interpretability library that returns a wrong tensor under the right name does damage
quietly, so every claimed family is checked against these (the test suite runs them on tiny
random-weight models of every family and writes the status table; ``InterpretableModel``
runs the cheap ones on 3 tokens when it wraps a model):

- ``idle``: probing changes nothing (bitwise);
- ``shapes``: every standard name resolves, is reached, and has the shape it promises;
- ``embed``: ``embed == layers[0].input``; ``chain``: ``layers[i].output == layers[i+1].input``;
- ``residual``: ``resid_mid == input + attn`` and ``output == resid_mid + mlp`` (or
  ``output == input + attn + mlp`` for parallel blocks and where no ``resid_mid`` is mapped);
- ``qk``: the per-head queries and keys (after q/k norms) are what the model rotates; without a
  rotation module, softmax(q k^T) reproduces the pattern;
- ``unembed``: the final norm's output, unembedded, reproduces ``logits``;
- ``pattern``: pattern rows sum to 1, ``pattern @ v`` reproduces ``z`` per head, and the explicit
  attention computes what the fused kernel computes;
- ``edit``: an intervention on a standard name changes exactly that tensor, and the same as on
  its raw name where it has one;
- ``padding``: a right-padded batch equals separate runs at real positions;
- ``snapshot``: every site a capture-everything trace records is the value an independent probe
  copied when that module was called and returned (model code that edits an array in place,
  ``h += pos`` or ``h *= scale``, must not change a record), and every embedding module's output
  is its lookup of the ids it was given.

Each check returns a :class:`Check`; ``field`` names the schema field to look at on failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .architecture import read_attribute
from .attention import explicit_attention
from .errors import MlxterpError
from .interventions import restrict

if TYPE_CHECKING:
    from .model import InterpretableModel

_TOLERANCE = {mx.float32: 1e-5, mx.float16: 3e-3, mx.bfloat16: 2e-2}
_TF32_TOLERANCE = 3e-3  # float32 matmuls at TF32 precision (MLX's CUDA default)


def tolerance(dtype: mx.Dtype) -> float:
    """Relative error allowed between two computations of one tensor of this dtype."""
    from .backend import reduced_float32_matmul

    if dtype == mx.float32 and reduced_float32_matmul():
        return _TF32_TOLERANCE
    return _TOLERANCE.get(dtype, 1e-5)


@attrs.frozen
class Check:
    name: str
    passed: bool | None  # None: not applicable to this family
    detail: str = ""
    field: str = ""  # the schema field to look at when it fails


def relative_error(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).flatten()) / (mx.linalg.norm(b.flatten()) + 1e-30)).item()


def close(a: mx.array, b: mx.array, tol: float | None = None) -> tuple[bool, float]:
    tol = tol if tol is not None else tolerance(b.dtype)
    if a.shape != b.shape:
        return False, float("inf")
    err = relative_error(a, b)
    return err <= tol, err


def expected_shapes(model: InterpretableModel, batch: int, length: int, d_model: int, vocab: int) -> dict[str, tuple]:
    arch = model.architecture
    h, kv, hd = arch.n_heads, arch.n_kv_heads, arch.head_dim
    resid = (batch, length, d_model)
    shapes = {name: resid for name in ("input", "output", "resid_mid", "attn", "mlp", "ln1", "ln2")}
    if hd is not None:
        shapes.update({
            "attn.q": (batch, length, h * hd),
            "attn.k": (batch, length, kv * hd),
            "attn.v": (batch, length, kv * hd),
            "attn.z": (batch, length, h * hd),
            "attn.q_heads": (batch, h, length, hd),
            "attn.k_heads": (batch, kv, length, hd),
            "attn.v_heads": (batch, kv, length, hd),
            "attn.z_heads": (batch, h, length, hd),
            "attn.q_rot": (batch, h, length, hd),
            "attn.k_rot": (batch, kv, length, hd),
            "attn.q_norm": (batch, h, length, hd),
            "attn.k_norm": (batch, kv, length, hd),
        })
    shapes["attn.pattern"] = (batch, h, length, length)
    return {"embed": resid, "ln_final": resid, "logits": (batch, length, vocab), **shapes}


def check_all(model: InterpretableModel, ids: list[int], layers: Iterable[int] | None = None, thorough: bool = True) -> list[Check]:
    """Run the invariants on one prompt of token ids. ``layers``: which layers to check (all by
    default); ``thorough``: also the idle, edit and padding checks, which cost extra passes."""
    arch = model.architecture
    layers = list(range(arch.n_layers)) if layers is None else sorted(set(layers))
    names = ["embed", "ln_final", "logits"] + [f"layers.{i}.{s}" for i in layers for s in arch.block_names(i)]
    inputs = mx.array([ids])
    try:
        tr = model.run(inputs, capture=names)
    except MlxterpError as e:
        return [Check("shapes", False, str(e), "block")]
    acts = tr.activations
    checks = [_shapes(model, acts, names, len(ids))]
    if thorough:
        checks.insert(0, _idle(model, inputs))
    checks.append(_equal("embed", acts["embed"], acts[f"layers.{layers[0]}.input"] if layers[0] == 0 else None, "embed"))
    chain = [(acts[f"layers.{i}.output"], acts[f"layers.{i + 1}.input"]) for i in layers if i + 1 in layers]
    checks.append(_all_equal("chain", chain, "layers"))
    checks.append(_residual(model, acts, layers))
    normed = acts["ln_final"]
    checks.append(_equal("unembed", arch.unembed(normed), acts["logits"], "unembed / final_norm"))
    checks.append(_pattern(model, inputs, acts, layers))
    checks.append(_queries_keys(model, inputs, layers))
    if thorough:
        checks.append(_edits(model, inputs, layers))
        checks.append(_padding(model, ids))
        checks.append(check_snapshots(model, ids))
    return checks


def _idle(model: InterpretableModel, inputs: mx.array) -> Check:
    plain = model.model(inputs)
    traced = model.run(inputs).output
    same = plain.shape == traced.shape and mx.array_equal(plain, traced).item()
    return Check("idle", bool(same), "" if same else "traced output differs from the plain forward")


def _shapes(model, acts, names: list[str], length: int) -> Check:
    d_model = acts["embed"].shape[-1]
    vocab = acts["logits"].shape[-1]
    expected = expected_shapes(model, 1, length, d_model, vocab)
    wrong = []
    for name in names:
        sub = name.split(".", 2)[2] if name.startswith("layers.") else name
        shape = tuple(acts[name].shape)
        want = expected.get(sub)
        if want is not None and shape != want:
            wrong.append(f"{name}: {shape}, expected {want}")
    field = "block." + wrong[0].split(":")[0].split(".", 2)[2] if wrong and wrong[0].startswith("layers.") else ""
    return Check("shapes", not wrong, "; ".join(wrong[:3]), field)


def _equal(name: str, got: mx.array | None, want: mx.array | None, field: str) -> Check:
    if got is None or want is None:
        return Check(name, None)
    ok, err = close(got, want)
    return Check(name, ok, f"relative error {err:.2e}", field)


def _all_equal(name: str, pairs: list[tuple[mx.array, mx.array]], field: str) -> Check:
    if not pairs:
        return Check(name, None)
    errors = [close(a, b) for a, b in pairs]
    worst = max(err for _, err in errors)
    return Check(name, all(ok for ok, _ in errors), f"worst relative error {worst:.2e}", field)


def _residual(model, acts, layers) -> Check:
    arch = model.architecture
    pairs = []
    if arch.schema.parallel:
        for i in layers:
            pairs.append((acts[f"layers.{i}.input"] + acts[f"layers.{i}.attn"] + acts[f"layers.{i}.mlp"], acts[f"layers.{i}.output"]))
        field = "block.attn / block.mlp"
    elif arch.has("resid_mid") and arch.has("attn") and arch.has("mlp"):
        for i in layers:
            mid = acts[f"layers.{i}.resid_mid"]
            pairs.append((acts[f"layers.{i}.input"] + acts[f"layers.{i}.attn"], mid))
            pairs.append((mid + acts[f"layers.{i}.mlp"], acts[f"layers.{i}.output"]))
        field = "block.resid_mid / block.attn / block.mlp"
    elif arch.has("attn") and arch.has("mlp"):  # no resid_mid mapped: the block's two writes still add up
        for i in layers:
            pairs.append((acts[f"layers.{i}.input"] + acts[f"layers.{i}.attn"] + acts[f"layers.{i}.mlp"], acts[f"layers.{i}.output"]))
        field = "block.attn / block.mlp"
    else:
        return Check("residual", None)
    return _all_equal("residual", pairs, field)


def _pattern(model, inputs, acts, layers) -> Check:
    arch = model.architecture
    if not arch.has("attn.pattern") or not arch.has("attn.v") or not arch.has("attn.z"):
        return Check("pattern", None)
    names = [f"layers.{i}.attn.pattern" for i in layers]
    names += [f"layers.{i}.attn.{s}" for i in layers for s in ("v_heads", "z_heads")]
    try:
        tr = model.run(inputs, capture=names + ["logits"])
    except MlxterpError as e:
        return Check("pattern", False, str(e), "attention")
    problems = []
    for i in layers:
        pattern = tr.activations[f"layers.{i}.attn.pattern"]
        rows = pattern.sum(axis=-1)
        if not mx.allclose(rows, mx.ones_like(rows), atol=1e-5).item():
            problems.append(f"layer {i}: rows do not sum to 1")
        v = tr.activations[f"layers.{i}.attn.v_heads"].astype(mx.float32)
        z = tr.activations[f"layers.{i}.attn.z_heads"]
        v = mx.repeat(v, pattern.shape[1] // v.shape[1], axis=1)
        ok, err = close((pattern @ v).astype(z.dtype), z, tolerance(z.dtype))
        if not ok:
            problems.append(f"layer {i}: pattern @ v != z (relative error {err:.2e})")
    fused = acts["logits"]
    ok, err = close(tr.activations["logits"], fused, max(tolerance(fused.dtype), 1e-4))
    if not ok:
        problems.append(f"explicit attention changes the logits (relative error {err:.2e})")
    return Check("pattern", not problems, "; ".join(problems[:3]), "attention / block.attn.v / block.attn.z")


def _distortion():
    """x * w with w in [0.5, 1.5) per feature of the last axis, the same w every call."""

    def distort(x: mx.array) -> mx.array:
        w = 0.5 + mx.random.uniform(shape=(x.shape[-1],), key=mx.random.key(7))
        return x * w.astype(x.dtype)

    return restrict(distort)


def _queries_keys(model, inputs, layers) -> Check:
    """q and k (their per-head views, after any q/k norm) are what the model rotates, or, for
    a family without a rotation module, they reproduce the attention pattern."""
    arch = model.architecture
    problems = []
    for i in layers:
        for which in ("q", "k"):
            if not arch.has(f"attn.{which}", i):
                continue
            norm = f"attn.{which}_norm"
            mine = f"layers.{i}.{norm if arch.has(norm, i) else f'attn.{which}_heads'}"
            if arch.has(f"attn.{which}_rot", i):
                (rot,) = arch.resolve(f"layers.{i}.attn.{which}_rot")
                truth = rot.site + ":input"
                tr = model.run(inputs, capture=[mine, truth])
                ok, err = close(tr.activations[mine], tr.activations[truth])
                if not ok:
                    problems.append(f"{mine} is not the input of the rotation ({err:.2e})")
        if not arch.has("attn.q_rot", i) and arch.has("attn.q", i) and arch.has("attn.pattern", i):
            attention = read_attribute(arch.layers[i], arch.schema.attention.module)
            scale = getattr(attention, "scale", None)
            if scale is None:
                continue
            names = [f"layers.{i}.attn.q_heads", f"layers.{i}.attn.k_heads", f"layers.{i}.attn.pattern"]
            acts = model.run(inputs, capture=names).activations
            q, k, pattern = (acts[n] for n in names)
            length = q.shape[2]
            mask = mx.arange(length)[:, None] >= mx.arange(length)[None]
            probs = explicit_attention(q, k, None, scale, mask)
            ok, err = close(probs, pattern, 1e-4)
            if not ok:
                problems.append(f"layer {i}: softmax(q k^T) is not the pattern ({err:.2e})")
    if not any(arch.has("attn.q", i) for i in layers):
        return Check("qk", None)
    return Check("qk", not problems, "; ".join(problems[:3]), "block.attn.q / block.attn.k")


_EDITED = ("attn.q", "attn.k", "attn.v", "attn.z", "attn.q_heads", "attn.q_rot", "attn.k_rot", "attn.pattern",
           "ln1", "ln2", "attn", "resid_mid", "mlp.gate", "mlp.up", "mlp.act", "mlp", "input", "output")


def _edits(model, inputs, layers) -> Check:
    """A fixed per-feature rescaling at one position of a standard name: that tensor changes
    there as the edit says, the output moves, and where the name is a plain raw site the raw
    edit gives the same. (Not a uniform scale: a norm downstream, as q/k norms, would undo it.)"""
    arch = model.architecture
    layer = layers[len(layers) // 2]
    position = inputs.shape[1] - 1
    problems = []
    for sub in _EDITED:
        if not arch.has(sub, layer):
            continue
        name = f"layers.{layer}.{sub}"
        (resolved,) = arch.resolve(name)
        edit = _distortion().at(positions=position)  # (B, H, T, S) patterns: query position
        try:
            before = model.run(inputs, capture=[name, "logits"])
            after = model.run(inputs, capture=[name, "logits"], interventions={name: edit})
        except MlxterpError as e:
            problems.append(f"{name}: {e}")
            continue
        b, a = before.activations[name], after.activations[name]
        ok, err = close(a, edit(b), tolerance(b.dtype))
        if not ok:
            problems.append(f"{name}: edited tensor is not the edit of the clean one ({err:.2e})")
        if mx.array_equal(before.activations["logits"], after.activations["logits"]).item():
            problems.append(f"{name}: the edit did not change the logits")
        if resolved.view is None and resolved.write_site is None and sub != "attn.pattern":
            raw = model.run(inputs, capture=["logits"], interventions={resolved.site: edit})
            if not mx.array_equal(raw.activations["logits"], after.activations["logits"]).item():
                problems.append(f"{name}: standard and raw edits differ")
    return Check("edit", not problems, "; ".join(problems[:3]), "block")


def _padding(model, ids: list[int]) -> Check:
    short = ids[: max(1, len(ids) // 2)]
    arch = model.architecture
    names = [f"layers.{i}.output" for i in range(arch.n_layers)]
    batch = model.run([ids, short], capture=names)
    pairs = []
    for row, prompt in enumerate((ids, short)):
        alone = model.run([prompt], capture=names)
        for name in names:
            pairs.append((batch.activations[name][row, : len(prompt)], alone.activations[name][0]))
    errors = [relative_error(a, b) for a, b in pairs]
    tol = max(tolerance(pairs[0][1].dtype), 1e-4)
    return Check("padding", max(errors) <= tol, f"worst relative error {max(errors):.2e}")


def check_snapshots(model: InterpretableModel, ids: list[int]) -> Check:
    """A capture-everything trace records, at every site, the value an independent probe copied
    to NumPy when that module was called (``:input``) and when it returned; and the output of
    every embedding module is its lookup of the ids it was given, computed afresh."""
    from .trace import Hooks

    inputs = mx.array([ids])
    truth = copies_at_return(model.model, inputs)
    # as each process holds them: a sharded model's records where they were computed
    with Hooks(model, gather=False) as hooks:
        _, recorded = hooks(inputs)
    recorded = dict(recorded)
    problems = []
    if set(truth) != set(recorded):
        extra, missing = sorted(set(recorded) - set(truth)), sorted(set(truth) - set(recorded))
        problems.append(f"sites differ: recorded but never seen {extra[:3]}, seen but not recorded {missing[:3]}")
    for site in recorded:  # in call order, so the first problem named is the earliest
        if site in truth and not _same_value(recorded[site], truth[site]):
            when = "was called with" if site.endswith(":input") else "returned"
            problems.append(f"{site} is not what the module {when} ({_difference(recorded[site], truth[site])})")
    from .sites import INPUT_PORT, locate_module

    lookups = 0
    for site, value in recorded.items():
        module = locate_module(model.model, site) if "#" not in site and ":" not in site else None
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)) and site + INPUT_PORT in recorded:
            lookups += 1
            lookup = module(recorded[site + INPUT_PORT])
            if not mx.array_equal(value, lookup).item():
                problems.append(f"{site} is not the embedding lookup ({_difference(value, np.array(lookup.astype(mx.float32)))})")
    detail = f"{len(problems)} problems: " + "; ".join(problems[:3]) if problems else f"{len(recorded)} sites, {lookups} embedding lookups"
    return Check("snapshot", not problems, detail, "")


def copies_at_return(root: nn.Module, inputs: mx.array) -> dict[str, np.ndarray]:
    """Run ``root(inputs)`` once with a probe of its own (not the trace's) on every module, which
    copies each module's first positional array argument before the call and its output (the
    first element of a tuple) after it to NumPy (float32): site name -> copy, named as a trace
    names sites (``model.<path>``, ``#k`` for the k-th call, ``:input``, ``__model_output__``)."""
    from .module_probes import walk_modules
    from .sites import INPUT_PORT, MODEL_OUTPUT

    copies: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    classes: dict[type, type] = {}

    def copy(x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)

    def copying_class(cls: type) -> type:
        def __call__(self, *args, **kwargs):
            path = self.__dict__["_copies_at_return_path"]
            k = calls[path] = calls.get(path, -1) + 1
            site = path if k == 0 else f"{path}#{k}"
            if args and isinstance(args[0], mx.array):
                copies[site + INPUT_PORT] = copy(args[0])
            out = cls.__call__(self, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) and out else out
            if isinstance(first, mx.array):
                copies[site] = copy(first)
            return out

        return classes.setdefault(cls, type(cls.__name__, (cls,), {"__call__": __call__}))

    swapped = walk_modules(root)[1:]
    try:
        for path, module in swapped:
            module.__dict__["_copies_at_return_path"] = path
            object.__setattr__(module, "__class__", copying_class(type(module)))
        output = root(inputs)
    finally:
        for _, module in swapped:
            object.__setattr__(module, "__class__", type(module).__mro__[1])
            module.__dict__.pop("_copies_at_return_path", None)
    if isinstance(output, mx.array):
        copies[MODEL_OUTPUT] = copy(output)
    return copies


def _same_value(recorded: mx.array, copied: np.ndarray) -> bool:
    mine = np.array(recorded.astype(mx.float32) if mx.issubdtype(recorded.dtype, mx.floating) else recorded)
    return mine.shape == copied.shape and np.array_equal(mine, copied, equal_nan=mine.dtype.kind == "f")


def _difference(recorded: mx.array, copied: np.ndarray) -> str:
    mine = np.array(recorded.astype(mx.float32))
    if mine.shape != copied.shape:
        return f"shape {mine.shape}, copied {copied.shape}"
    return f"max abs difference {np.abs(mine - copied).max():.3g}"
