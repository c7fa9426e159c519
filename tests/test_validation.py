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
        (mx.array([[3, -64]], dtype=mx.int8), -64, 0, 1),  # the vocabulary does not fit int8
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
    calls.clear()  # the schema inferred from its module names was validated on a forward pass
    assert model.embedding_vocab_size == VOCAB
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
        ([[[1]]], "nested too deep"),
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


# -- options --------------------------------------------------------------------------------

PROMPT = [5, 9, 17, 33, 65, 129]
OTHER = [5, 9, 17, 33, 65, 130]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.logit_lens(PROMPT, top_k=0), r"top_k=0 is out of range: it must be \[1, 320\]"),
        (lambda m: m.logit_lens(PROMPT, top_k=10**6), r"top_k=1000000 is out of range"),
        (lambda m: m.logit_lens(PROMPT, top_k=2.5), "top_k=2.5: expected an integer"),
        (lambda m: m.logit_lens(PROMPT, layers=[4]), r"layers=\[4\]: layer 4 does not exist; there are 4 layers"),
        (lambda m: m.logit_lens(PROMPT, layers=[]), r"layers=\[\]: give at least one layer"),
        (lambda m: m.activation_patching(PROMPT, OTHER, component="resid", positions=[50]), "position 50 does not exist; there are 6 positions"),
        (lambda m: m.activation_patching(PROMPT, OTHER, positions=[-7]), "position -7 does not exist"),
        (lambda m: m.activation_patching(PROMPT, OTHER, layers=[-5]), "layer -5 does not exist"),
        (lambda m: m.activation_patching(PROMPT, OTHER, answers=(1, 10**6)), r"answers=1000000 is out of range: it must be \[0, 319\]"),
        (lambda m: m.activation_patching(PROMPT, OTHER, answers=(1,)), "expected a pair"),
        (lambda m: m.activation_patching(PROMPT, OTHER, align="middle"), "align='middle': choose one of"),
        (lambda m: m.activation_patching(PROMPT, OTHER, answers=(1, 2), metric=lambda lg: lg.sum()), r"returned shape \(\) float32 for logits of shape \(1, 6, 320\)"),
        (lambda m: m.activation_patching(PROMPT, OTHER, answers=(1, 2), metric=lambda lg: lg[:, -1]), r"returned shape \(1, 320\)"),
        (lambda m: m.attribution_patching(PROMPT, OTHER, answers=(1, 2), metric=lambda lg: 3.0), "returned float"),
        (lambda m: m.attribution_patching(PROMPT, OTHER, components=[]), "components=\\[\\]"),
        (lambda m: m.generate(PROMPT, max_tokens=-3), r"max_tokens=-3 is out of range: it must be >= 0"),
        (lambda m: m.generate(PROMPT, temperature=-1.0), "temperature=-1.0 is out of range"),
        (lambda m: m.generate(PROMPT, top_p=0.0), r"top_p=0.0 is out of range: it must be in \(0.0, 1.0\]"),
        (lambda m: m.generate(PROMPT, intervene_on="some"), "intervene_on='some': choose one of"),
        (lambda m: m.steering_vector([], [PROMPT], layer=0), r"positive=\[\]: give at least one prompt"),
        (lambda m: m.steering_vector([PROMPT], [OTHER], layer=9), "layer 9 does not exist"),
        (lambda m: m.steering_vector([PROMPT], [OTHER], layer=0, position="first"), "position='first'"),
        (lambda m: m.decompose_resid(PROMPT, layer=5), r"layer=5 is out of range: it must be \[-4, 4\]"),
        (lambda m: m.direct_logit_attribution(PROMPT, position=6), "position 6 does not exist"),
        (lambda m: m.attention_patterns(PROMPT, layer=0, heads=[4]), "head 4 does not exist; there are 4 heads"),
        (lambda m: m.attention_patterns(PROMPT, layer=-9), "layer -9 does not exist"),
        (lambda m: m.get_token_predictions(mx.zeros((64,)), top_k=0), "top_k=0"),
    ],
)
def test_bad_options_are_clear_errors(llama, call, message):
    from mlxterp_core.errors import OptionError

    with pytest.raises(OptionError, match=message):
        call(llama)


