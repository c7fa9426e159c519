"""Attribution graphs: every direct linear effect between the nodes of a prompt's local
replacement model (:mod:`.replacement`), computed as circuit-tracer computes them
(its ``attribution/attribute.py``; Ameisen et al. 2025,
https://transformer-circuits.pub/2025/attribution-graphs/methods.html).

Nodes, in adjacency order: the selected active features ``(layer, position, feature)``, one
error node per (layer, position) layer-major, one token node per position, the logit targets.
Rows are targets, columns sources: ``A[t, s]`` is the effect of ``s`` on ``t``'s
pre-activation (``x . W_enc[f]``, no bias) or on its demeaned logit (``logit - mean(logits)``).

A row is one vector-Jacobian product of the frozen model: the target's read vector is the
cotangent at its site and position, and the gradient at each MLP output and at the embedding,
dotted with what each source writes there (a feature: its activation times its decoder rows;
an error node: its error vector; a token: its embedding), gives the row. ``batch_size`` targets
share one pass, one per copy of the prompt. Logit rows come first; then feature rows, all of
them, or with ``max_feature_nodes`` below the number of active features, the most influential
ones, re-ranked every ``update_interval`` batches by the influence of what is known so far.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlxterp.plugin import ShardingError, options, progress_bar

from .graph import AttributionGraph, partial_influences
from .replacement import GraphError, Replacement, prompt_ids

MiB = 1 << 20


def attribution_graph(
    model,
    prompt,
    transcoders,
    *,
    max_feature_nodes: int | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 64,
    update_interval: int = 4,
    memory_budget: str | int | None = "8GiB",
    progress: bool = True,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (text or token ids) in the replacement model made of
    ``transcoders`` (per-layer transcoders or a cross-layer transcoder covering every layer).

    ``max_feature_nodes``: the most feature nodes (rows) to compute, the most influential first;
    None for every active feature. ``max_n_logits`` / ``desired_logit_prob``: the logit targets
    are the most probable next tokens, as few as reach ``desired_logit_prob`` in total, at most
    ``max_n_logits``. ``batch_size``: targets per backward pass. ``update_interval``: batches
    between re-rankings of the features by influence. ``memory_budget`` (bytes, or "8GiB"):
    the most the graph's edge rows and a pass's working set may take; beyond it, a clear error
    says what to lower. Text gets a BOS token first if it has none (position 0 is not
    explained, as in circuit-tracer).
    """
    arch = model.architecture_or_raise("attribution graphs")
    tc = _check_transcoders(transcoders, model)
    ids = prompt_ids(model, prompt)
    max_n_logits = options.integer(max_n_logits, "max_n_logits", low=1)
    desired_logit_prob = _fraction(desired_logit_prob, "desired_logit_prob")
    batch_size = options.integer(batch_size, "batch_size", low=1)
    update_interval = options.integer(update_interval, "update_interval", low=1)
    if max_feature_nodes is not None:
        max_feature_nodes = options.integer(max_feature_nodes, "max_feature_nodes", low=1)
    budget = _bytes(memory_budget)

    rep = Replacement(model, tc, ids)
    L, T, d = rep.n_layers, rep.n_pos, rep.d_model
    n_active = len(rep.active)
    n_sel = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)

    token_ids, probabilities, logit_vectors = _logit_targets(rep, max_n_logits, desired_logit_prob)
    n_logits = len(token_ids)
    logit_offset = n_active + (L + 1) * T
    fixed = (n_sel + n_logits) * (logit_offset + n_logits) * 4 + working_bytes(batch_size, L, T, d)
    sources = _Sources(rep, None if budget is None else budget - fixed)
    _check_budget(budget, fixed + sources.nbytes, n_sel + n_logits, logit_offset + n_logits, batch_size, T)
    edges = np.zeros((n_sel + n_logits, logit_offset + n_logits), dtype=np.float32)
    row_node = np.zeros(n_sel + n_logits, dtype=np.int64)
    with progress_bar(n_sel + n_logits, "attribution graph", enabled=progress, unit="row") as bar:
        # logit rows
        for start in range(0, n_logits, batch_size):
            stop = min(start + batch_size, n_logits)
            targets = [(L, T - 1, logit_vectors[k]) for k in range(start, stop)]
            edges[start:stop, :logit_offset] = sources.rows(targets)
            row_node[start:stop] = logit_offset + np.arange(start, stop)
            bar.update(stop - start)
        # feature rows
        encoder_rows = _encoder_rows(rep)
        row = n_logits
        visited = np.zeros(n_active, dtype=bool)
        while row - n_logits < n_sel:
            if n_sel == n_active:
                pending = np.arange(n_active)
            else:
                influence = partial_influences(edges[:row], probabilities, row_node[:row])
                rank = np.argsort(-influence[:n_active], kind="stable")
                queue = min(update_interval * batch_size, n_sel - (row - n_logits))
                pending = rank[~visited[rank]][:queue]
                # visit the queue layer by layer: a pass stops at its deepest target, so a batch
                # of shallow targets is cheap (the rows, and which features are visited, are the same)
                pending = pending[np.argsort(rep.active[pending, 0], kind="stable")]
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                targets = [(int(rep.active[k, 0]), int(rep.active[k, 1]), encoder_rows[k]) for k in batch]
                edges[row:row + len(batch), :logit_offset] = sources.rows(targets)
                row_node[row:row + len(batch)] = batch
                visited[batch] = True
                row += len(batch)
                bar.update(len(batch))

    selected = np.flatnonzero(visited).astype(np.int32)
    order = np.argsort(row_node, kind="stable")
    edges = edges[order]
    if n_sel < n_active:
        edges = np.ascontiguousarray(edges[:, np.concatenate([selected, np.arange(n_active, logit_offset + n_logits)])])
    return AttributionGraph(
        tokens=ids,
        prompt=model.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids)),
        token_strings=[_token_text(model, i) for i in ids],
        n_layers=L,
        active_features=rep.active,
        activation_values=rep.values,
        selected_features=selected,
        logit_tokens=np.asarray(token_ids, dtype=np.int32),
        logit_probabilities=np.asarray(probabilities, dtype=np.float32),
        logit_strings=[_token_text(model, i) for i in token_ids],
        rows=edges,
        settings={"max_feature_nodes": max_feature_nodes, "max_n_logits": max_n_logits,
                  "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                  "update_interval": update_interval},
        info={"model": arch.model_name or "", "family": arch.family, "scan": str(tc.metadata.get("scan") or ""),
              "transcoders": repr(tc), "d_features": tc.d_features, "vocab_size": int(rep.logits.shape[-1])},
    )


