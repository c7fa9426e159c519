"""Right-padded batches compute, at every real position, what each prompt computes alone."""

from __future__ import annotations

import mlx.core as mx
from helpers import tiny_llama
from hypothesis import given, settings, strategies as st

from mlxterp import InterpretableModel


def _time_axis(value: mx.array) -> int:
    return 2 if value.ndim == 4 else 1  # (B, H, T, D) per-head views, else (B, T, ...)


def _real_part(value: mx.array, row: int, length: int) -> mx.array:
    index = [row] + [slice(None)] * (value.ndim - 1)
    index[_time_axis(value)] = slice(0, length)
    return value[tuple(index)]


def assert_batch_matches_singles(model: InterpretableModel, prompts) -> None:
    batch = model.run(prompts)
    assert batch.lengths == tuple(len(model.encode(p)) if isinstance(p, str) else len(p) for p in prompts)
    for row, prompt in enumerate(prompts):
        alone = model.run([prompt]).activations
        length = batch.lengths[row]
        assert bool(mx.all(batch.mask[row, :length]).item())
        assert not bool(mx.any(batch.mask[row, length:]).item())
        for name, value in alone.items():
            expected = _real_part(value, 0, length)
            got = _real_part(batch.activations[name], row, length)
            assert got.shape == expected.shape, name
            assert mx.allclose(got, expected, atol=1e-5, rtol=1e-4).item(), name


def test_padded_text_batch_equals_separate_runs(llama):
    assert_batch_matches_singles(
        llama, ["The capital of France is", "Hello", "I love this movie. I hate this movie."]
    )


_MODEL = InterpretableModel(tiny_llama(num_hidden_layers=2))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, 319), min_size=1, max_size=9), min_size=1, max_size=4))
def test_padded_id_batches_equal_separate_runs(prompts):
    assert_batch_matches_singles(_MODEL, prompts)
