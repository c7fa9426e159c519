"""Run under two ring ranks by test_sharding.py (not a test module itself).

For each ``family:mode`` given, a tiny seeded model is built twice in this process, identically on
every rank: once unsharded, once sharded by mlx-lm (tensor or pipeline parallelism) and wrapped.
Every check runs on both and records how far the sharded results are from the unsharded ones
(the largest absolute difference over the largest magnitude; 0 means bitwise equal), plus facts
about the sharded run (collectives per forward, errors). Each rank writes
``OUT/<family>-<mode>-rank<r>.json``; the test reads both ranks' files.

    python sharded_worker.py OUT llama:tensor qwen2:pipeline ...
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import mlxterp  # noqa: F401  first: the BLAS
import mlx.core as mx
import numpy as np
from helpers import CORPUS, tiny_family, train_tokenizer

from mlxterp import InterpretableModel
from mlxterp import interventions as iv

CLEAN = [5, 17, 42, 9, 33, 71, 2, 88]
CORRUPTED = [5, 17, 60, 9, 33, 71, 2, 88]
IDS = [[11, 23, 5, 61, 7, 19, 42, 3, 88, 14]]
VOCAB = 320


def relative(a, b) -> float:
    a = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64)
    b = np.asarray(b.astype(mx.float32) if isinstance(b, mx.array) else b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
    return float(np.abs(a - b).max() / scale) if a.size else 0.0


def worst(pairs) -> dict:
    """{'value': the largest relative difference, 'at': where, 'n': how many compared}."""
    found = [(relative(a, b), name) for name, a, b in pairs]
    value, at = max(found) if found else (0.0, None)
    return {"value": value, "at": at, "n": len(found)}


class Collectives:
    """Counts the collectives mlxterp and the model issue (wrapping mx.distributed's functions)."""

    def __init__(self):
        self.count = 0
        self.originals = {}
        for name in ("all_gather", "all_sum"):
            original = getattr(mx.distributed, name)
            self.originals[name] = original

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(mx.distributed, name, counted)

    def around(self, fn):
        before = self.count
        fn()
        return self.count - before


SHAPES = {"mistral": {"num_key_value_heads": 2}}  # its file has 1 KV head, which 2 ranks cannot split


def build(family: str, mode: str, tokenizer):
    from mlxterp_core.sharding import shard

    shape = {"vocab_size": VOCAB, **SHAPES.get(family, {})}
    unsharded = InterpretableModel(tiny_family(family, **shape), tokenizer=tokenizer)
    module = tiny_family(family, **shape)
    shard(module, mode)
    # fresh processes start from different random states (MLX seeds from the clock): wrapping
    # the sharded model must make them equal, which the unseeded sampling below checks
    mx.random.seed(1000 + mx.distributed.init().rank())
    return unsharded, InterpretableModel(module, tokenizer=tokenizer)


def interventions_cases(model, mode, family):
    arch = model.architecture
    d = arch.d_model
    rng = np.random.default_rng(0)
    vector = mx.array(rng.normal(size=d).astype(np.float32))
    q_width = arch.n_heads * arch.head_dim
    columns = mx.array(rng.uniform(0.5, 1.5, size=q_width).astype(np.float32))

    def mix_heads(x):  # (B, H, T, D): every head half its own, half the mean of all heads
        return 0.5 * x + 0.5 * x.mean(axis=1, keepdims=True)

    cases = {
        "replicated": {"layers.1.output": iv.add_vector(vector)},
        "head": {"layers.1.attn.z": iv.zero_out.at(heads=[3])},
        "head_view": {"layers.0.attn.z_heads": iv.scale(0.0).at(heads=[1, 2])},
        "columns": {"layers.0.attn.q": iv.scale(columns)},
        "raw": {"model.model.layers.1.self_attn.q_proj": iv.scale(columns).at(positions=2)},
        "function": {"layers.1.attn.z_heads": mix_heads},
        "noise": {"layers.0.attn.v": iv.noise(0.3, seed=5)},
        "pattern": {"layers.1.attn.pattern": iv.scale(2.0).at(positions=3)},
        "glob": {"model.model.layers.*.mlp": iv.scale(0.9)},
        "composed": {"layers.0.attn.k": iv.compose().add(iv.scale(1.5)).add(iv.clamp(-1.0, 1.0)).build()},
    }
    if arch.has("mlp.act"):
        width = arch.d_mlp
        act = mx.array(rng.uniform(0.5, 1.5, size=width).astype(np.float32))
        cases["mlp_columns"] = {"layers.0.mlp.act": iv.scale(act).at(positions=[1, 4])}
    if family == "qwen3_moe" and mode == "tensor":
        cases["partial_sum"] = {"model.model.layers.1.mlp.switch_mlp": iv.scale(2.0)}
    return cases


def make_sae(model, site: str, seed: int):
    from mlxterp_saes import SAE, SAEConfig

    width = model.architecture.d_model if not site.endswith("attn.z") else model.architecture.n_heads * model.architecture.head_dim
    rng = np.random.default_rng(seed)
    features = 2 * width
    weights = {"W_enc": mx.array(rng.normal(size=(width, features)).astype(np.float32) / width ** 0.5),
               "b_enc": mx.zeros((features,)), "W_dec": mx.array(rng.normal(size=(features, width)).astype(np.float32) / features ** 0.5),
               "b_dec": mx.zeros((width,))}
    return SAE(SAEConfig("standard", width, features, site=site), weights)


class ReadingSplice:
    """A splice (the protocol of mlxterp_core.splice) at ``layers.1.mlp`` that reads a sharded
    site earlier in the pass, as a transcoder reads its input: the MLP output plus a function of
    every head's z."""

    site, reads, prefix, sub_sites = "layers.1.mlp", "layers.1.attn.z", "probe", ("heads",)

    def splice(self, x, visit, source):
        summary = visit("heads", source.mean(axis=-1, keepdims=True))  # (B, T, 1): all heads
        return x + 0.5 * summary.astype(x.dtype)


def checks(family: str, mode: str, tokenizer, out: str, counter: Collectives) -> dict:
    from mlxterp_core.invariants import check_all

    U, S = build(family, mode, tokenizer)
    ua, sa = U.architecture, S.architecture
    results: dict = {}

    timings = results["timings"] = {}

    def check(name):
        def register(fn):
            started = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001  reported to the test
                results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            timings[name] = round(time.perf_counter() - started, 3)
            return fn

        return register

    @check("architecture")
    def _():
        facts = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_vocab", "d_mlp")
        return {"same": all(getattr(ua, f) == getattr(sa, f) for f in facts),
                "sharded": {f: getattr(sa, f) for f in facts}, "repr": repr(S)}

    @check("standard_names")
    def _():
        # every standard name read from a capture-everything trace, and captured by name
        # (attention patterns are opt-in: by name only)
        heads = [f"layers.{i}.attn.{v}" for i in range(ua.n_layers) for v in ("q_heads", "k_heads", "v_heads", "z_heads")]
        patterns = [f"layers.{i}.attn.pattern" for i in range(ua.n_layers)]
        names = [n for n in ua.standard_names() if n not in patterns] + heads
        a, b = U.run(IDS).activations, S.run(IDS).activations
        pairs = [(n, b[n], a[n]) for n in names]
        a, b = U.run(IDS, capture=names + patterns).activations, S.run(IDS, capture=names + patterns).activations
        pairs += [(f"{n} (captured)", b[n], a[n]) for n in names + patterns]
        shapes = all(x.shape == y.shape for _, x, y in pairs)
        return {**worst(pairs), "shapes": shapes}

    @check("raw_names")
    def _():
        a, b = dict(U.run(IDS).activations), dict(S.run(IDS).activations)
        both = [n for n in a if n in b and isinstance(a[n], mx.array)]
        return {**worst((n, b[n], a[n]) for n in both), "only_unsharded": sorted(set(a) - set(b)),
                "only_sharded": sorted(set(b) - set(a))}

    @check("globs")
    def _():
        capture = ["model.model.layers.*.self_attn.o_proj:input", "layers[*].output", "model.model.layers.*.mlp"]
        a, b = U.run(IDS, capture=capture).activations, S.run(IDS, capture=capture).activations
        names = [n for n in a if n != "__model_output__"]
        pairs = [(n, b[n], a[n]) for n in names] + [("layers[*].output", b["layers[*].output"], a["layers[*].output"])]
        return {**worst(pairs), "same_names": sorted(a) == sorted(b)}

    @check("interventions")
    def _():
        found = {}
        for case, edits in interventions_cases(U, mode, family).items():
            probe = ["logits", "layers.2.output", "layers.1.attn.z"]
            a = U.run(IDS, interventions=edits, capture=probe).activations
            b = S.run(IDS, interventions=edits, capture=probe).activations
            plain = U.run(IDS, capture=["logits"]).activations["logits"]
            moved = relative(a["logits"], plain)
            found[case] = {**worst((n, b[n], a[n]) for n in probe), "moves_logits": moved}
        return found

    @check("collectives")
    def _():
        residual = [f"layers.{i}.output" for i in range(sa.n_layers)]
        if S.sharding.mode == "pipeline":  # every stage's records travel, in one gather a pass
            everything = residual + [f"layers.{i}.{s}" for i in range(sa.n_layers) for s in ("mlp", "attn.z")]
            plain = counter.around(lambda: mx.eval(S(IDS)))
            found = {"plain_forward": plain}
            for name, capture in (("residual_trace", residual), ("gathered_trace", everything)):
                S.run(IDS, capture=capture)  # the first time, the stages also describe their records
                found[name] = counter.around(lambda capture=capture: S.run(IDS, capture=capture)) - plain
            return found
        sharded_sites = [f"layers.{i}.attn.{s}" for i in range(sa.n_layers) for s in ("q", "k", "v", "z")]
        plain = counter.around(lambda: mx.eval(S(IDS)))
        return {
            "plain_forward": plain,
            "residual_trace": counter.around(lambda: S.run(IDS, capture=residual)) - plain,
            "gathered_trace": counter.around(lambda: S.run(IDS, capture=sharded_sites)) - plain,
            "head_edit": counter.around(lambda: S.run(IDS, capture=["logits"], interventions={"layers.1.attn.z": iv.zero_out.at(heads=[3])})) - plain,
            "function_edit": counter.around(lambda: S.run(IDS, capture=["logits"], interventions={"layers.1.attn.z_heads": lambda x: x[:, ::-1]})) - plain,
        }

    @check("saes")
    def _():
        replicated, sharded_site = make_sae(U, "layers.1.output", 1), make_sae(U, "layers.1.attn.z", 2)
        capture = ["logits", "layers.1.output.sae.features", "layers.1.attn.z.sae.features", "layers.1.mlp.probe.heads"]
        edits = {"layers.1.output.sae.features": iv.scale(0.0).at(positions=[2, 3])}
        splices = [replicated, sharded_site, ReadingSplice()]
        a = U.run(IDS, capture=capture, saes=splices, interventions=edits).activations
        b = S.run(IDS, capture=capture, saes=splices, interventions=edits).activations
        return worst((n, b[n], a[n]) for n in capture)

    @check("logit_lens")
    def _():
        pairs, ids_equal = [], True
        for position in (None, 4):  # every position, and one (the tokens up to it only)
            a, b = U.logit_lens(IDS[0], top_k=5, position=position), S.logit_lens(IDS[0], top_k=5, position=position)
            shown = range(len(IDS[0]) if position is None else 1)
            ids_equal &= all([t for t, _, _ in a[l][p]] == [t for t, _, _ in b[l][p]] for l in a.layers for p in shown)
            pairs += [(f"{position}:{l}.{p}", np.array([q for _, q, _ in b[l][p]]), np.array([q for _, q, _ in a[l][p]]))
                      for l in a.layers for p in shown]
        return {**worst(pairs), "ids_equal": ids_equal}

    @check("patching")
    def _():
        from mlxterp_analyses.patching import reads_last

        @reads_last(1)
        def probability(logits):
            return mx.softmax(logits[:, -1].astype(mx.float32), axis=-1)[:, 3]

        @reads_last(1)
        def logit(logits):  # no difference of two logits: no cancellation to amplify rounding
            return logits[:, -1, 3].astype(mx.float32)

        found = {}
        for case, kwargs in {
            "resid_positions": dict(component="resid", positions="all", answers=(3, 4)),
            "heads": dict(component="attn", heads=True, answers=(3, 4)),
            "resid_positions_logit": dict(component="resid", positions="all", answers=(3, 4), metric=logit),
            "heads_logit": dict(component="attn", heads=True, answers=(3, 4), metric=logit),
            "mlp_layers_probability": dict(component="mlp", metric=probability, answers=(3, 4)),
        }.items():
            a = U.activation_patching(CLEAN, CORRUPTED, progress=False, **kwargs)
            b = S.activation_patching(CLEAN, CORRUPTED, progress=False, **kwargs)
            found[case] = worst([(case, np.array(b.recovery), np.array(a.recovery))])
        return found

    @check("attribution")
    def _():
        if S.sharding.mode == "pipeline":
            try:
                S.attribution_patching(CLEAN, CORRUPTED, answers=(3, 4))
            except Exception as e:  # noqa: BLE001
                return {"refused": type(e).__name__, "message": str(e)}
            return {"refused": None}
        a = U.attribution_patching(CLEAN, CORRUPTED, answers=(3, 4))
        b = S.attribution_patching(CLEAN, CORRUPTED, answers=(3, 4))
        return worst((c, np.array(b.estimates[c]), np.array(a.estimates[c])) for c in a.estimates)

    @check("generation")
    def _():
        vector_u = U.steering_vector(["I love this movie."], ["I hate this movie."], layer=1)
        vector_s = S.steering_vector(["I love this movie."], ["I hate this movie."], layer=1)
        steered = {"layers.1.output": iv.add_vector(mx.array(vector_u.vector) * 4.0)}
        a = U.generate(IDS[0], max_tokens=6, interventions=steered, capture=["layers.2.attn.z", "logits"], stop_at_eos=False)
        b = S.generate(IDS[0], max_tokens=6, interventions=steered, capture=["layers.2.attn.z", "logits"], stop_at_eos=False)
        plain = U.generate(IDS[0], max_tokens=6, stop_at_eos=False)
        pairs = [(f"{k}.{n}", b.activations[k][n], a.activations[k][n]) for k in range(len(a.activations)) for n in ("layers.2.attn.z", "logits")]
        pairs.append(("vector", np.array(vector_s.vector), np.array(vector_u.vector)))
        # sampled without a seed: every rank draws the same tokens (the test compares the ranks)
        sampled = S.generate(IDS[0], max_tokens=6, temperature=1.0, stop_at_eos=False).tokens
        return {**worst(pairs), "tokens_equal": a.tokens == b.tokens, "steering_changes_tokens": a.tokens != plain.tokens,
                "sampled": sampled}

    @check("head_scores")
    def _():
        pairs = []
        for kind in ("previous_token", "induction"):
            a = U.head_scores(kind, n_tokens=6, n_sequences=3)
            b = S.head_scores(kind, n_tokens=6, n_sequences=3)
            pairs.append((kind, np.array(b.scores), np.array(a.scores)))
        return worst(pairs)

    @check("cache")
    def _():
        from pathlib import Path

        corpus = [" ".join(CORPUS)] * 3 + CORPUS
        sites = ["layers[*].output", "layers.1.attn.z", "layers.0.ln2"]
        options = dict(context_size=16, batch_size=2, shard_tokens=48, overwrite=True, progress=False)
        root = Path(out) / f"cache-{family}-{mode}"
        a = U.cache_activations(corpus, sites, root / "unsharded", **options)
        b = S.cache_activations(corpus, sites, root / "sharded", **options)
        names = list(a.sites)
        pairs = [(n, b[n][:], a[n][:]) for n in names]
        same_rows = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "document", "position", "offset", "bos"))
        return {**worst(pairs), "sites": names == list(b.sites), "rows": same_rows, "n_tokens": b.n_tokens,
                "writers": sorted({p["rank"] for s in b.shards for p in s.get("parts", [s])})}

    @check("invariants")
    def _():
        found = check_all(S, IDS[0])
        return {"failed": [f"{c.name}: {c.detail}" for c in found if c.passed is False],
                "passed": [c.name for c in found if c.passed]}

    return results


