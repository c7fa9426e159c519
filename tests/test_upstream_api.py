"""Code written for upstream mlxterp (github.com/coairesearch/mlxterp) runs here unchanged where
its API is sound, and says what to use instead where it is not (docs/guide/migrating.md, "Coming
from upstream mlxterp"). Each test is upstream-style user code; the arrays it gets are checked
against mlxterp's own names for the same tensors."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import SimpleModel, bitwise_equal, tiny_family

import mlxterp
from mlxterp import InterpretableModel, SchemaError, TraceError, UnknownNameError
from mlxterp import interventions as iv

TEXT = "The capital of France is"


def close(a, b, tol=1e-5) -> bool:
    a, b = mx.array(a).astype(mx.float32), mx.array(b).astype(mx.float32)
    return a.shape == b.shape and bool(mx.allclose(a, b, atol=tol, rtol=tol).item())


# -- 1. nnsight-style proxies --------------------------------------------------------------------


def test_proxies_save_the_arrays_of_the_standard_names(llama):
    model = llama
    with model.trace(TEXT) as trace:
        layer_1 = model.layers[1].output.save()
        attn_1 = model.layers[1].self_attn.output.save()
        mlp_1 = model.layers[1].mlp.output.save()
        attn_via_docs_name = model.layers[1].attn.output.save()  # upstream's docstring spells it attn
        q_proj = model.layers[2].self_attn.q_proj.output.save()
        logits = model.output.save()
    acts = trace.activations
    assert bitwise_equal(layer_1, acts["layers[1].output"])
    assert bitwise_equal(attn_1, acts["layers[1].attn"])
    assert bitwise_equal(mlp_1, acts["layers[1].mlp"])
    assert bitwise_equal(attn_via_docs_name, acts["layers[1].attn"])
    assert bitwise_equal(q_proj, acts["model.model.layers.2.self_attn.q_proj"])
    assert bitwise_equal(logits, trace.output)
    assert list(trace.saved_values) == [
        "layers.1.output", "layers.1.self_attn.output", "layers.1.mlp.output", "layers.1.attn.output",
        "layers.2.self_attn.q_proj.output", "__model_output__",
    ]
    assert trace.get("layers.1.output") is layer_1


def test_the_layer_list_outside_a_trace_is_the_model_s_blocks_and_changes_nothing(llama):
    model = llama
    blocks = model.model.model.layers
    assert len(model.layers) == len(blocks) == 4
    assert [layer.self_attn.n_heads for layer in model.layers] == [4] * 4  # attributes reach the module
    x = mx.random.normal((1, 3, 64))
    assert bitwise_equal(model.layers[-1](x, None), blocks[3](x, None))  # and so do calls
    assert type(blocks[0]).__name__ == "TransformerBlock" and isinstance(model.model.layers, list)
    with pytest.raises(TraceError, match=r"inside a `with model.trace\(...\)` block"):
        model.layers[0].output
    with model.trace(TEXT):
        with pytest.raises(TraceError, match=r"interventions=\{'model.model.layers.1': iv.replace_with"):
            model.layers[1].output = mx.zeros((1, 5, 64))
    assert all(type(m).__module__.startswith("mlx") for m in model.model.modules())  # no probe left


def test_proxies_on_a_custom_model():
    """upstream's QUICKSTART: a model of Linear layers, no tokenizer, no family."""

    class SimpleTransformer(nn.Module):
        def __init__(self, hidden_dim=64):
            super().__init__()
            self.layers = [nn.Linear(hidden_dim, hidden_dim) for _ in range(4)]

        def __call__(self, x):
            for layer in self.layers:
                x = nn.relu(layer(x))
            return x

    model = InterpretableModel(SimpleTransformer())
    input_data = mx.random.normal((1, 10, 64))
    with model.trace(input_data) as trace:
        layer_0 = model.layers[0].output.save()
        layer_2 = model.layers[2].output.save()
    assert layer_0.shape == layer_2.shape == (1, 10, 64)
    assert bitwise_equal(layer_2, trace.activations["model.layers.2"])


# -- 2. a model name or path --------------------------------------------------------------------


def test_a_string_loads_the_model_as_mlxterp_load_does(smollm):
    model = InterpretableModel(str(mlxterp.default_model_path()))
    assert repr(model) == repr(smollm)
    assert model.load_report["format"] == smollm.load_report["format"]
    assert bitwise_equal(model(TEXT), smollm(TEXT))
    with pytest.raises(mlxterp.plugin.LoadError, match="no such file or directory"):
        InterpretableModel("/no/such/model-4bit")


