"""Token text for results, for models with or without a tokenizer (then ids stand in)."""

from __future__ import annotations


def token_text(model, token: int) -> str:
    return model.token_to_str(token) if model.tokenizer is not None else str(token)


def ids_text(model, ids: list[int]) -> str:
    return model.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids))


def token_ids(model, text) -> list[int]:
    """A prompt as token ids: strings are encoded, id sequences taken as they are."""
    from mlxterp_core.errors import InputError

    ids = model.encode(text) if isinstance(text, str) else [int(t) for t in text]
    if not ids:
        raise InputError(f"empty prompt {text!r}: give at least one token.")
    return ids
