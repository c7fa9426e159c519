"""Shared fixtures."""

from __future__ import annotations

import mlxterp  # noqa: F401  first: it loads the optimized BLAS before anything imports mlx
import mlx.core as mx  # noqa: I001
import pytest
from helpers import SimpleModel, tiny_llama, train_tokenizer

from mlxterp import InterpretableModel


@pytest.fixture(scope="session")
def hf_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def wrapped_tokenizer(hf_tokenizer):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(hf_tokenizer)


@pytest.fixture
def llama_module():
    return tiny_llama()


@pytest.fixture
def llama(llama_module, wrapped_tokenizer):
    return InterpretableModel(llama_module, tokenizer=wrapped_tokenizer)


@pytest.fixture
def simple():
    mx.random.seed(1)
    module = SimpleModel()
    mx.eval(module.parameters())
    return InterpretableModel(module)



@pytest.fixture(scope="session")
def smollm():
    """The default real model as mlxterp.load() prepares it for this backend."""
    return mlxterp.load()