# -- 3. keys without the leading model. ----------------------------------------------------------


def test_module_paths_without_the_model_prefix(llama):
    model = llama
    short = {"layers.1.self_attn": iv.scale(0.5), "layers.3.mlp.gate_proj": iv.zero_out}
    full = {"model.model.layers.1.self_attn": iv.scale(0.5), "model.model.layers.3.mlp.gate_proj": iv.zero_out}
    with model.trace(TEXT, interventions=short) as trace:
        output = model.output.save()
    assert bitwise_equal(output, model.run(TEXT, interventions=full).output)
    assert not bitwise_equal(output, model.run(TEXT).output)
    tr = model.run(TEXT, capture=["layers.2.self_attn.q_proj", "layers.1"])
    assert bitwise_equal(tr.activations["layers.2.self_attn.q_proj"], tr.activations["model.model.layers.2.self_attn.q_proj"])
    # layers.1 is the standard name (the residual stream), the block's output in every family
    assert bitwise_equal(tr.activations["layers.1"], tr.activations["model.model.layers.1"])
    # calls, inputs and patterns are written as in raw names
    raw = ["model.model.layers.2.self_attn.rope#1", "model.model.layers.2.mlp.down_proj:input"]
    tr = model.run(TEXT, capture=["layers.2.self_attn.rope#1", "layers.2.mlp.down_proj:input", "layers.*.self_attn.q_proj"])
    assert sorted(tr.activations) == sorted(raw + [f"model.model.layers.{i}.self_attn.q_proj" for i in range(4)])
    assert bitwise_equal(tr.activations["layers.2.self_attn.rope#1"], tr.activations[raw[0]])


def test_layer_keys_on_a_custom_model(simple):
    x = mx.random.normal((2, 64))
    acts = simple.run(x, interventions={"layers.1": iv.zero_out}, capture=["layers.2"]).activations
    assert bitwise_equal(acts["layers.2"], simple.model.layers[2](mx.zeros((2, 64))))
    assert bitwise_equal(acts["model.layers.2"], acts["layers.2"])


def test_a_key_that_could_mean_two_things_is_an_error_listing_both():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(8, 8)]

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(8, 8)]
            self.model = Inner()

        def __call__(self, x):
            return self.model.layers[0](self.layers[0](x))

    model = InterpretableModel(Twice())
    with pytest.raises(UnknownNameError, match=r"'layers.0' could mean model.layers.0 or model.model.layers.0"):
        model.run(mx.ones((1, 8)), interventions={"layers.0": iv.zero_out})
    # a standard name the family lacks, where a module has that path: Qwen3-MoE's router is mlp.gate
    moe = InterpretableModel(tiny_family("qwen3_moe"))
    with pytest.raises(UnknownNameError, match=r"'layers.0.mlp.gate' could mean the standard name .* or the module model.model.layers.0.mlp.gate"):
        moe.run([[1, 2, 3]], capture=["layers.0.mlp.gate"])
    assert "model.model.layers.0.mlp.gate" in moe.run([[1, 2, 3]], capture=["model.model.layers.0.mlp.gate"]).activations


def test_a_standard_name_stays_the_standard_name(llama):
    """Gemma 2's ``layers.0.mlp`` is the MLP's output after its post-norm (what is added to the
    residual stream), not the ``mlp`` module's: the standard grammar wins (docs/guide/names.md)."""
    gemma = InterpretableModel(tiny_family("gemma2"))
    acts = gemma.run([[1, 2, 3]]).activations
    assert bitwise_equal(acts["layers.0.mlp"], acts["model.model.layers.0.post_feedforward_layernorm"])
    assert not bitwise_equal(acts["layers.0.mlp"], acts["model.model.layers.0.mlp"])
    with pytest.raises(UnknownNameError, match="Did you mean"):
        llama.run(TEXT, capture=["layers.0.self_atn"])


# -- 4. top-level names --------------------------------------------------------------------------


def test_top_level_names():
    from mlxterp import (  # noqa: F401
        ActivationCache,
        InterventionComposer,
        __version__,
        add_vector,
        batch_get_activations,
        clamp,
        collect_activations,
        get_activations,
        noise,
        replace_with,
        scale,
        zero_out,
    )
    from mlxterp.visualization import (  # noqa: F401
        attention_heatmap,
        detect_head_types,
        detect_induction_heads,
        first_token_score,
        get_attention_patterns,
        induction_score,
        previous_token_score,
    )

    assert zero_out is iv.zero_out and isinstance(__version__, str)
    combined = InterventionComposer().add(scale(0.5)).add(add_vector(mx.ones(4))).build()
    assert bitwise_equal(combined(mx.ones((1, 2, 4))), mx.full((1, 2, 4), 1.5))


