"""Rows of the analyses on the default model: ``W3`` (the logit lens), ``W4`` (an activation
patching sweep against a loop of one trace per cell), ``W5`` (steered generation against
``mlx_lm.stream_generate``), ``attribution`` (attribution patching against the sweeps that
measure the same cells) and ``probe`` (the linear-probe sweep of docs/guide/probes.md against
the forward passes it needs)."""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mlxterp.plugin import interventions as iv
from mlxterp.plugin import load, on_cpu
from mlxterp_analyses import PATCHING_MEMORY_BUDGET

from .harness import Row, at_most, default_model, median_times, milliseconds, torch_llama

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
STEER_PROMPT = "I went to see the new movie yesterday. I thought it was"


def hf_logit_lens(peer, tokens, top_k: int = 5):
    """The logit lens by hand on HF transformers: every layer's hidden state through the final
    norm and the unembedding, softmax, top-k."""
    import torch

    with torch.inference_mode():
        hidden = torch.stack(peer(tokens, output_hidden_states=True).hidden_states[1:])
        probs = torch.softmax(peer.lm_head(peer.model.norm(hidden)).float(), dim=-1)
        return torch.topk(probs, top_k, dim=-1)


def w3_logit_lens(repeats: int = 5) -> list[Row]:
    """The logit lens (every layer x position, top-5) against the plain forward of the same
    prompt. The prompt is CLEAN; HF transformers by hand on torch CPU beside it, where installed."""
    import numpy as np

    model = default_model()
    ids = mx.array([model.encode(CLEAN)])
    n_layers, length = len(model.model.layers), ids.shape[1]
    cases = {
        "plain": lambda: mx.eval(model.model(ids)),
        "lens": lambda: model.logit_lens(CLEAN, top_k=5),
    }
    peer = torch_llama(model.model) if on_cpu() else None
    if peer is not None:
        import torch

        torch.set_num_threads(2)
        tokens = torch.from_numpy(np.array(ids))
        cases["HF by hand"] = lambda: hf_logit_lens(peer, tokens)
    medians = median_times(cases, repeats)
    lens, plain = medians["lens"], medians["plain"]
    values = {"lens_s": lens, "plain_s": plain, "ratio": lens / plain}
    figure = f"{milliseconds(lens)} / plain {milliseconds(plain)}: {lens / plain:.2f}x"
    target, met = at_most(lens / plain, 2.0, " plain")
    if peer is not None:
        values["hf_by_hand_s"] = medians["HF by hand"]
        figure += f"; HF by hand {milliseconds(medians['HF by hand'])}"
        target += ", < HF by hand"
        met = met and lens < medians["HF by hand"]
    return [Row(f"W3 logit lens, {n_layers} layers x {length} positions, top-5", figure, target, met, values)]


def naive_patching(model, clean: str, corrupted: str, component: str = "resid") -> list[list[float]]:
    """Activation patching as a loop of one trace per cell (layer x position): recovery (%)."""
    sub = {"resid": "output", "mlp": "mlp", "attn": "attn"}[component]
    n_layers = model.architecture.n_layers
    names = [f"layers.{i}.{sub}" for i in range(n_layers)]
    clean_run = model.run([clean], capture=[*names, "logits"]).activations
    corrupted_logits = model.run([corrupted], capture=["logits"]).activations["logits"]
    good, bad = mx.argmax(clean_run["logits"][0, -1]).item(), mx.argmax(corrupted_logits[0, -1]).item()

    def metric(logits):
        return (logits[0, -1, good] - logits[0, -1, bad]).item()

    low, high = metric(corrupted_logits), metric(clean_run["logits"])
    length = len(model.encode(corrupted))
    recovery = []
    for name in names:
        row = []
        for position in range(length):
            edit = {name: iv.replace_with(clean_run[name]).at(positions=[position])}
            logits = model.run([corrupted], interventions=edit, capture=["logits"]).activations["logits"]
            row.append((metric(logits) - low) / (high - low) * 100)
        recovery.append(row)
    return recovery


