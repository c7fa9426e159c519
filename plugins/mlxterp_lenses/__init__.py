"""The tuned lens (Belrose et al. 2023): ``model.train_tuned_lens(corpus)``,
``model.tuned_lens(text, lens)``, ``model.evaluate_tuned_lens(lens, corpus)``, and
``TunedLens.save`` / ``TunedLens.load`` in the reference's folder layout."""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .analysis import tuned_lens
from .tuned_lens import TunedLens, unembed_hash
from .results import LensEvaluation, TunedLensResult
from .training import evaluate_tuned_lens, train_tuned_lens


@hookimpl
def mlxterp_analyses():
    return {"train_tuned_lens": train_tuned_lens, "tuned_lens": tuned_lens, "evaluate_tuned_lens": evaluate_tuned_lens}


@hookimpl
def mlxterp_exports():
    return {"TunedLens": TunedLens}


__all__ = ["LensEvaluation", "TunedLens", "TunedLensResult", "evaluate_tuned_lens", "train_tuned_lens", "tuned_lens", "unembed_hash"]