def test_get_activations_take_each_prompt_s_own_last_token(llama):
    from mlxterp import batch_get_activations, get_activations

    prompts = ["Hello", TEXT]  # different lengths: the batch is right-padded
    acts = get_activations(llama, prompts, layers=[1, 3], positions=-1)
    assert sorted(acts) == ["layer_1", "layer_3"] and acts["layer_1"].shape == (2, 64)
    for row, prompt in enumerate(prompts):
        alone = llama.run(prompt).activations["layers[3].output"][0, -1]
        assert close(acts["layer_3"][row], alone, 1e-4)
    several = get_activations(llama, prompts, layers=[1], positions=[0, -1])
    assert several["layer_1"].shape == (2, 2, 64)
    batched = batch_get_activations(llama, prompts, layers=[1, 3], batch_size=1)
    assert close(batched["layer_3"], acts["layer_3"], 1e-4)


def test_collect_activations(llama):
    from mlxterp import ActivationCache, collect_activations

    cache = collect_activations(llama, TEXT, layers=["layers.1", "layers.1.self_attn"])
    assert isinstance(cache, ActivationCache)
    tr = llama.run(TEXT)
    assert bitwise_equal(cache.get("layers.1"), tr.activations["model.model.layers.1"])
    assert "layers.1.self_attn" in cache and cache.get("layers.2.mlp") is None


def test_visualization_over_mlxterp_s_own_patterns_and_scores(llama):
    from mlxterp.visualization import (
        attention_heatmap,
        detect_head_types,
        detect_induction_heads,
        first_token_score,
        get_attention_patterns,
        induction_score,
        previous_token_score,
    )

    with llama.trace(TEXT) as trace:
        pass
    patterns = get_attention_patterns(trace, layers=[0, 2])
    ours = llama.attention_patterns(TEXT, [0, 2])
    assert sorted(patterns) == [0, 2] and patterns[2].shape == (1, 4, len(llama.encode(TEXT)), len(llama.encode(TEXT)))
    assert np.allclose(patterns[2][0], np.array(ours.patterns[1]), atol=1e-6)
    head = patterns[2][0, 1]
    scores = {kind: llama.head_scores(kind, TEXT, layers=[2])[2, 1] for kind in ("previous_token", "first_token")}
    assert previous_token_score(head) == pytest.approx(scores["previous_token"], rel=1e-5)
    assert first_token_score(head) == pytest.approx(scores["first_token"], rel=1e-5)
    repeated = np.tile(np.eye(3), (2, 2))[:, :6]
    assert 0 <= induction_score(repeated, 3) <= 1
    figure = attention_heatmap(patterns[2], llama.to_str_tokens(TEXT), head_idx=1, title="L2H1")
    assert figure.axes
    found = detect_induction_heads(llama, n_random_tokens=10, threshold=-1.0, layers=[1, 2])
    assert len(found) == 8 and [h.score for h in found] == sorted((h.score for h in found), reverse=True)
    assert found[0].head_type == "induction" and (found[0].layer, found[0].head) in {(l, h) for l in (1, 2) for h in range(4)}
    types = detect_head_types(llama, TEXT, threshold=0.0, layers=[1])
    assert {"previous_token", "first_token", "current_token", "unknown"} <= set(types)
    assert len(types["first_token"]) == 4


# -- 5. tokenizer and trace helpers --------------------------------------------------------------


def test_encode_batch_and_trace_helpers(llama):
    assert llama.encode_batch(["Hello", "World"]) == [llama.encode("Hello"), llama.encode("World")]
    with llama.trace(TEXT) as trace:
        llama.layers[3].output.save()
    assert bitwise_equal(trace.get("layers.3.output"), trace.activations["layers[3].output"])
    assert bitwise_equal(trace.get_activation("model.model.layers.3.self_attn"), trace.activations["layers[3].attn"])
    assert trace.get("layers.3.self_attn.output") is None and trace.get_activation("no.such.site") is None


# -- 6. arguments ---------------------------------------------------------------------------------