def w4_patching(repeats: int = 5) -> list[Row]:
    """An activation patching sweep against the naive loop of one trace per cell. The "resid"
    sweep (layers x positions) of CLEAN vs CORRUPTED, in one run; every cell compared; peak
    memory against the budget."""
    budget = PATCHING_MEMORY_BUDGET
    model = default_model()

    def sweep():
        return model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", progress=False)

    result = sweep()  # warm-up, and the cells to compare
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    sweep()
    peak = mx.get_peak_memory() - active
    naive_rounds = max(1, repeats // 3)
    sweep_times, naive_times, naive = [], [], None
    for round_ in range(naive_rounds):  # the naive loop takes ~20x longer: fewer rounds of it
        for _ in range(max(1, repeats // naive_rounds)):
            start = time.perf_counter()
            sweep()
            sweep_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive = naive_patching(model, CLEAN, CORRUPTED)
        naive_times.append(time.perf_counter() - start)
    fast, slow = statistics.median(sweep_times), statistics.median(naive_times)
    gap = max(abs(result[i][p] - naive[i][p]) / 100 for i in range(len(naive)) for p in range(len(naive[i])))
    cells = len(naive) * len(naive[0])
    values = {"sweep_s": fast, "naive_s": slow, "ratio": slow / fast, "max_recovery_gap": gap,
              "peak_memory_bytes": peak, "memory_budget_bytes": budget}
    figure = f"{fast:.2f} s; naive loop {slow:.1f} s: {slow / fast:.1f}x; cells within {gap:.1e}"
    met = fast <= 1.5 and slow / fast >= 15 and gap <= 1e-4 and peak <= budget
    target = "<= 1.5 s, >= 15x naive, <= 1e-4"
    memory = f"peak {peak / 2**20:.0f} MiB above the model, budget {budget / 2**20:.0f} MiB"
    return [
        Row(f"W4 patching, resid {len(naive)} layers x {len(naive[0])} positions ({cells} cells)", figure, target, met, values),
        Row("W4 patching, peak memory", memory, "<= memory_budget", peak <= budget, values),
    ]


def w5_steering(repeats: int = 5) -> list[Row]:
    """Steered greedy generation of 20 tokens: tokens/s against mlx_lm.stream_generate."""
    from mlx_lm import stream_generate

    model = default_model()
    vector = model.steering_vector(["I loved it, wonderful."], ["I hated it, terrible."], layer=14)
    edits = vector.interventions(scale=1.5)
    counts: dict[str, int] = {}

    def plain():
        counts["plain"] = sum(1 for _ in stream_generate(model.model, model.tokenizer, STEER_PROMPT, max_tokens=20))

    def steered():
        counts["steered"] = len(model.generate(STEER_PROMPT, max_tokens=20, interventions=edits).tokens)

    medians = median_times({"mlx_lm.stream_generate": plain, "steered": steered}, repeats)
    ours = counts["steered"] / medians["steered"]
    theirs = counts["plain"] / medians["mlx_lm.stream_generate"]
    values = {"steered_tokens_per_s": ours, "stream_generate_tokens_per_s": theirs, "ratio": ours / theirs}
    figure = f"{ours:.1f} tok/s; stream_generate {theirs:.1f} tok/s: {ours / theirs:.2f}x"
    return [Row("W5 steered greedy generation, 20 tokens", figure, ">= 0.95x stream_generate", ours / theirs >= 0.95, values)]


def attribution_speed(repeats: int = 3) -> dict[str, float]:
    """Seconds: attribution patching of every component vs the activation patching sweeps."""
    model = load(validate=False)

    def sweeps():
        for component in ("resid", "attn", "mlp"):
            model.activation_patching(CLEAN, CORRUPTED, component=component, positions="all")
        model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True)

    cases = {
        "attribution patching": lambda: model.attribution_patching(CLEAN, CORRUPTED),
        "activation patching": sweeps,
    }
    return median_times(cases, repeats)


def attribution_rows(repeats: int = 3) -> list[Row]:
    """Attribution patching of every component against the activation patching sweeps."""
    speeds = attribution_speed(max(1, min(repeats, 3)))
    ratio = speeds["activation patching"] / speeds["attribution patching"]
    figure = (f"{speeds['attribution patching']:.2f} s vs activation patching "
              f"{speeds['activation patching']:.2f} s: {ratio:.0f}x faster")
    return [Row("attribution patching, 1,170 cells", figure, "faster", ratio > 1, speeds)]


def probe_example() -> tuple[list[str], list[int], list[int]]:
    """The sentiment prompts of docs/guide/probes.md: texts, labels and groups."""
    adjectives = [("wonderful", "terrible"), ("delightful", "awful"), ("excellent", "horrible"),
                  ("lovely", "dreadful"), ("brilliant", "boring"), ("superb", "miserable")]
    templates = ["The movie we watched last night was {}.", "I thought the food there was {}.",
                 "Honestly, the concert yesterday was {}."]
    texts, labels, groups = [], [], []
    for t, template in enumerate(templates):
        for k, (good, bad) in enumerate(adjectives):
            texts += [template.format(good), template.format(bad)]
            labels += [1, 0]
            groups += [10 * t + k] * 2
    return texts, labels, groups


def probe_rows(repeats: int = 3) -> list[Row]:
    """``model.probe`` on the docs' 36 prompts (31 sites: the embeddings and every layer's
    output) against the forward passes it needs (``probes.collect`` alone)."""
    from mlxterp_probes import collect, probe_sites

    model = default_model()
    texts, labels, groups = probe_example()
    sites = probe_sites(model)
    cases = {
        "forward passes": lambda: mx.eval(collect(model, texts, sites, progress=False)),
        "model.probe": lambda: model.probe(texts, labels, groups=groups, progress=False),
    }
    medians = median_times(cases, max(1, min(repeats, 3)))
    ratio = medians["model.probe"] / medians["forward passes"]
    figure = f"{medians['model.probe']:.2f} s; its forward passes {medians['forward passes']:.2f} s: {ratio:.2f}x"
    return [Row("probe sweep, 36 prompts x 31 sites", figure, "<= 1.5x the forward passes", ratio <= 1.5, medians)]
