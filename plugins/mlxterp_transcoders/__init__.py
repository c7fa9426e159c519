"""Transcoders and cross-layer transcoders: load circuit-tracer's and SAELens's files, splice
them into any trace (every covered MLP output becomes reconstruction + error), train them in MLX
from the activation stream, evaluate the replacement model, and save them for circuit-tracer.

``mlxterp.load_transcoders(path)``, ``mlxterp.train_transcoders(model, data, kind=...)``;
``model.trace(text, transcoders=tc)`` and ``with model.transcoders(tc):`` splice them.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .evaluate import TranscoderEvaluation, evaluate_transcoders
from .formats import load_transcoders, save_transcoders
from .training import TranscoderTrainingLog, train_transcoders, training_memory
from .transcoders import TranscoderError, Transcoders


@hookimpl
def mlxterp_exports():
    return {"Transcoders": Transcoders, "load_transcoders": load_transcoders, "train_transcoders": train_transcoders,
            "evaluate_transcoders": evaluate_transcoders}


__all__ = ["TranscoderError", "Transcoders", "TranscoderTrainingLog", "TranscoderEvaluation", "load_transcoders",
           "save_transcoders", "train_transcoders", "evaluate_transcoders", "training_memory"]
