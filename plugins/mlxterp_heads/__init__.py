"""Attention-head detection: previous-token, duplicate-token, induction, first-token and
current-token heads.

``model.head_scores(kind, ...)`` scores every query head of every layer on the model's own
attention probabilities (``layers[i].attn.pattern``) with TransformerLens's definitions
(``error_measure="mul"`` or ``"abs"``) or, for induction heads on repeated random tokens, the
induction-stripe score; ``model.induction_loss(...)`` measures the loss on both halves of
repeated random tokens, optionally with heads zero-ablated, to show causally what the scores
suggest.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .detection import (
    KINDS,
    detection_pattern,
    head_scores,
    induction_loss,
    ordinary_token_ids,
    repeated_random_tokens,
    score_patterns,
    stripe_scores,
)
from .results import HeadScores, InductionLoss


@hookimpl
def mlxterp_analyses():
    return {"head_scores": head_scores, "induction_loss": induction_loss}


__all__ = [
    "KINDS",
    "HeadScores",
    "InductionLoss",
    "detection_pattern",
    "head_scores",
    "induction_loss",
    "ordinary_token_ids",
    "repeated_random_tokens",
    "score_patterns",
    "stripe_scores",
]