class _Sources:
    """What every source writes where, and the rows of a batch of targets from one VJP.

    A feature's writes are its activation times its decoder rows (a CLT: one per layer it
    writes), laid out per source layer as (T, K, S, d): K features per position (padded),
    S written layers. They are made once when they fit ``room`` bytes, else gathered from the
    decoder again in every batch, one source layer at a time (slower, less memory).
    """

    def __init__(self, rep: Replacement, room: int | None = None):
        self.rep = rep
        tc = rep.tc
        T = rep.n_pos
        active = rep.active
        n_active = len(active)
        self.layout = {}  # source layer -> (gather (T*K,) feature ids, values (T, K), K)
        flat_index = np.full(n_active, -1, dtype=np.int64)
        offset = 0
        self.nbytes = 0
        for q, layer in enumerate(tc.layers):
            mine = np.flatnonzero(active[:, 0] == layer)
            if len(mine) == 0:
                continue
            positions = active[mine, 1]
            counts = np.bincount(positions, minlength=T)
            width = int(counts.max())
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            slot = np.arange(len(mine)) - starts[positions]
            gather = np.zeros((T, width), dtype=np.int64)
            values = np.zeros((T, width), dtype=np.float32)
            gather[positions, slot] = active[mine, 2]
            values[positions, slot] = rep.values[mine]
            self.layout[layer] = (q, mx.array(gather.reshape(-1)), mx.array(values), width, offset)
            flat_index[mine] = offset + positions * width + slot
            offset += T * width
            self.nbytes += T * width * int(tc.W_dec[q].shape[1]) * rep.d_model * 4
        self.flat_index = mx.array(flat_index)
        self.n_flat = offset
        self.kept = room is None or self.nbytes <= room
        self.decoders = {layer: self._decoder(layer) for layer in self.layout} if self.kept else {}
        if self.kept:
            mx.eval(self.decoders)
        else:  # only the largest source layer's at a time
            self.nbytes = max(self._bytes(layer) for layer in self.layout) if self.layout else 0

    def _bytes(self, layer: int) -> int:
        q, _, _, width, _ = self.layout[layer]
        return self.rep.n_pos * width * int(self.rep.tc.W_dec[q].shape[1]) * self.rep.d_model * 4

    def _decoder(self, layer: int) -> mx.array:
        """(T, K, S, d): the writes of layer ``layer``'s active features, by position."""
        q, gather, values, width, _ = self.layout[layer]
        W = self.rep.tc.W_dec[q]  # (F, S, d)
        rows = W[gather].reshape(self.rep.n_pos, width, W.shape[1], W.shape[2]).astype(mx.float32)
        return rows * values[:, :, None, None]

    def rows(self, targets: list[tuple[int, int, mx.array]]) -> np.ndarray:
        """Rows (n, n_active + L*T + T) for targets (layer, position, read vector); layer
        ``n_layers`` reads the final norm's output (a logit)."""
        rep = self.rep
        L, T, d = rep.n_layers, rep.n_pos, rep.d_model
        n = len(targets)
        top = max(layer for layer, _, _ in targets)
        names = {layer: ("ln_final" if layer == L else rep.read_names[layer]) for layer, _, _ in targets}
        cotangents = {}
        for b, (layer, pos, vector) in enumerate(targets):
            cotangents.setdefault(layer, []).append((b, pos, vector))
        seeds = {}
        zero = mx.zeros((d,), dtype=mx.float32)
        for layer, items in cotangents.items():
            mask = np.zeros((n, T), dtype=np.float32)
            mask[[b for b, _, _ in items], [p for _, p, _ in items]] = 1.0
            by_row = {b: v for b, _, v in items}
            vectors = mx.stack([by_row.get(b, zero).astype(mx.float32) for b in range(n)])
            seeds[names[layer]] = mx.array(mask)[:, :, None] * vectors[:, None, :]
        stop = "ln_final" if top == L else rep.read_names[top]
        writes = {m: mx.zeros((n, T, d), dtype=mx.float32) for m in range(min(top, L))}
        embed = mx.zeros((n, T, d), dtype=mx.float32)

        def objective(writes, embed):
            values = rep.frozen_pass(n, writes, embed, targets=list(seeds), stop_after=stop)
            return sum(mx.sum(values[name] * seed) for name, seed in seeds.items())

        g_writes, g_embed = mx.grad(objective, argnums=(0, 1))(writes, embed)
        if not self.kept:
            mx.eval(g_writes, g_embed)
        flat = []
        for layer, (_, _, _, width, _) in self.layout.items():
            slots = min(rep.tc.W_dec[self.layout[layer][0]].shape[1], top - layer)
            if slots <= 0:
                flat.append(mx.zeros((n, T * width), dtype=mx.float32))
                continue
            D = self.decoders[layer] if self.kept else self._decoder(layer)
            G = mx.stack([g_writes[layer + s] for s in range(slots)], axis=2)  # (n, T, slots, d)
            G = G.transpose(1, 0, 2, 3).reshape(T, n, slots * d)
            D = D[:, :, :slots].reshape(T, width, slots * d)
            out = (G @ D.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(n, T * width)  # (n, T*K)
            if not self.kept:
                mx.eval(out)  # one source layer's decoder rows alive at a time
            flat.append(out)
        parts = [mx.take(mx.concatenate(flat, axis=1), self.flat_index, axis=1)] if flat else []
        errors = [mx.sum(g_writes[m] * rep.errors[m], axis=-1) if m < top else mx.zeros((n, T)) for m in range(L)]
        parts.append(mx.concatenate(errors, axis=1))
        parts.append(mx.sum(g_embed * rep.embed.astype(mx.float32), axis=-1))
        out = mx.concatenate(parts, axis=1)
        mx.eval(out)
        return np.array(out)


def _encoder_rows(rep: Replacement) -> mx.array:
    tc = rep.tc
    W = mx.concatenate([tc.W_enc[q] for q in range(len(tc.layers))]).astype(mx.float32)  # (L*F, d)
    flat = rep.active[:, 0].astype(np.int64) * tc.d_features + rep.active[:, 2]
    return W[mx.array(flat)] if len(flat) else mx.zeros((0, rep.d_model))


def _logit_targets(rep: Replacement, max_n_logits: int, desired: float):
    """(token ids, probabilities, demeaned unembedding vectors) of the salient logits: the
    most probable next tokens until ``desired`` probability, at most ``max_n_logits``."""
    logits = rep.logits[-1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p = (p / p.sum()).astype(np.float32)
    top = np.argsort(-p, kind="stable")[:max_n_logits]
    keep = int(np.searchsorted(np.cumsum(p[top]), desired)) + 1
    top = top[:keep]
    V = int(rep.logits.shape[-1])
    # the unembedding's columns minus their mean over the vocabulary: the gradient of
    # logit_t - mean(logits) with respect to the final norm's output (bias and scale as the
    # model has them, before any soft-cap)
    h = mx.broadcast_to(rep.final[-1:].astype(mx.float32), (len(top), rep.d_model))
    cot = _one_hot_minus_mean(top, V)
    unembed = lambda x: rep.arch.unembed(x.astype(rep.final.dtype), softcap=False).astype(mx.float32)  # noqa: E731
    _, (vectors,) = mx.vjp(unembed, [h], [cot])
    mx.eval(vectors)
    return [int(t) for t in top], p[top], vectors


def _one_hot_minus_mean(top: np.ndarray, V: int) -> mx.array:
    cot = np.full((len(top), V), -1.0 / V, dtype=np.float32)
    cot[np.arange(len(top)), top] += 1.0
    return mx.array(cot)


def _check_transcoders(tc, model):
    arch = model.architecture_or_raise("attribution graphs")
    if model.sharding is not None:  # frozen passes and their gradients are untested across ranks
        raise ShardingError(
            f"attribution graphs and feature interventions do not run on a model sharded across processes "
            f"({model.sharding.describe()}) yet: load the model unsharded (without shard=) on one machine to "
            "build the graph."
        )
    if not (hasattr(tc, "W_enc") and hasattr(tc, "splices") and hasattr(tc, "kind")):
        raise GraphError(
            f"transcoders: expected a transcoder set or a cross-layer transcoder (mlxterp.load_transcoders, "
            f"mlxterp.train_transcoders), got {type(tc).__name__}."
        )
    if tc.layers != list(range(arch.n_layers)):
        raise GraphError(
            f"these transcoders cover layers {tc.layers}; an attribution graph replaces every MLP, so they must cover "
            f"all {arch.n_layers} layers of this model (0..{arch.n_layers - 1})."
        )
    if tc.d_model != arch.d_model:
        raise GraphError(f"these transcoders read width {tc.d_model}; this model's d_model is {arch.d_model}.")
    return tc


def _fraction(value, option: str) -> float:
    value = options.number(value, option)
    if not 0 < value <= 1:
        raise options.OptionError(f"{option}={value!r}: give a fraction in (0, 1].")
    return value


def _bytes(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise options.OptionError(f"memory_budget={value!r}: give a positive number of bytes or a size like '8GiB'.")
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        for unit, scale in (("gib", 1 << 30), ("gb", 10**9), ("mib", 1 << 20), ("mb", 10**6), ("kib", 1 << 10), ("kb", 10**3), ("b", 1)):
            if text.endswith(unit):
                try:
                    number = float(text[: -len(unit)])
                except ValueError:
                    break
                if number > 0:
                    return int(number * scale)
                break
    raise options.OptionError(f"memory_budget={value!r}: give a positive number of bytes or a size like '8GiB'.")


def working_bytes(batch_size: int, L: int, T: int, d: int) -> int:
    """A pass's working set: every layer's residual, gradient and written vectors for
    ``batch_size`` copies of the prompt, a few copies each (float32)."""
    return batch_size * T * d * 4 * (3 * L + 4)


def _check_budget(budget, need: int, rows: int, columns: int, batch_size: int, T: int) -> None:
    if budget is not None and need > budget:
        raise GraphError(
            f"this graph needs about {need / MiB:,.0f} MiB ({rows:,} edge rows x {columns:,} columns, batches of "
            f"{batch_size} x {T} tokens, the active features' decoder rows) and memory_budget is {budget / MiB:,.0f} MiB: "
            f"lower max_feature_nodes or batch_size, shorten the prompt, or raise memory_budget."
        )


def _token_text(model, token: int) -> str:
    from mlxterp.plugin import token_text

    return token_text(model, int(token))


__all__ = ["attribution_graph", "working_bytes"]
