"""Attribution graphs on one GPU, mlxterp against circuit-tracer: the same card, the same random
weights and transcoders, equal ``batch_size`` and ``max_feature_nodes`` (issue 24's speed row).

    python -m mlxterp_tools.graph_gpu build --out DIR [--layers 30] [--d-features 4096] [--seed 0]
                                          [--target-l0 32] [--prompt-tokens 128] [--sets clt,plt]
    python -m mlxterp_tools.graph_gpu mlx --dir DIR --out mlx.json [--set clt] [--tokens 10,64]
                                          [--batch-size 64] [--max-feature-nodes 2048] [--repeats 3]
    python plugins/mlxterp_tools/graph_gpu.py ct --dir DIR --out ct.json [the same options]
                                          [--backend nnsight|transformerlens]
    python plugins/mlxterp_tools/graph_gpu.py compare A.npz B.npz [--json out.json]   (or A.json B.json)
    python plugins/mlxterp_tools/graph_gpu.py report FOLDER [--json all.json]

``build`` writes, with NumPy's random generator alone (so the files depend only on the seed and
the shape), a random HF ``LlamaForCausalLM`` folder of SmolLM2-135M's shape (30 layers, d=576,
MLP 1536, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings) in float32 safetensors, a
word-level tokenizer that transformers and mlx-lm read offline (``<pad> <s> </s> <unk>``, then
synthetic words), a fixed prompt (BOS first; every benchmarked prompt is a prefix of it), and a
cross-layer transcoder (``clt/``) and a per-layer transcoder set (``plt/``) in circuit-tracer's
layouts, reading ``mlp.hook_in`` (``layers[i].ln2``) and writing ``mlp.hook_out``. Both sets share
one JumpReLU encoder per layer whose thresholds are calibrated on the prompt (a NumPy float64
forward of the model) so that ``--target-l0`` features are active per (layer, position) on
average, with no pre-activation of the prompt near its threshold (both implementations then
find the same active features). ``build.json`` records the shapes, the calibration and its
margins.

``mlx`` loads the folder with ``mlxterp.load`` and the transcoders with
``mlxterp.load_transcoders``, and ``ct`` with circuit-tracer (``load_transcoder_from_hub`` on the
folder, encoders and decoders resident; the nnsight backend on the HF folder, or the
TransformerLens backend with the HF weights converted), on CUDA where torch has it. Both time
``attribution_graph`` / ``attribute`` on each prompt length: one warm-up, then the median of
``--repeats``, with the peak memory of the graph (MLX's or torch's allocator, model and
transcoders included) and the resident memory before it, and save each graph's square
adjacency and node lists as ``.npz`` beside the JSON. ``compare`` aligns two such files node by
node (features by (layer, position, feature), errors by (layer, position), tokens by position,
logits by token) and prints the largest edge difference and whether the active and selected
features agree; given two runs' JSON documents, it compares their graphs length by length.
``report`` tabulates the runs and comparisons of a folder.

``build``, ``ct``, ``compare`` and ``report`` need no MLX (run this file itself where mlx is not installed);
``mlx`` needs no torch. Set ``MLX_ENABLE_TF32=0`` for the MLX run on CUDA (float32 matmuls as
torch does them), or the graphs agree only to TF32 precision.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

SMOLLM2_135M = dict(  # HF config of SmolLM2-135M (the shape; the weights are random)
    hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=True,
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BOS = 1
LOGIT_STD = 3.0  # embedding std * sqrt(d): logits of std ~3, so the top 10 tokens hold a few percent
GAIN_JITTER = 0.1  # RMSNorm gains 1 + U(-0.1, 0.1)
JITTER_STD = 0.25  # per-feature threshold spread: exp(N(0, 0.25^2))
HOOK_IN, HOOK_OUT = "mlp.hook_in", "mlp.hook_out"
SETS = ("clt", "plt")


# -- build -----------------------------------------------------------------------------------------


def normal(seed: int, name: str, shape, std: float) -> np.ndarray:
    """float32 N(0, std^2), from a generator keyed by the seed and the tensor's name (so a tensor
    does not change when others are added or the number of layers changes)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(std)
    return out


