"""The nnsight way of doing what an mlxterp workload does, on HF transformers' twin of the same
model, on the same card: caching the residual stream (a trace saving every layer's output, then
``safetensors``), the "resid" patching sweep batched (one trace per layer whose batch patches
one position per row, and one trace for every layer at once), and the logit lens (every layer
through the final norm and the unembedding inside one trace).

Each maker returns cases (functions of no arguments that do the work and wait for the device)
for :func:`~mlxterp_tools.harness.median_times`, or None when torch, transformers or nnsight is
missing. torch runs on CUDA when it has it, else on its CPU (``--smoke`` runs). nnsight 0.8 runs
a trace's body itself: results leave it through lists made outside.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .harness import torch_llama


def torch_device() -> str | None:
    """"cuda" where torch has CUDA, else "cpu"; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def twin(module, dtype):
    """(HF transformers' Llama with ``module``'s weights in ``dtype`` on the torch device, its
    NNsight wrapper), or None where torch, transformers or nnsight is missing or the model is
    not an unquantized Llama."""
    device = torch_device()
    try:
        import torch
        from nnsight import NNsight
    except ImportError:
        return None
    peer = torch_llama(module)
    if peer is None:
        return None
    torch_dtype = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}[dtype]
    peer = peer.to(device, torch_dtype).eval()
    return peer, NNsight(peer)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tensor(ids):
    import torch

    return torch.from_numpy(np.array(ids, dtype=np.int64)).to(torch_device())


def caching_cases(pair):
    """``(windows, folder) -> cases`` for :func:`~mlxterp_tools.cache_rows.cache_speed`: the
    plain torch forward of the windows, and the nnsight way of caching every layer's output
    (a trace saving them, then one safetensors file per batch of windows)."""
    import torch
    from safetensors.torch import save_file

    peer, traced = pair
    n_layers = peer.config.num_hidden_layers

    def make(windows, folder):
        tokens = [_tensor(ids) for ids in windows]
        out = Path(folder) / "nnsight"
        out.mkdir(parents=True, exist_ok=True)

        def plain():
            with torch.inference_mode():
                for ids in tokens:
                    peer(ids)
            _sync()

        def nnsight_cache():
            for i, ids in enumerate(tokens):
                saved = []
                with torch.inference_mode(), traced.trace(ids):
                    for layer in range(n_layers):
                        saved.append(traced.model.layers[layer].output.save())
                rows = {f"layers.{layer}": _value(s).reshape(-1, _value(s).shape[-1]).contiguous()
                        for layer, s in enumerate(saved)}
                save_file(rows, str(out / f"batch_{i:05d}.safetensors"))  # moves them to the host first
            _sync()

        return {"torch plain forward": plain, "nnsight trace + safetensors": nnsight_cache}

    return make


def _value(saved):
    """A saved layer output: the tensor (older transformers return a tuple from a layer)."""
    return saved[0] if isinstance(saved, tuple) else saved


def patching_cases(pair, clean_ids, corrupted_ids, answers: tuple[int, int]):
    """(cases, recovery) for the "resid" sweep of every layer x position of ``corrupted_ids``
    patched from ``clean_ids``, batched the nnsight way: ``per layer`` runs one trace per
    layer whose batch holds one row per position (row p patches position p); ``one trace``
    patches every layer in one trace of layers x positions rows. ``recovery()`` gives the
    cells (layers x positions, % of the way from the corrupted to the clean metric, the logit
    difference of ``answers`` at the last position) of the per-layer case."""
    import torch

    peer, traced = pair
    n_layers = peer.config.num_hidden_layers
    clean, corrupted = _tensor([clean_ids]), _tensor([corrupted_ids])
    length = corrupted.shape[1]
    good, bad = answers
    rows = torch.arange(length, device=clean.device)

    def metric(logits):
        return (logits[..., good] - logits[..., bad]).float()

    def runs():
        sources, ends = [], []
        with torch.inference_mode(), traced.trace(clean):
            for layer in range(n_layers):
                sources.append(traced.model.layers[layer].output.save())
            ends.append(traced.lm_head.output[:, -1].save())
        with torch.inference_mode():
            ends.append(peer(corrupted).logits[:, -1])
        return [_value(s)[0] for s in sources], metric(ends[0])[0], metric(ends[1])[0]

    def per_layer():
        sources, high, low = runs()
        scores = []
        batch = corrupted.repeat(length, 1)
        for layer in range(n_layers):
            got = []
            with torch.inference_mode(), traced.trace(batch):
                _value(traced.model.layers[layer].output)[rows, rows] = sources[layer]
                got.append(traced.lm_head.output[:, -1].save())
            scores.append(metric(got[0]))
        scores = torch.stack(scores)
        _sync()
        return (scores - low) / (high - low) * 100

    def one_trace():
        sources, high, low = runs()
        batch = corrupted.repeat(n_layers * length, 1)
        got = []
        with torch.inference_mode(), traced.trace(batch):
            for layer in range(n_layers):
                _value(traced.model.layers[layer].output)[layer * length + rows, rows] = sources[layer]
            got.append(traced.lm_head.output[:, -1].save())
        scores = metric(got[0]).reshape(n_layers, length)
        _sync()
        return (scores - low) / (high - low) * 100

    return {"nnsight batched, a trace per layer": per_layer, "nnsight batched, one trace": one_trace}, per_layer


def lens_case(pair, ids, top_k: int = 5):
    """The logit lens of ``ids`` with nnsight: every layer's output through the final norm and
    the unembedding inside one trace, softmax and top-k."""
    import torch

    peer, traced = pair
    n_layers = peer.config.num_hidden_layers
    tokens = _tensor([ids])

    def lens():
        saved = []
        with torch.inference_mode(), traced.trace(tokens):
            for layer in range(n_layers):
                saved.append(traced.lm_head(traced.model.norm(_value(traced.model.layers[layer].output))).save())
        with torch.inference_mode():
            probs = torch.softmax(torch.cat([_value(s) for s in saved]).float(), dim=-1)
            found = torch.topk(probs, top_k, dim=-1)
        _sync()
        return found

    return lens
