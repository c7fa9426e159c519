"""Bad input is a clear MlxterpError, checked before the model runs: token ids, options, files."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import bitwise_equal

from mlxterp import InterpretableModel
from mlxterp_core.errors import InputError
from mlxterp_core.inputs import check_token_ids, embedding_vocab_size

VOCAB = 320  # tiny_llama's embedding rows (its tokenizer knows fewer)


# -- token ids ------------------------------------------------------------------------------


def test_vocabulary_comes_from_the_embedding(llama):
    assert llama.embedding_vocab_size == VOCAB
    assert llama.vocab_size != VOCAB  # the tokenizer's count differs: not the one to check


@pytest.mark.parametrize(
    "ids, value, row, position",
    [
        ([[1, 2, VOCAB]], VOCAB, 0, 2),
        ([[1, -5, 3]], -5, 0, 1),
        ([[1, 2, 10**7]], 10**7, 0, 2),
        ([[1, 2], [3, 2**40]], 2**40, 1, 1),
        ([1, 2, 3, 10**6], 10**6, 0, 3),
        (mx.array([[4, 5], [6, 7], [8, -1]]), -1, 2, 1),
        (np.array([9, VOCAB + 1]), VOCAB + 1, 0, 1),
    ],
)
def test_out_of_range_ids_name_id_row_position_and_vocabulary(llama, ids, value, row, position):
    expected = f"token id {value} at batch row {row}, position {position} .* {VOCAB} rows"
    with pytest.raises(InputError, match=expected):
        llama.run(ids)
    with pytest.raises(InputError, match=expected):
        llama(ids)


def test_ids_are_checked_before_the_model_runs(llama_module, wrapped_tokenizer):
    calls = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x, *args, **kwargs):
            calls.append(x)
            return self.inner(x, *args, **kwargs)

    model = InterpretableModel(Spy(llama_module), tokenizer=wrapped_tokenizer)
    assert model.embedding_vocab_size == VOCAB  # found in the module tree, no schema
    with pytest.raises(InputError):
        model.run([[1, VOCAB]])
    assert calls == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (mx.array([[0.5, 1.0]]), "must be integers"),
        ([[1.5, 2.0]], "must be integers"),
        ([True, False], "must be integers"),
        (mx.zeros((1, 2, 3), dtype=mx.int32), r"shape \(1, 2, 3\)"),
        (mx.zeros((0, 3), dtype=mx.int32), "empty input array"),
        ([[1, 2**70]], "fit in 64 bits"),
        ([[1], []], "row 1"),
        ("", "empty prompt"),
        ([], "empty input"),
        ({"ids": [1]}, "cannot run on dict"),
    ],
)
def test_malformed_inputs(llama, bad, message):
    with pytest.raises(InputError, match=message):
        llama.run(bad)


def test_entry_points_all_check_ids(llama):
    bad = [1, 2, VOCAB + 7]
    calls = {
        "generate": lambda: llama.generate(bad, max_tokens=2),
        "logit_lens": lambda: llama.logit_lens(bad),
        "activation_patching": lambda: llama.activation_patching(bad, [1, 2, 3]),
        "attribution_patching": lambda: llama.attribution_patching([1, 2, 3], bad),
        "steering_vector": lambda: llama.steering_vector([bad], [[1, 2, 3]], layer=0),
        "decompose_resid": lambda: llama.decompose_resid(bad),
        "direct_logit_attribution": lambda: llama.direct_logit_attribution(bad),
        "attention_patterns": lambda: llama.attention_patterns(bad, layer=0),
    }
    for name, call in calls.items():
        with pytest.raises(InputError, match=f"token id {VOCAB + 7} at batch row 0, position 2"):
            call()


def test_valid_ids_run_unchanged(llama):
    ids = mx.array([[0, 5, VOCAB - 1]])
    assert bitwise_equal(llama.run(ids).output, llama.model(ids))
    assert bitwise_equal(llama.run([[0, 5, VOCAB - 1]]).output, llama.model(ids))
    assert bitwise_equal(llama.run(np.array([0, 5, VOCAB - 1])).output, llama.model(ids))


def test_check_token_ids_is_one_reduction_for_any_shape():
    check_token_ids(mx.arange(10).reshape(2, 5), 10)
    check_token_ids(mx.array([[1, 2]]), None)  # no embedding: nothing to check
    with pytest.raises(InputError, match=r"token id 10 at index \(1, 0, 0\)"):
        check_token_ids(mx.array([[[1]], [[10]]]), 10)


def test_models_without_an_embedding_skip_the_check(simple):
    assert simple.embedding_vocab_size is None
    x = mx.random.normal((1, 64))
    assert simple.run(x).output.shape == (1, 64)


def test_embedding_found_in_raw_models():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.positions = nn.Embedding(8, 32)
            self.tokens = nn.Embedding(50, 32)

        def __call__(self, ids):
            return self.tokens(ids) + self.positions(mx.arange(ids.shape[-1]))

    assert embedding_vocab_size(Tagger()) == 50
    quantized = Tagger()
    nn.quantize(quantized, group_size=32, bits=4, class_predicate=lambda p, m: p == "tokens")
    assert isinstance(quantized.tokens, nn.QuantizedEmbedding)
    assert embedding_vocab_size(quantized) == 50