def gains(seed: int, name: str, d: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (1.0 + GAIN_JITTER * rng.uniform(-1.0, 1.0, d)).astype(np.float32)


def model_config(layers: int, tied: bool) -> dict:
    return {**SMOLLM2_135M, "num_hidden_layers": layers, "tie_word_embeddings": tied}


def model_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """HF Llama weights ((out, in) matrices). Projections into the residual stream are scaled
    by 1/sqrt(2L) so that its norm grows slowly over the layers; the embedding is small beside
    the blocks' outputs and sets the logits' spread (tied: it is also the unembedding)."""
    d, L, I = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    H, KV, hd, V = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["vocab_size"]
    out_scale = 1.0 / math.sqrt(2 * L)
    w = {"model.embed_tokens.weight": normal(seed, "embed", (V, d), LOGIT_STD / math.sqrt(d))}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = gains(seed, f"{i}.ln1", d)
        w[p + "self_attn.q_proj.weight"] = normal(seed, f"{i}.q", (H * hd, d), 1 / math.sqrt(d))
        w[p + "self_attn.k_proj.weight"] = normal(seed, f"{i}.k", (KV * hd, d), 1 / math.sqrt(d))
        w[p + "self_attn.v_proj.weight"] = normal(seed, f"{i}.v", (KV * hd, d), 1 / math.sqrt(d))
        w[p + "self_attn.o_proj.weight"] = normal(seed, f"{i}.o", (d, H * hd), out_scale / math.sqrt(H * hd))
        w[p + "post_attention_layernorm.weight"] = gains(seed, f"{i}.ln2", d)
        w[p + "mlp.gate_proj.weight"] = normal(seed, f"{i}.gate", (I, d), 1 / math.sqrt(d))
        w[p + "mlp.up_proj.weight"] = normal(seed, f"{i}.up", (I, d), 1 / math.sqrt(d))
        w[p + "mlp.down_proj.weight"] = normal(seed, f"{i}.down", (d, I), out_scale / math.sqrt(I))
    w["model.norm.weight"] = gains(seed, "norm", d)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(seed, "unembed", (V, d), LOGIT_STD / math.sqrt(d))
    return w


def forward(config: dict, w: dict[str, np.ndarray], ids: list[int]) -> dict[str, np.ndarray]:
    """HF Llama's forward in float64 NumPy: every layer's MLP input (post_attention_layernorm's
    output, circuit-tracer's mlp.hook_in), the residual's RMS after each layer, the last
    position's logits."""
    d, L = config["hidden_size"], config["num_hidden_layers"]
    H, KV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, T = config["rms_norm_eps"], len(ids)
    f64 = lambda name: w[name].astype(np.float64)  # noqa: E731

    def rms_norm(x, gain):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain

    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(T)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(x):  # (heads, T, hd), rotate-half layout (HF and mlx-lm's non-traditional RoPE)
        half = hd // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    causal = np.triu(np.full((T, T), -np.inf), 1)
    x = f64("model.embed_tokens.weight")[ids]
    mlp_in, resid_rms = [], []
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms_norm(x, f64(p + "input_layernorm.weight"))
        q = rope((h @ f64(p + "self_attn.q_proj.weight").T).reshape(T, H, hd).transpose(1, 0, 2))
        k = rope((h @ f64(p + "self_attn.k_proj.weight").T).reshape(T, KV, hd).transpose(1, 0, 2))
        v = (h @ f64(p + "self_attn.v_proj.weight").T).reshape(T, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + causal
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        z = (pattern @ v).transpose(1, 0, 2).reshape(T, H * hd)
        x = x + z @ f64(p + "self_attn.o_proj.weight").T
        h2 = rms_norm(x, f64(p + "post_attention_layernorm.weight"))
        mlp_in.append(h2)
        gate = h2 @ f64(p + "mlp.gate_proj.weight").T
        up = h2 @ f64(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(p + "mlp.down_proj.weight").T
        resid_rms.append(float(np.sqrt(np.mean(x * x))))
    final = rms_norm(x[-1], f64("model.norm.weight"))
    unembed = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return {"mlp_in": np.stack(mlp_in), "resid_rms": np.array(resid_rms), "logits": unembed.astype(np.float64) @ final}


def calibrate(pre: np.ndarray, jitter: np.ndarray, target: float) -> tuple[float, int]:
    """The scale t of thresholds t * jitter that leaves about ``target`` features active per
    position of ``pre`` (positions, features): pre > t * jitter <=> pre / jitter > t, so t goes in
    the middle of the widest gap between sorted ratios within 15% of the target count, away
    from every pre-activation (a bisection would land on one, and float32 rounding would then
    decide whether it is active). Returns (t, active count)."""
    ratios = np.sort((pre / jitter).ravel())[::-1]
    k0 = int(round(target * pre.shape[0]))
    low, high = max(1, int(0.85 * k0)), min(len(ratios) - 1, int(1.15 * k0))
    gaps = ratios[low - 1:high] - ratios[low:high + 1]
    k = low + int(np.argmax(gaps))
    return float(0.5 * (ratios[k - 1] + ratios[k])), k


def encoder(seed: int, layer: int, d: int, F: int, mlp_in: np.ndarray, target_l0: float):
    """One layer's JumpReLU encoder, calibrated on the prompt's positions >= 1 (circuit-tracer
    zeroes position 0). Returns (tensors, statistics)."""
    W_enc = normal(seed, f"tc.{layer}.W_enc", (F, d), 1 / math.sqrt(d))
    b_enc = normal(seed, f"tc.{layer}.b_enc", (F,), 0.1)
    jitter = np.exp(normal(seed, f"tc.{layer}.jitter", (F,), JITTER_STD).astype(np.float64))
    pre = mlp_in[1:] @ W_enc.astype(np.float64).T + b_enc  # float32 weights, as the GPUs read them
    t, _ = calibrate(pre, jitter, target_l0)
    threshold = (t * jitter).astype(np.float32)
    active = pre > threshold
    margin = np.abs(pre - threshold.astype(np.float64)).min()
    stats = {"scale": t, "margin": float(margin), "margin_over_pre_std": float(margin / pre.std()),
             "active_mean": float(active.sum(1).mean()), "active_min": int(active.sum(1).min()),
             "active_max": int(active.sum(1).max())}
    return {"W_enc": W_enc, "b_enc": b_enc, "threshold": threshold}, stats


def write_yaml(path: Path, fields: dict) -> None:
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))


def write_tokenizer(folder: Path, V: int) -> None:
    """A word-level tokenizer in tokenizer.json's format (``tokenizers`` reads it; transformers
    wraps it as PreTrainedTokenizerFast), written as JSON so that no tokenizers version is
    needed to make it: the four specials, then words ``t4 ... t{V-1}``."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update((f"t{i}", i) for i in range(len(SPECIALS), V))
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, s in enumerate(SPECIALS)]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
              **specials, "clean_up_tokenization_spaces": False, "model_max_length": SMOLLM2_135M["max_position_embeddings"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))


def write_model(folder: Path, config: dict, weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config, "hidden_act": "silu",
          "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
          "pretraining_tp": 1, "rope_scaling": None, "use_cache": True, "bos_token_id": BOS, "eos_token_id": 2,
          "pad_token_id": 0, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder, config["vocab_size"])


def build(args) -> int:
    from safetensors.numpy import save_file

    start = time.perf_counter()
    out = Path(args.out)
    sets = _names(args.sets, SETS, "--sets")
    config = model_config(args.layers, tied=not args.untied)
    L, d, V, F = args.layers, config["hidden_size"], config["vocab_size"], args.d_features
    rng = np.random.default_rng([args.seed, zlib.crc32(b"prompt")])
    prompt = [BOS] + rng.integers(len(SPECIALS), V, size=args.prompt_tokens - 1).tolist()

    weights = model_weights(config, args.seed)
    write_model(out / "model", config, weights)
    seen = forward(config, weights, prompt)
    del weights
    probabilities = np.exp(seen["logits"] - seen["logits"].max())
    probabilities /= probabilities.sum()

    folders = {name: out / name for name in sets}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for i in range(L):
        enc, stats = encoder(args.seed, i, d, F, seen["mlp_in"][i], args.target_l0)
        b_dec = normal(args.seed, f"tc.{i}.b_dec", (d,), 0.01)
        if "clt" in folders:  # W_dec_i (F, L - i, d): slot j writes layer i + j
            save_file({f"W_enc_{i}": enc["W_enc"], f"b_enc_{i}": enc["b_enc"], f"b_dec_{i}": b_dec,
                       f"threshold_{i}": enc["threshold"]}, str(folders["clt"] / f"W_enc_{i}.safetensors"))
            W_dec = normal(args.seed, f"clt.{i}.W_dec", (F, L - i, d), 0.1 / math.sqrt(d * (L - i)))
            save_file({f"W_dec_{i}": W_dec}, str(folders["clt"] / f"W_dec_{i}.safetensors"))
            del W_dec
        if "plt" in folders:
            save_file({"W_enc": enc["W_enc"], "b_enc": enc["b_enc"], "b_dec": b_dec,
                       "W_dec": normal(args.seed, f"plt.{i}.W_dec", (F, d), 0.1 / math.sqrt(d)),
                       "activation_function.threshold": enc["threshold"]},
                      str(folders["plt"] / f"layer_{i}.safetensors"))
        layers.append(stats)
    for name, folder in folders.items():
        kind = "cross_layer_transcoder" if name == "clt" else "transcoder_set"
        write_yaml(folder / "config.yaml", {"model_kind": kind, "feature_input_hook": HOOK_IN,
                                            "feature_output_hook": HOOK_OUT, "scan": f"mlxterp-graph-gpu/{name}-{args.seed}"})
    top = np.sort(probabilities)[::-1]
    report = {
        "seed": args.seed, "model": config, "d_features": F, "sets": sets, "target_l0": args.target_l0,
        "prompt": prompt, "numpy": np.__version__,
        "active_per_position": {"mean": float(np.mean([s["active_mean"] for s in layers])),
                                "min": min(s["active_min"] for s in layers), "max": max(s["active_max"] for s in layers)},
        "smallest_threshold_margin_over_pre_std": min(s["margin_over_pre_std"] for s in layers),
        "layers": layers,
        "residual_rms": [round(float(r), 4) for r in seen["resid_rms"]],
        "top10_probabilities": [round(float(p), 5) for p in top[:10]],
        "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "build.json").write_text(json.dumps(report, indent=1))
    print(f"built {out}: {L} layers, {F} features per layer ({', '.join(sets)}), prompt of {len(prompt)} tokens, "
          f"{report['active_per_position']['mean']:.1f} active per (layer, position) "
          f"[{report['active_per_position']['min']}, {report['active_per_position']['max']}], smallest threshold margin "
          f"{report['smallest_threshold_margin_over_pre_std']:.1e} std, top-10 probability "
          f"{sum(top[:10]):.3f}, {report['bytes'] / 2**30:.2f} GiB in {report['seconds']} s")
    return 0


# -- what both runs share ----------------------------------------------------------------------------


def _names(text: str, allowed, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"{option} {text!r}: choose from {', '.join(allowed)}")
    return names


def _lengths(text: str, prompt: list[int]) -> list[int]:
    lengths = [int(t) for t in text.split(",") if t.strip()]
    if not lengths or min(lengths) < 2 or max(lengths) > len(prompt):
        raise SystemExit(f"--tokens {text!r}: give lengths from 2 to {len(prompt)} (the built prompt's length; "
                         "build a longer one with --prompt-tokens)")
    return lengths


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return int(text)


def _max_nodes(text: str) -> int | None:
    return None if text == "all" else _positive(text)


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _save_graph(path: Path, tokens, n_layers, adjacency, active, selected, values, logit_tokens, logit_probabilities):
    np.savez(path, input_ids=np.asarray(tokens, dtype=np.int64), n_layers=np.int64(n_layers),
             adjacency_matrix=np.asarray(adjacency, dtype=np.float32), active_features=np.asarray(active, dtype=np.int32),
             selected_features=np.asarray(selected, dtype=np.int32), activation_values=np.asarray(values, dtype=np.float32),
             logit_token_ids=np.asarray(logit_tokens, dtype=np.int64),
             logit_probabilities=np.asarray(logit_probabilities, dtype=np.float32))


def _time_graphs(args, document: dict, make_graph, save, peak) -> None:
    """Per prompt length: a warm-up graph, then ``repeats`` timed ones, appended to
    ``document["runs"]`` and written out after each length (a run cut short keeps what it
    measured). ``make_graph(ids)`` returns a graph, ``save(graph, path)`` writes its npz and
    returns its counts, ``peak`` is (reset, read) of the allocator's peak."""
    prompt = json.loads((Path(args.dir) / "build.json").read_text())["prompt"]
    out = Path(args.out)
    graphs = Path(args.graphs) if args.graphs else out.parent
    for folder in (out.parent, graphs):
        folder.mkdir(parents=True, exist_ok=True)
    label = f"{document['implementation']} {document['backend']} ({document['device']})"
    document["runs"] = []
    for T in _lengths(args.tokens, prompt):
        ids = prompt[:T]
        start = time.perf_counter()
        make_graph(ids)
        warmup = time.perf_counter() - start
        seconds, peaks = [], []
        for _ in range(args.repeats):
            peak[0]()
            start = time.perf_counter()
            graph = make_graph(ids)
            seconds.append(time.perf_counter() - start)
            peaks.append(peak[1]())
        path = graphs / f"{out.stem}-T{T}.npz"
        counts = save(graph, path)
        run = {"tokens": T, "warmup_seconds": warmup, "seconds": seconds, "median_seconds": statistics.median(seconds),
               "peak_bytes": None if None in peaks else max(peaks), **counts, "adjacency": str(path)}
        document["runs"].append(run)
        out.write_text(json.dumps(document, indent=1) + "\n")
        print(f"{label}: T={T:4d}  {run['median_seconds']:8.3f} s (median of {args.repeats}; warm-up {warmup:.3f} s)  "
              f"peak {_gib(run['peak_bytes'])} GiB  active {counts['n_active']}  selected {counts['n_selected']}  "
              f"logits {counts['n_logits']}", flush=True)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _settings(args) -> dict:
    return {"set": args.set, "batch_size": args.batch_size, "max_feature_nodes": _max_nodes(args.max_feature_nodes),
            "update_interval": args.update_interval, "max_n_logits": args.max_n_logits,
            "desired_logit_prob": args.desired_logit_prob, "repeats": args.repeats, "dtype": "float32"}


# -- mlxterp -----------------------------------------------------------------------------------------


def run_mlx(args) -> int:
    import mlx.core as mx

    from mlxterp.plugin import load
    from mlxterp_transcoders import load_transcoders

    folder = Path(args.dir)
    start = time.perf_counter()
    model = load(folder / "model")
    transcoders = load_transcoders(folder / args.set, model=model)
    tc = transcoders  # read from disk now (mx.load is lazy), so that the load and the resident memory include them
    mx.eval([a for a in [*tc.W_enc, *tc.b_enc, *tc.W_dec, *tc.b_dec, *(tc.threshold or []), *(tc.W_skip or [])] if a is not None])
    load_seconds = time.perf_counter() - start
    resident = mx.get_active_memory()
    max_nodes = _max_nodes(args.max_feature_nodes)
    options = {} if args.memory_budget is None else {"memory_budget": args.memory_budget}

    def make_graph(ids):
        return model.attribution_graph(ids, transcoders, max_feature_nodes=max_nodes, max_n_logits=args.max_n_logits,
                                       desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size,
                                       update_interval=args.update_interval, progress=False, **options)

    def save(graph, path):
        _save_graph(path, graph.tokens, graph.n_layers, graph.adjacency, graph.active_features, graph.selected_features,
                    graph.activation_values, graph.logit_tokens, graph.logit_probabilities)
        return {"n_active": len(graph.active_features), "n_selected": graph.n_selected, "n_logits": graph.n_logits,
                "n_nodes": graph.n_nodes}

    document = {
        "implementation": "mlxterp", "backend": "mlx", "device": str(mx.default_device()),
        "device_info": _mlx_device_info(mx),
        "versions": {n: _version(n) for n in ("mlxterp", "mlx", "mlx-cuda-13", "mlx-metal", "mlx-lm", "numpy")},
        "environment": {k: os.environ.get(k) for k in ("MLX_ENABLE_TF32",)}, "python": platform.python_version(),
        "dir": str(folder), "settings": {**_settings(args), "memory_budget": args.memory_budget},
        "load_seconds": load_seconds, "resident_bytes": resident,
    }
    _time_graphs(args, document, make_graph, save, (mx.reset_peak_memory, mx.get_peak_memory))
    return 0


def _mlx_device_info(mx) -> dict:
    try:
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in mx.device_info().items()}
    except Exception as e:  # older MLX, or no device information
        return {"error": f"{type(e).__name__}: {e}"}


