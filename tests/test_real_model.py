"""The default real model: SmolLM2-135M-Instruct, 4-bit GGUF, as mlxterp.load() brings it in."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import bitwise_equal

import mlxterp
from mlxterp_core.invariants import check_all, relative_error

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
def smollm():
    return mlxterp.load()


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


def test_quantized_model_is_recognised(smollm_quantized):
    assert smollm_quantized.architecture.family == "llama"
    assert "quantized as stored" in smollm_quantized.load_report["weights"]
    logits = smollm_quantized.run(PROMPT, capture=["layers[3].attn.q", "logits"]).activations["logits"]
    assert smollm_quantized.token_to_str(mx.argmax(logits[0, -1]).item()) == " Paris"