def loading(out: str, tokenizer) -> dict:
    """mlxterp.load(dir, shard=...) and mlx-lm's own sharded_load, wrapped, against the unsharded model."""
    from pathlib import Path

    from mlx_lm.utils import save_config, save_model, sharded_load

    import mlxterp as facade

    folder = Path(out) / "qwen2-model"
    group = mx.distributed.init()
    if group.rank() == 0 and not (folder / "config.json").exists():
        module = tiny_family("qwen2", vocab_size=VOCAB)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, module)
        save_config({**vars(module.args), "model_type": "qwen2"}, folder / "config.json")
        tokenizer.save_pretrained(str(folder))
    mx.eval(mx.distributed.all_sum(mx.array(1)))  # the folder is written
    reference = facade.load(folder, kernels=False)
    want = reference.run(IDS, capture=["layers.1.attn.z", "logits"]).activations
    results = {}
    for label, make in {
        "load_tensor": lambda: facade.load(folder, shard="tensor", kernels=False),
        "load_pipeline": lambda: facade.load(folder, shard="pipeline", kernels=False),
        "sharded_load_tensor": lambda: InterpretableModel(*sharded_load(str(folder))),
        "sharded_load_pipeline": lambda: InterpretableModel(*sharded_load(str(folder), pipeline_group=group)),
    }.items():
        try:
            model = make()
            got = model.run(IDS, capture=["layers.1.attn.z", "logits"]).activations
            results[label] = {**worst((n, got[n], want[n]) for n in ("layers.1.attn.z", "logits")),
                              "mode": model.sharding.mode if model.sharding else None}
        except Exception as e:  # noqa: BLE001
            results[label] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    return results


def main() -> None:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    out, wanted = sys.argv[1], sys.argv[2:]
    group = mx.distributed.init()
    rank = group.rank()
    tokenizer = TokenizerWrapper(train_tokenizer())
    counter = Collectives()
    for item in wanted:
        started = time.perf_counter()
        if item == "loading":
            results = loading(out, tokenizer._tokenizer)
            name = "loading"
        else:
            family, mode = item.split(":")
            results = checks(family, mode, tokenizer, out, counter)
            name = f"{family}-{mode}"
        results["seconds"] = round(time.perf_counter() - started, 2)
        with open(f"{out}/{name}-rank{rank}.json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"rank {rank}: {name} done in {results['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