# -- circuit-tracer ----------------------------------------------------------------------------------


def run_ct(args) -> int:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    folder = Path(args.dir).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    start = time.perf_counter()
    # encoders and decoders resident on the device, as mlxterp keeps them
    transcoders, _ = load_transcoder_from_hub(str(folder / args.set), device=device, dtype=torch.float32,
                                              lazy_encoder=False, lazy_decoder=False)
    model = (_ct_nnsight(folder / "model", transcoders, device) if args.backend == "nnsight"
             else _ct_transformerlens(folder / "model", transcoders, device))
    if cuda:
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - start
    resident = torch.cuda.memory_allocated() if cuda else None
    max_nodes = _max_nodes(args.max_feature_nodes)

    def make_graph(ids):
        graph = attribute(torch.tensor(ids), model, max_n_logits=args.max_n_logits,
                          desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size,
                          max_feature_nodes=max_nodes, update_interval=args.update_interval, verbose=False)
        if cuda:
            torch.cuda.synchronize()
        return graph

    def save(graph, path):
        _save_graph(path, graph.input_tokens.cpu().numpy(), graph.cfg.n_layers, graph.adjacency_matrix.cpu().numpy(),
                    graph.active_features.cpu().numpy(), graph.selected_features.cpu().numpy(),
                    graph.activation_values.cpu().numpy(), graph.logit_token_ids.cpu().numpy(),
                    graph.logit_probabilities.cpu().numpy())
        n_selected, n_logits = len(graph.selected_features), len(graph.logit_token_ids)
        return {"n_active": len(graph.active_features), "n_selected": n_selected, "n_logits": n_logits,
                "n_nodes": int(graph.adjacency_matrix.shape[0])}

    peak = ((torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated) if cuda
            else (lambda: None, lambda: None))  # torch keeps no peak on the CPU
    document = {
        "implementation": "circuit-tracer", "backend": args.backend, "device": str(device),
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "versions": {n: _version(n) for n in ("circuit-tracer", "torch", "transformers", "nnsight", "transformer-lens",
                                              "tokenizers", "huggingface-hub", "numpy")},
        "environment": {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "threads": torch.get_num_threads()},
        "python": platform.python_version(), "dir": str(folder), "settings": _settings(args),
        "load_seconds": load_seconds, "resident_bytes": resident,
    }
    _time_graphs(args, document, make_graph, save, peak)
    return 0