def test_logit_lens_in_upstream_s_argument_order(llama):
    results = llama.logit_lens(TEXT, 3, [0, 2], position=-1)
    full = llama.logit_lens(TEXT, layers=[0, 2], top_k=3)
    assert results.layers == [0, 2] and len(results[0]) == 1 and len(results[0][0]) == 3
    same_predictions(results[2][-1], full[2][-1])
    same_predictions(llama.logit_lens(TEXT, top_k=2, layers=[1], position=1)[1][0], llama.logit_lens(TEXT, top_k=2, layers=[1])[1][1])
    assert llama.logit_lens(TEXT, [1]).layers == [1]  # a list where top_k stands: layers (mlxterp's order)


def same_predictions(a, b):
    """The same tokens in the same order, probabilities equal to float32 rounding (another
    number of positions in the batched projection rounds differently)."""
    assert [(t, s) for t, _, s in a] == [(t, s) for t, _, s in b]
    assert [p for _, p, _ in a] == pytest.approx([p for _, p, _ in b], rel=1e-5)


def test_get_token_predictions_with_scores(llama):
    with llama.trace(TEXT) as trace:
        layer_2 = trace.activations["model.model.layers.2"]
    hidden = layer_2[0, -1, :]
    predictions = llama.get_token_predictions(hidden, top_k=3, return_scores=True)
    logits = llama.architecture.unembed(llama.architecture.final_norm(hidden))
    assert [t for t, _ in predictions] == llama.get_token_predictions(hidden, top_k=3)
    assert [s for _, s in predictions] == pytest.approx([logits[t].item() for t, _ in predictions], rel=1e-5)


