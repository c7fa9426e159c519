"""Token text for results, for models with or without a tokenizer (then ids stand in)."""

from __future__ import annotations


def token_text(model, token: int) -> str:
    return model.token_to_str(token) if model.tokenizer is not None else str(token)


def ids_text(model, ids: list[int]) -> str:
    return model.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids))


def token_ids(model, text) -> list[int]:
    """One prompt as token ids: a string is encoded, ids (a list, a 1-D array) are taken as they
    are; either way checked against the model's embedding (``model.prepare_inputs``)."""
    from .errors import InputError

    ids = model.prepare_inputs(text).array
    if ids.shape[0] != 1:
        raise InputError(f"expected one prompt (a string or a list of token ids), got {ids.shape[0]}: {text!r:.80}.")
    return ids[0].tolist()
