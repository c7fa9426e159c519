"""The default real model: SmolLM2-135M-Instruct, 4-bit GGUF, as mlxterp.load() brings it in."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import bitwise_equal, is_top_k

import mlxterp
from mlxterp_core.invariants import check_all, check_snapshots, relative_error

PROMPT = "The capital of France is"
# A fixed English paragraph for perplexity (plain prose, no names the model must know).
PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "settlement on an island in the river, and over the centuries it grew into one of the "
    "largest and most important cities in Europe. Today it is known for its museums, its "
    "architecture, and its food, and millions of people visit it every year."
)
# Measured 5.68 (dequantized) and 5.67 (quantized) on this paragraph. The bound leaves room for
# float differences between backends and BLAS libraries, and still fails a model that is subtly
# broken: keeping llama.cpp's q/k row order with the rotate-half RoPE gives 35.7.
PERPLEXITY_BOUND = 8.0
# Quantized and dequantized weights are the same numbers; only the matmul arithmetic differs.
QUANTIZED_LOGIT_TOLERANCE = 1e-2  # relative L2 error of the logits; measured 2.7e-3


@pytest.fixture(scope="session")
def smollm_quantized():
    return mlxterp.load(quantized=True)


def perplexity(model, text: str) -> float:
    ids = mx.array([model.encode(text)])
    logits = model.model(ids)
    loss = nn.losses.cross_entropy(logits[0, :-1].astype(mx.float32), ids[0, 1:], reduction="mean")
    return mx.exp(loss).item()


def test_tokenizer_matches_the_reference_ids(smollm):
    assert smollm.encode(PROMPT) == [504, 3575, 282, 4649, 314]
    assert smollm.vocab_size == 49152


@pytest.mark.parametrize("text", ["héllo wörld ✓", "日本語のテキスト", "emoji 🙂👍🏽", "tabs\tand\nnewlines  ", "digits 12345 and $9.99"])
def test_tokenizer_round_trips_unicode(smollm, text):
    assert smollm.decode(smollm.encode(text)) == text


def test_next_token_is_paris(smollm):
    logits = smollm.run(PROMPT).output
    assert smollm.token_to_str(mx.argmax(logits[0, -1]).item()) == " Paris"


def test_greedy_chat_answer_is_fluent(smollm):
    from mlx_lm import generate

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = generate(smollm.model, smollm.tokenizer, prompt, max_tokens=24)
    words = answer.replace(".", " ").replace(",", " ").split()
    assert "Paris" in words, answer
    assert len(words) >= 3 and all(w.isalpha() for w in words), answer


def test_perplexity_is_low(smollm, smollm_quantized):
    assert perplexity(smollm, PARAGRAPH) < PERPLEXITY_BOUND
    assert perplexity(smollm_quantized, PARAGRAPH) < PERPLEXITY_BOUND


def test_probes_idle_leave_logits_bitwise_identical(smollm):
    ids = mx.array([smollm.encode(PARAGRAPH)])
    plain = smollm.model(ids)
    assert bitwise_equal(smollm.run(ids).output, plain)
    smollm.run(ids, capture=["layers[*].attn.pattern"])  # explicit attention, then restored
    assert bitwise_equal(smollm.model(ids), plain)


def test_quantized_and_dequantized_agree(smollm, smollm_quantized):
    assert isinstance(smollm_quantized.model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(smollm.model.model.layers[0].mlp.up_proj, nn.Linear)
    assert smollm_quantized.model.model.embed_tokens.bits == 8
    assert smollm_quantized.model.model.layers[0].mlp.up_proj.bits == 4
    ids = mx.array([smollm.encode(PARAGRAPH)])
    dense, quantized = smollm.model(ids), smollm_quantized.model(ids)
    assert relative_error(quantized, dense) < QUANTIZED_LOGIT_TOLERANCE
    agree = mx.mean(mx.argmax(dense, -1) == mx.argmax(quantized, -1)).item()
    assert agree > 0.95


def test_llama_cpp_row_order_is_undone_correctly():
    """Undoing llama.cpp's q/k permutation with the rotate-half RoPE must be the same model as
    keeping its rows with the interleaved RoPE it was permuted for."""
    from mlxterp_loaders import gguf

    undone, tokenizer, _ = gguf.build(mlxterp.default_model_path())
    kept, _, _ = gguf.build(mlxterp.default_model_path(), rope_layout="interleaved")
    ids = mx.array([tokenizer.encode(PARAGRAPH)])
    assert relative_error(undone(ids).astype(mx.float32), kept(ids).astype(mx.float32)) < 1e-4


def test_every_invariant_holds_on_the_real_model(smollm):
    ids = smollm.encode(PROMPT)
    failed = [c for c in check_all(smollm, ids, layers=[0, 1, 14, 28, 29], thorough=False) if c.passed is False]
    assert not failed, failed


@pytest.mark.parametrize("which", ["dequantized", "quantized"])
def test_every_recorded_site_is_a_snapshot_on_the_real_model(request, which):
    model = request.getfixturevalue("smollm" if which == "dequantized" else "smollm_quantized")
    check = check_snapshots(model, model.encode(PROMPT))
    assert check.passed, check.detail


def test_quantized_model_is_recognised(smollm_quantized):
    assert smollm_quantized.architecture.family == "llama"
    assert "quantized as stored" in smollm_quantized.load_report["weights"]
    logits = smollm_quantized.run(PROMPT, capture=["layers[3].attn.q", "logits"]).activations["logits"]
    assert smollm_quantized.token_to_str(mx.argmax(logits[0, -1]).item()) == " Paris"


# -- the analyses on the real model --------------------------------------------------------------

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def test_logit_lens_last_layer_is_the_model_and_paris_emerges_late(smollm):
    result = smollm.logit_lens(PROMPT)
    logits = smollm.run(PROMPT).output[0].astype(mx.float32)
    for position in range(len(result.tokens)):
        assert is_top_k([t for t, _, _ in result[29][position]], logits[position])
    top = result.top_tokens()
    assert top[29] == " Paris"
    assert all(top[layer] != " Paris" for layer in range(20))  # the answer is a late-layer event


def test_residual_patching_moves_from_the_subject_to_the_last_position(smollm):
    """Observed: patching the residual stream recovers the clean answer at the subject's tokens
    (' Col', 'osse', 'um' in the corrupted prompt) up to layer 22, and at the last token (' of')
    from layer 23 on: the fact is read from the subject position and moved to the end."""
    result = smollm.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all")
    assert (result.clean_answer, result.corrupted_answer) == (" Paris", " Rome")
    subject, last = {1, 2, 3}, len(result.labels) - 1
    best = {layer: max(range(len(result.labels)), key=lambda p: result[layer][p]) for layer in result.layers}
    assert all(best[layer] in subject for layer in range(0, 21))
    assert all(best[layer] == last for layer in range(24, 30))
    assert result[29][last] == pytest.approx(100.0, abs=1e-3)  # the last layer's output is the answer
    assert max(result[29][:last]) == pytest.approx(0.0, abs=1e-3)


def test_steered_generation_on_the_real_model(smollm):
    positive = ["I love this. It is wonderful and amazing.", "This is great, I am so happy."]
    negative = ["I hate this. It is terrible and awful.", "This is bad, I am so sad."]
    vector = smollm.steering_vector(positive, negative, layer=14)
    assert min(vector.positive_projections) > max(vector.negative_projections)
    prompt = "I went to see the new movie yesterday. I thought it was"
    edits = vector.interventions(scale=-1.5)
    plain = smollm.generate(prompt, max_tokens=6)
    steered = smollm.generate(prompt, max_tokens=6, interventions=edits)
    assert steered.tokens != plain.tokens
    sequence = smollm.encode(prompt)
    for token in steered.tokens:
        logits = smollm.run([sequence], interventions=edits).output
        assert mx.argmax(logits[0, -1]).item() == token
        sequence.append(token)


ORIGINAL_README_LENS = '''
# Get token predictions from any layer
with model.trace("The capital of France is") as trace:
    layer_6 = trace.activations["model.model.layers.6"]

# Decode last token's hidden state
predictions = model.get_token_predictions(layer_6[0, -1, :], top_k=5)
for token_id in predictions:
    print(model.token_to_str(token_id))

# Logit lens: see what each layer predicts at each position
text = "The capital of France is"
results = model.logit_lens(text, layers=[0, 5, 10, 15])

# Show how predictions for the LAST position evolve
for layer_idx in [0, 5, 10, 15]:
    last_pos_pred = results[layer_idx][-1][0][2]  # Top token at last position
    print(f"Layer {layer_idx}: '{last_pos_pred}'")
'''

ORIGINAL_README_PATCHING = '''
# Find which layers are critical for factual recall
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    component="mlp",
    plot=True
)

# Analyze results
sorted_results = sorted(results.items(), key=lambda x: x[1], reverse=True)
print("\\nMost important layers:")
for layer_idx, recovery in sorted_results[:3]:
    print(f"  Layer {layer_idx}: {recovery:.1f}% recovery")

# Test different components
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    component="self_attn",  # Test attention instead of MLP
    layers=[0, 5, 10, 15]
)
'''


def test_original_readme_analysis_examples_run_as_written(smollm):
    namespace = {"model": smollm}
    exec(ORIGINAL_README_LENS, namespace)
    assert len(namespace["predictions"]) == 5 and all(isinstance(t, int) for t in namespace["predictions"])
    assert set(namespace["results"].keys()) == {0, 5, 10, 15}
    exec(ORIGINAL_README_PATCHING, namespace)
    assert len(namespace["sorted_results"]) == 30
    assert list(namespace["results"].keys()) == [0, 5, 10, 15]
    assert all(isinstance(v, float) for v in namespace["results"].values())
