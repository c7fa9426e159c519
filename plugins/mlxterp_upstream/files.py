"""Upstream mlxterp's model methods for files, over mlxterp's formats (SAELens folders for SAEs,
the tuned-lens reference layout for lenses): upstream's own file formats are not read, and the
error says what to use instead."""

from __future__ import annotations

from pathlib import Path

from mlxterp_lenses import TunedLens
from mlxterp_saes import SAE
from mlxterp_saes import load_sae as _load_sae


def load_sae(model, path: str | Path) -> SAE:
    """``mlxterp.load_sae(path, model=model)``: an SAE in SAELens's or Gemma Scope's format,
    checked against this model's sites."""
    return _load_sae(path, model=model)


def load_tuned_lens(model, path: str | Path) -> TunedLens:
    """``TunedLens.load(path, model)``: a lens folder in the tuned-lens layout."""
    return TunedLens.load(path, model)