def upstream_distance(metric: str, a: mx.array, b: mx.array) -> float:
    """upstream mlxterp's activation_patching distances, on logits at the last position."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    if metric == "l2":
        return math.sqrt(((a - b) ** 2).sum().item())
    if metric == "mse":
        return ((a - b) ** 2).mean().item()
    return 1 - ((a / mx.linalg.norm(a)) * (b / mx.linalg.norm(b))).sum().item()


@pytest.mark.parametrize("metric", ["l2", "cosine", "mse"])
def test_activation_patching_distance_metrics(llama, metric):
    clean, corrupted = [5, 9, 13, 2, 7], [5, 9, 40, 2, 7]
    result = llama.activation_patching(clean, corrupted, component="mlp", layers=[0, 2], metric=metric, progress=False)
    clean_run = llama.run([clean])
    clean_logits = clean_run.output[0, -1]
    baseline = upstream_distance(metric, llama.run([corrupted]).output[0, -1], clean_logits)
    for layer in (0, 2):
        source = clean_run.activations[f"layers[{layer}].mlp"]
        patched = llama.run([corrupted], interventions={f"layers.{layer}.mlp": iv.replace_with(source)}).output[0, -1]
        expected = (baseline - upstream_distance(metric, patched, clean_logits)) / baseline * 100
        assert result[layer] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_activation_patching_of_a_raw_sub_module(llama):
    clean, corrupted = [5, 9, 13, 2, 7], [5, 9, 40, 2, 7]
    result = llama.activation_patching(clean, corrupted, component="mlp.gate_proj", layers=[1], progress=False)
    source = llama.run([clean]).activations["model.model.layers.1.mlp.gate_proj"]
    patched = llama.run([corrupted], interventions={"model.model.layers.1.mlp.gate_proj": iv.replace_with(source)}).output
    metric = lambda logits: logits[0, -1, result_answer(llama, clean)] - logits[0, -1, result_answer(llama, corrupted)]  # noqa: E731
    low, high = metric(llama.run([corrupted]).output).item(), metric(llama.run([clean]).output).item()
    assert result[1] == pytest.approx((metric(patched).item() - low) / (high - low) * 100, rel=1e-3, abs=1e-3)


def result_answer(model, ids) -> int:
    return mx.argmax(model.run([ids]).output[0, -1]).item()


def test_clamp_and_replace_with_in_upstream_s_words():
    x = mx.linspace(-1, 1, 20).reshape(1, 5, 4)
    assert bitwise_equal(iv.clamp(min_val=-0.5, max_val=0.25)(x), iv.clamp(-0.5, 0.25)(x))
    value = mx.full((1, 3, 4), 7.0)
    end = iv.replace_with(value, align="end")(x)
    assert bitwise_equal(end[:, 2:], value) and bitwise_equal(end[:, :2], x[:, :2])
    start = iv.replace_with(value, align="start")(x)
    assert bitwise_equal(start[:, :3], value) and bitwise_equal(start[:, 3:], x[:, 3:])
    longer = iv.replace_with(mx.full((1, 8, 4), 2.0), align="end")(x)
    assert bitwise_equal(longer, mx.full((1, 5, 4), 2.0))
    for align in (None, "strict"):
        with pytest.raises(mlxterp.InterventionError, match="align='end'"):
            iv.replace_with(value, align=align)(x)


# -- 7. models no plugin recognises --------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dims: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dims, dims, bias=False) for _ in range(4))

    def __call__(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(T)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, dims: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.RMSNorm(dims), nn.RMSNorm(dims)
        self.self_attn = Attention(dims, n_heads)
        self.mlp = nn.Sequential(nn.Linear(dims, 2 * dims), nn.GELU(), nn.Linear(2 * dims, dims))

    def __call__(self, x):
        x = x + self.self_attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class HandWritten(nn.Module):
    """A language model written by hand: no mlx-lm class, no model_type."""

    def __init__(self, names=("embed_tokens", "layers", "norm", "lm_head"), vocab=64, dims=32):
        super().__init__()
        self.part_names = " ".join(names)  # a str: kept out of the parameter tree
        embed, layers, norm, head = names
        setattr(self, embed, nn.Embedding(vocab, dims))
        setattr(self, layers, [Block(dims, 4) for _ in range(2)])
        setattr(self, norm, nn.RMSNorm(dims))
        setattr(self, head, nn.Linear(dims, vocab, bias=False))

    def __call__(self, ids):
        embed, layers, norm, head = (getattr(self, n) for n in self.part_names.split())
        x = embed(ids)
        for block in layers:
            x = block(x)
        return head(norm(x))


def hand_written(**kwargs) -> HandWritten:
    mx.random.seed(4)
    module = HandWritten(**kwargs)
    mx.eval(module.parameters())
    return module


def test_analyses_on_a_model_whose_names_say_where_things_are():
    model = InterpretableModel(hand_written())
    assert model.architecture is not None and model.architecture.n_layers == 2
    lens = model.logit_lens([1, 5, 9, 13], top_k=1)
    logits = model.run([[1, 5, 9, 13]]).output[0]
    assert [row[0][0] for row in lens[1]] == mx.argmax(logits, axis=-1).tolist()
    with model.trace([[1, 5, 9, 13]]) as trace:
        mlp = model.layers[1].mlp.output.save()
    assert bitwise_equal(mlp, trace.activations["layers[1].mlp"])


def test_upstream_s_keywords_say_where_things_are():
    module = hand_written(names=("my_embed", "blocks", "final_ln", "out_proj"))
    assert InterpretableModel(module).architecture is None
    model = InterpretableModel(module, layer_attr="blocks", embedding_path="my_embed", norm_path="final_ln", lm_head_path="out_proj")
    lens = model.logit_lens([1, 5, 9, 13], top_k=1, layers=[1])
    logits = model.run([[1, 5, 9, 13]]).output[0]
    assert [row[0][0] for row in lens[1]] == mx.argmax(logits, axis=-1).tolist()
    assert len(model.layers) == 2
    with pytest.raises(SchemaError, match="unembed"):  # keywords are validated as every schema is
        InterpretableModel(module, layer_attr="blocks", embedding_path="my_embed", norm_path="blocks.0.ln1", lm_head_path="out_proj")


# -- 8. messages ----------------------------------------------------------------------------------


def test_an_analysis_on_a_model_without_an_architecture_says_so(simple):
    module = hand_written(names=("my_embed", "blocks", "final_ln", "out_proj"))
    model = InterpretableModel(module)
    with pytest.raises(UnknownNameError) as error:
        model.logit_lens([1, 2, 3])
    message = str(error.value)
    assert "is a standard name" not in message
    assert "the logit lens needs" in message and "norm_path=" in message and "schema=" in message
    with pytest.raises(UnknownNameError, match=r"'layers\[0\].attn.q' is a standard name, but no plugin recognises"):
        simple.run(mx.ones((1, 64)), capture=["layers[0].attn.q"])


def test_upstream_file_formats_name_mlxterp_s_own(tmp_path):
    from mlxterp import TunedLens, load_sae

    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "config.json").write_text("{}")
    mx.save_safetensors(str(tmp_path / "sae" / "weights.safetensors"), {"W_enc": mx.zeros((2, 2))})
    with pytest.raises(Exception, match=r"upstream mlxterp's SAE folder.*migrating"):
        load_sae(tmp_path / "sae")
    (tmp_path / "tuned_lens_llama.json").write_text("{}")
    mx.savez(str(tmp_path / "tuned_lens_llama.npz"), w=mx.zeros(2))
    with pytest.raises(Exception, match=r"upstream mlxterp's tuned-lens files.*train_tuned_lens.*migrating"):
        TunedLens.load(tmp_path / "tuned_lens_llama")