def test_negative_layers_and_positions_count_from_the_end(llama):
    tr = llama.run([PROMPT], capture=["layers[-1].output", "layers.-2.attn.q"])
    assert bitwise_equal(tr.activations["layers[-1].output"], tr.activations["layers.3.output"])
    assert bitwise_equal(tr.layers_output[-1], tr.activations["layers[3].output"])
    assert bitwise_equal(tr.activations["blocks.-2.attn.hook_q"], tr.activations["layers.2.attn.q"].reshape(1, 6, 4, -1))
    lens = llama.logit_lens(PROMPT, layers=[-1, 0])
    assert lens.layers == [3, 0]
    # the same computation as layers=[3, 0], so bit for bit (layers=[3] alone projects a batch of
    # another shape, whose BLAS reduction order, and so last bits, can differ)
    assert lens.predictions == llama.logit_lens(PROMPT, layers=[3, 0]).predictions
    by_end = llama.activation_patching(PROMPT, OTHER, component="resid", layers=[-1], positions=[-1], answers=(1, 2))
    by_start = llama.activation_patching(PROMPT, OTHER, component="resid", layers=[3], positions=[5], answers=(1, 2))
    assert by_end.layers == [3] and by_end.recovery == by_start.recovery
    patterns = llama.attention_patterns(PROMPT, layer=-1, heads=[-1])
    assert patterns.layer == 3 and patterns.heads == [3]
    assert llama.decompose_resid(PROMPT, layer=-1).layer == 3
    assert llama.direct_logit_attribution(PROMPT, position=-1).position == 5
    edited = llama.run([PROMPT], interventions={"layers[-1].mlp": lambda x: x * 0}, capture=["layers.3.mlp"])
    assert mx.all(edited.activations["layers.3.mlp"] == 0).item()


def test_zero_max_tokens_is_an_empty_generation(llama):
    result = llama.generate(PROMPT, max_tokens=0)
    assert result.tokens == []


# -- files ----------------------------------------------------------------------------------


def test_result_files_that_are_not_results(llama, tmp_path):
    from mlxterp_analyses import LogitLensResult, PatchingResult

    from mlxterp_core.errors import FileFormatError

    result = llama.logit_lens(PROMPT, layers=[0])
    saved = result.save(tmp_path / "lens.json")
    assert LogitLensResult.load(saved) == result
    text = saved.read_text()
    cases = {
        "missing.json": (None, "no such file .*expected a LogitLensResult"),
        "cut.json": (text[: len(text) // 2], r"not valid JSON \(it ends early \(truncated\?\)\)"),
        "noise.json": ("{'a': nan}", "not valid JSON .*line 1, column 2"),
        "empty.json": ("", "is empty"),
        "list.json": ("[1, 2]", "holds a JSON list, not the dict"),
        "fields.json": ('{"text": "hi"}', r"is not a LogitLensResult saved by .save\(\): .*tokens"),
        "binary.json": (b"\xff\xfe\x00", "is not text"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(FileFormatError, match=message) as raised:
            LogitLensResult.load(path)
        assert name in str(raised.value)
    with pytest.raises(FileFormatError, match="holds a LogitLensResult, not a PatchingResult: load it with LogitLensResult.load"):
        PatchingResult.load(saved)
    with pytest.raises(FileFormatError, match="is not a file"):
        LogitLensResult.load(tmp_path)


def test_saving_is_atomic(llama, tmp_path, monkeypatch):
    import json

    result = llama.logit_lens(PROMPT, layers=[0])
    path = result.save(tmp_path / "lens.json")
    before = path.read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", lambda *a, **k: "x" * 100)
    monkeypatch.setattr("os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lens.json"]


def test_schema_files(tmp_path):
    from mlxterp_core.errors import FileFormatError
    from mlxterp_core.schema import ArchitectureSchema, SchemaError

    (tmp_path / "bad.toml").write_text('family = "x"\n[block\n')
    (tmp_path / "bad.json").write_text('{"family": ')
    with pytest.raises(FileFormatError, match=r"bad.toml is not valid TOML .*expected an architecture schema"):
        ArchitectureSchema.from_file(tmp_path / "bad.toml")
    with pytest.raises(FileFormatError, match="bad.json is not valid JSON"):
        ArchitectureSchema.from_file(tmp_path / "bad.json")
    with pytest.raises(FileFormatError, match="none.toml: no such file"):
        ArchitectureSchema.from_file(tmp_path / "none.toml")
    (tmp_path / "wrong.json").write_text('{"family": "x", "layerz": 1}')
    with pytest.raises(SchemaError, match="wrong.json"):
        ArchitectureSchema.from_file(tmp_path / "wrong.json")


def test_broken_model_directories(tmp_path):
    import mlxterp
    from mlxterp_core.load import LoadError

    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(LoadError, match="config.json is not valid JSON"):
        mlxterp.load(tmp_path)
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, '
        '"num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 320, "num_key_value_heads": 2}'
    )
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadError, match="could not be loaded as an mlx-lm model directory"):
        mlxterp.load(tmp_path)
