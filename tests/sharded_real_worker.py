"""Run under three ring ranks by test_sharding.py (not a test module itself): the default model
(SmolLM2-135M, llama) loaded twice in every rank, unsharded and sharded by tensor parallelism
(``mlxterp.load(shard="tensor")``; its 9 query and 3 key/value heads divide by 3 ranks, not by
2), running the README's examples and the demo's analyses on both. Each rank writes
``OUT/real-rank<r>.json``: per check, the largest difference over the largest magnitude, and the
top tokens of both runs.
"""

from __future__ import annotations

import json
import sys
import time

import mlxterp
import mlx.core as mx
import numpy as np

from mlxterp import interventions as iv

LENS_PROMPT = "The capital of France is"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
POSITIVE = ["I love this. It is wonderful and amazing.", "This is great, I am so happy."]
NEGATIVE = ["I hate this. It is terrible and awful.", "This is bad, I am so sad."]
STEER_PROMPT = "I went to see the new movie yesterday. I thought it was"


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def f32(x):
    return np.array(x.astype(mx.float32))


def main() -> None:
    out = sys.argv[1]
    group = mx.distributed.init()
    unsharded = mlxterp.load()
    sharded = mlxterp.load(shard="tensor")
    results: dict = {"sharding": repr(sharded.sharding), "heads": sharded.architecture.n_heads}

    def both(fn):
        started = time.perf_counter()
        a, b = fn(unsharded), fn(sharded)
        return a, b, round(time.perf_counter() - started, 2)

    # README: a trace, its output, standard and raw names
    def readme_trace(model):
        with model.trace(LENS_PROMPT) as tr:
            logits = model.output.save()
        acts = tr.activations
        return {"logits": f32(logits), "q": f32(acts["layers[5].attn.q"]), "stream": f32(acts["layers[*].output"]),
                "raw_q": f32(acts["model.model.layers.5.self_attn.q_proj"]),
                "z": f32(acts["model.model.layers.5.self_attn.o_proj:input"]),
                "keys": f32(acts["model.model.layers.5.self_attn.rope#1"])}

    a, b, seconds = both(readme_trace)
    results["readme_trace"] = {"value": max(relative(b[k], a[k]) for k in a), "seconds": seconds,
                               "top": [unsharded.token_to_str(int(np.argmax(a["logits"][0, -1]))),
                                       sharded.token_to_str(int(np.argmax(b["logits"][0, -1])))]}

    def readme_run(model):
        tr = model.run(["The capital of France is", "Hello"],
                       interventions={"model.model.layers.3.mlp": iv.scale(0.5).at(positions=2)},
                       capture=["model.model.layers.*"])
        return {name: f32(value) for name, value in tr.activations.items() if isinstance(value, mx.array)}

    a, b, seconds = both(readme_run)
    results["readme_run"] = {"value": max(relative(b[k], a[k]) for k in a), "sites": len(a), "same_sites": sorted(a) == sorted(b),
                             "seconds": seconds}

    a, b, seconds = both(lambda m: m.logit_lens(LENS_PROMPT))
    ids = lambda lens: [[[t for t, _, _ in lens[l][p]] for p in range(len(lens.tokens))] for l in lens.layers]  # noqa: E731
    probs = lambda lens: [[[q for _, q, _ in lens[l][p]] for p in range(len(lens.tokens))] for l in lens.layers]  # noqa: E731
    results["logit_lens"] = {"ids_equal": ids(a) == ids(b), "value": relative(probs(b), probs(a)), "seconds": seconds,
                             "last": [a[29][-1][0][2], b[29][-1][0][2]]}

    for name, kwargs in {"patching_resid": dict(component="resid", positions="all"),
                         "patching_mlp": dict(component="mlp"), "patching_attn": dict(component="attn")}.items():
        a, b, seconds = both(lambda m: m.activation_patching(CLEAN, CORRUPTED, progress=False, **kwargs))
        results[name] = {"value": relative(b.recovery, a.recovery), "seconds": seconds,
                         "absolute": float(np.abs(np.array(b.recovery) - np.array(a.recovery)).max()),
                         "answers": [a.clean_answer, a.corrupted_answer, b.clean_answer, b.corrupted_answer],
                         "top": [[list(t[:2]) for t in a.top(4)], [list(t[:2]) for t in b.top(4)]]}

    def steering(model):
        vector = model.steering_vector(POSITIVE, NEGATIVE, layer=14)
        plain = model.generate(STEER_PROMPT, max_tokens=12)
        steered = model.generate(STEER_PROMPT, max_tokens=12, interventions=vector.interventions(scale=1.5))
        return np.array(vector.vector), plain, steered

    a, b, seconds = both(steering)
    results["steering"] = {"value": relative(b[0], a[0]), "seconds": seconds, "plain_equal": a[1].tokens == b[1].tokens,
                           "steered_equal": a[2].tokens == b[2].tokens, "texts": [a[2].text, b[2].text],
                           "steering_changes": a[1].tokens != a[2].tokens}

    a, b, seconds = both(lambda m: m.head_scores("induction", error_measure="stripe", n_sequences=4))
    results["induction_heads"] = {"value": relative(b.scores, a.scores), "seconds": seconds,
                                  "top": [[list(t[:2]) for t in a.top(5)], [list(t[:2]) for t in b.top(5)]]}
    top = [(layer, head) for layer, head, _ in a.top(5)]
    a, b, seconds = both(lambda m: m.induction_loss(top, n_sequences=4, seed=1))
    results["induction_loss"] = {"value": relative([b.first_half, b.second_half], [a.first_half, a.second_half]),
                                 "seconds": seconds}
    with open(f"{out}/real-rank{group.rank()}.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"rank {group.rank()}: done", flush=True)


if __name__ == "__main__":
    main()
