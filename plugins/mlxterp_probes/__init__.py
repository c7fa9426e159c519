"""Linear probes: ``model.probe(texts, labels)`` sweeps logistic-regression (L2) or mass-mean
probes over the layers with held-out accuracy and AUROC on group splits; ``mlxterp.probes``
has the pieces (``collect``, ``fit_logistic``, ``fit_mass_mean``, ``auroc``, ``split_groups``,
``sweep``, ``probe_dataset`` for an ``ActivationDataset``)."""

from __future__ import annotations

import sys

from mlxterp.plugin import hookimpl

from .fitting import LinearProbe, auroc, fit, fit_logistic, fit_logistic_sites, fit_mass_mean, split_groups
from .results import ProbeSweep
from .sweep import collect, probe, probe_dataset, probe_sites, sweep


@hookimpl
def mlxterp_analyses():
    return {"probe": probe}


@hookimpl
def mlxterp_exports():
    return {"probes": sys.modules[__name__]}


__all__ = ["LinearProbe", "ProbeSweep", "auroc", "collect", "fit", "fit_logistic", "fit_logistic_sites", "fit_mass_mean",
           "probe", "probe_dataset", "probe_sites", "split_groups", "sweep"]