def _ct_nnsight(model_folder: Path, transcoders, device):
    import torch
    from circuit_tracer import ReplacementModel

    return ReplacementModel.from_pretrained_and_transcoders(str(model_folder), transcoders, backend="nnsight",
                                                            device=device, dtype=torch.float32)


def _ct_transformerlens(model_folder: Path, transcoders, device):
    """circuit-tracer's TransformerLens backend on the HF folder: a HookedTransformerConfig
    written from config.json and the HF weights converted by TransformerLens (its replacement
    model wraps the MLPs and the unembedding, hence the renamed keys)."""
    import torch
    from circuit_tracer import ReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(model_folder), torch_dtype=torch.float32).eval()
    c = hf_model.config
    prompt_tokens = len(json.loads((model_folder.parent / "build.json").read_text())["prompt"])
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=prompt_tokens, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=c.head_dim, rotary_base=c.rope_theta, gated_mlp=True,
        final_rms=True, eps=c.rms_norm_eps, n_key_value_heads=c.num_key_value_heads,
        original_architecture="LlamaForCausalLM", tokenizer_name=str(model_folder), model_name=str(model_folder),
        default_prepend_bos=False, dtype=torch.float32, device=str(device),
    )
    model = ReplacementModel.from_config(cfg, transcoders, backend="transformerlens",
                                         tokenizer=AutoTokenizer.from_pretrained(str(model_folder)))
    weights = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v
               for k, v in convert_llama_weights(hf_model, cfg).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not k.startswith("transcoders.") and not any(s in k for s in ("IGNORE", "mask", "rotary"))]
    if bad or unexpected:
        raise RuntimeError(f"TransformerLens weights did not fit the replacement model: missing {bad[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    del hf_model
    return model


# -- compare -----------------------------------------------------------------------------------------


def node_keys(graph) -> list[tuple]:
    """Every node of a saved graph by what it is: ("f", layer, position, feature), ("e", layer,
    position), ("t", position), ("l", token), in the graph's own node order."""
    L, T = int(graph["n_layers"]), len(graph["input_ids"])
    active = graph["active_features"]
    keys = [("f", *map(int, active[k])) for k in graph["selected_features"]]
    keys += [("e", layer, pos) for layer in range(L) for pos in range(T)]
    keys += [("t", pos) for pos in range(T)]
    keys += [("l", int(t)) for t in graph["logit_token_ids"]]
    return keys


def compare_graphs(a, b) -> dict:
    """Edge differences of two saved graphs on the nodes they share, and whether their nodes agree."""
    keys_a, keys_b = node_keys(a), node_keys(b)
    index_b = {k: i for i, k in enumerate(keys_b)}
    shared = [(i, index_b[k]) for i, k in enumerate(keys_a) if k in index_b]
    ia, ib = (np.array(ix, dtype=np.int64) for ix in zip(*shared)) if shared else (np.zeros(0, np.int64),) * 2
    A = a["adjacency_matrix"][np.ix_(ia, ia)].astype(np.float64)
    B = b["adjacency_matrix"][np.ix_(ib, ib)].astype(np.float64)
    diff = float(np.abs(A - B).max()) if A.size else 0.0
    scale = float(np.abs(B).max()) if B.size else 0.0
    same_active = a["active_features"].shape == b["active_features"].shape and bool(
        np.array_equal(a["active_features"], b["active_features"]))
    features = lambda keys: {k for k in keys if k[0] == "f"}  # noqa: E731
    return {
        "same_tokens": bool(np.array_equal(a["input_ids"], b["input_ids"])),
        "same_active_features": same_active,
        "n_active": [len(a["active_features"]), len(b["active_features"])],
        "activation_values_max_abs_diff": (float(np.abs(a["activation_values"] - b["activation_values"]).max())
                                           if same_active and len(a["activation_values"]) else None),
        "same_selected_features": features(keys_a) == features(keys_b),
        "n_selected": [len(a["selected_features"]), len(b["selected_features"])],
        "n_selected_shared": len(features(keys_a) & features(keys_b)),
        "same_logit_tokens": a["logit_token_ids"].tolist() == b["logit_token_ids"].tolist(),
        "n_nodes": [len(keys_a), len(keys_b)], "n_nodes_compared": len(shared),
        "max_abs_diff": diff, "max_abs_edge": scale, "relative_diff": diff / scale if scale else 0.0,
    }


def _graph_pairs(a: str, b: str) -> list[tuple[str, str, str]]:
    """(label, npz, npz) to compare: two graphs, or two runs' JSON documents paired by length."""
    if not (a.endswith(".json") and b.endswith(".json")):
        return [(f"{Path(a).name} vs {Path(b).name}", a, b)]
    runs = [{run["tokens"]: run["adjacency"] for run in json.loads(Path(p).read_text())["runs"]} for p in (a, b)]
    return [(f"{Path(a).stem} vs {Path(b).stem}, T={T}", runs[0][T], runs[1][T]) for T in runs[0] if T in runs[1]]


def compare(args) -> int:
    pairs = []
    for label, path_a, path_b in _graph_pairs(args.a, args.b):
        with np.load(path_a) as a, np.load(path_b) as b:
            result = {"tokens": len(a["input_ids"]), "a": path_a, "b": path_b, **compare_graphs(a, b)}
        pairs.append(result)
        agree = result["same_active_features"] and result["same_selected_features"] and result["same_logit_tokens"]
        print(f"{label}: {'same' if agree else 'DIFFERENT'} nodes (active {result['n_active']}, selected "
              f"{result['n_selected']}, shared {result['n_selected_shared']}, logits "
              f"{'same' if result['same_logit_tokens'] else 'different'}); over {result['n_nodes_compared']} shared nodes "
              f"max |dA| = {result['max_abs_diff']:.3g} (max |A| {result['max_abs_edge']:.3g}, relative "
              f"{result['relative_diff']:.2g})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"a": args.a, "b": args.b, "pairs": pairs}, indent=1) + "\n")
    return 0


# -- report ------------------------------------------------------------------------------------------


def report(args) -> int:
    """One table of every run and comparison in a folder, and one JSON holding them all."""
    documents = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.folder).glob("*.json"))}
    runs = {name: d for name, d in documents.items() if "implementation" in d}
    comparisons = {name: d for name, d in documents.items() if "pairs" in d}
    print("| run | card | T | median s (of repeats) | warm-up s | peak GiB | active | selected |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, d in runs.items():
        card = d.get("card") or d.get("device_info", {}).get("device_name") or d["device"]
        for run in d.get("runs", []):
            print(f"| {name} ({d['implementation']}, {d['backend']}, {d['settings']['set']}) | {card} | {run['tokens']} | "
                  f"{run['median_seconds']:.3f} ({', '.join(f'{s:.3f}' for s in run['seconds'])}) | "
                  f"{run['warmup_seconds']:.2f} | {_gib(run['peak_bytes'])} | {run['n_active']} | {run['n_selected']} |")
    mlx = {(d["settings"]["set"], run["tokens"]): run["median_seconds"]
           for d in runs.values() if d["implementation"] == "mlxterp" for run in d.get("runs", [])}
    for d in runs.values():
        if d["implementation"] != "mlxterp":
            for run in d.get("runs", []):
                key = (d["settings"]["set"], run["tokens"])
                if key in mlx:
                    print(f"{key[0]} T={key[1]}: circuit-tracer ({d['backend']}) {run['median_seconds']:.3f} s / mlxterp "
                          f"{mlx[key]:.3f} s = {run['median_seconds'] / mlx[key]:.2f}x")
    for name, d in comparisons.items():
        for pair in d["pairs"]:
            print(f"{name} T={pair['tokens']}: active {'same' if pair['same_active_features'] else 'DIFFERENT'}, "
                  f"selected {'same' if pair['same_selected_features'] else 'DIFFERENT'} "
                  f"({pair['n_selected_shared']} of {pair['n_selected']} shared), max |dA| {pair['max_abs_diff']:.3g} "
                  f"(relative {pair['relative_diff']:.2g})")
    if args.json:
        Path(args.json).write_text(json.dumps(documents, indent=1) + "\n")
    return 0


# -- command line ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    prog = f"python -m {__spec__.name}" if globals().get("__spec__") else "graph_gpu.py"
    top = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)

    b = commands.add_parser("build", help="write the random model, tokenizer, prompt and transcoders")
    b.add_argument("--out", required=True, help="folder to write (created)")
    b.add_argument("--layers", type=_positive, default=SMOLLM2_135M["num_hidden_layers"])
    b.add_argument("--d-features", type=_positive, default=4096, help="transcoder features per layer (default 4096)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--target-l0", type=float, default=32.0,
                   help="active features per (layer, position) on the prompt, on average (default 32)")
    b.add_argument("--prompt-tokens", type=_positive, default=128, help="length of the prompt (BOS first; default 128)")
    b.add_argument("--sets", default="clt,plt", help="transcoders to write: clt, plt or both (default clt,plt)")
    b.add_argument("--untied", action="store_true", help="a separate unembedding (SmolLM2's is tied)")
    b.set_defaults(handler=build)

    for name, handler, what in (("mlx", run_mlx, "mlxterp"), ("ct", run_ct, "circuit-tracer")):
        p = commands.add_parser(name, help=f"time {what}'s attribution graphs on the built folder")
        p.add_argument("--dir", required=True, help="the folder build wrote")
        p.add_argument("--out", required=True, help="JSON to write (after each prompt length)")
        p.add_argument("--graphs", help="folder for the graphs, OUT's name-T{n}.npz (default: beside OUT)")
        p.add_argument("--set", default="clt", choices=SETS, help="which transcoders (default clt)")
        p.add_argument("--tokens", default="10,64", help="prompt lengths, comma-separated (default 10,64)")
        p.add_argument("--batch-size", type=_positive, default=64)
        p.add_argument("--max-feature-nodes", default="2048", type=lambda t: t if t == "all" else str(_positive(t)),
                       help="a number, or 'all' (default 2048)")
        p.add_argument("--update-interval", type=_positive, default=4)
        p.add_argument("--max-n-logits", type=_positive, default=10)
        p.add_argument("--desired-logit-prob", type=float, default=0.95)
        p.add_argument("--repeats", type=_positive, default=3, help="timed graphs per length, after one warm-up (default 3)")
        if name == "mlx":
            p.add_argument("--memory-budget", default=None, help="mlxterp's memory_budget (default: its own)")
        else:
            p.add_argument("--backend", default="nnsight", choices=["nnsight", "transformerlens"])
        p.set_defaults(handler=handler)

    c = commands.add_parser("compare", help="compare two saved graphs (npz), or two runs (their JSON), node by node")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", help="also write the comparison here")
    c.set_defaults(handler=compare)

    r = commands.add_parser("report", help="tabulate the runs and comparisons of a folder of JSON results")
    r.add_argument("folder")
    r.add_argument("--json", help="also write every result of the folder into this one file")
    r.set_defaults(handler=report)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
