"""The tuned lens (Belrose et al. 2023): one affine translator per layer, applied residually.

Translator ``i`` reads the residual stream entering block ``i`` (``layers[i].input``; the
embeddings for i = 0), as the reference implementation (AlignmentResearch/tuned-lens) indexes
them, and maps it to ``h + A_i h + b_i`` before the final norm and the unembedding. ``A_i`` and
``b_i`` start at zero, so an untrained lens is the logit lens exactly, and weight decay pulls
the lens towards it. The stream leaving the last block needs no translator.

On disk, a lens is the reference's folder: ``config.json`` (``d_model``,
``num_hidden_layers``, ``bias``, ``base_model_name_or_path``, ``unembed_hash``, ``lens_type``)
with the translator weights under the reference keys ``"{i}.weight"`` (D, D) and ``"{i}.bias"``
(D,), written as ``params.safetensors``; the reference's own ``params.pt`` is read when torch is
installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp.plugin import Display, InputError, options, read_json, read_safetensors, write_atomic

WEIGHTS = "params.safetensors"
REFERENCE_WEIGHTS = "params.pt"
CONFIG = "config.json"
LENS_TYPE = "linear_tuned_lens"


class TunedLens(Display, nn.Module):
    """``num_hidden_layers`` affine translators of width ``d_model``, zero-initialised.

    ``steps_trained`` counts the optimiser steps ``train_tuned_lens`` gave it, ``training_kl``
    is its last step's mean KL(final || lens) in nats (None before any), and ``source`` the
    folder it was loaded from (None for a new lens), so that its repr says what it is.
    """

    def __init__(self, d_model: int, num_hidden_layers: int, bias: bool = True,
                 base_model_name_or_path: str = "", unembed_hash: str | None = None):
        super().__init__()
        d_model, num_hidden_layers = options.integer(d_model, "d_model", 1), options.integer(num_hidden_layers, "num_hidden_layers", 1)
        self.layer_translators = [nn.Linear(d_model, d_model, bias=bias) for _ in range(num_hidden_layers)]
        for translator in self.layer_translators:
            translator.weight = mx.zeros_like(translator.weight)
            if bias:
                translator.bias = mx.zeros_like(translator.bias)
        self._config = {
            "base_model_name_or_path": base_model_name_or_path,
            "d_model": int(d_model),
            "num_hidden_layers": int(num_hidden_layers),
            "bias": bool(bias),
            "base_model_revision": None,
            "unembed_hash": unembed_hash,
            "lens_type": LENS_TYPE,
        }
        self.steps_trained = 0
        self.training_kl: float | None = None
        self.source: str | None = None

    def _summary(self) -> str:
        d, bias = self._config["d_model"], " with bias" if self._config["bias"] else ""
        what = f"{self.num_hidden_layers} translators of {d}x{d}{bias}"
        source = self.source if self.source is None or len(self.source) <= 60 else "…" + self.source[-59:]
        history = [f"loaded from {source!r}"] if source else []
        if self.steps_trained:
            history.append(f"trained {self.steps_trained} steps")
        elif not self.source:
            history.append("untrained: the logit lens")
        if self.training_kl is not None:
            history.append(f"last step's KL(final || lens) {self.training_kl:.3g} nats")
        return f"{what}; {', '.join(history)}"

    @classmethod
    def for_model(cls, model, bias: bool = True) -> TunedLens:
        """An untrained lens shaped for ``model`` (an InterpretableModel)."""
        arch = model.architecture_or_raise("the tuned lens")
        d_model = model.run([[0]], capture=["layers.0.input"]).activations["layers.0.input"].shape[-1]
        # the model's name as loaded, never a local path (the reference writes a Hub repo id here)
        return cls(d_model, arch.n_layers, bias, arch.model_name or "", unembed_hash(model))

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_translators)

    def transform_hidden(self, hidden: mx.array, index: int) -> mx.array:
        """``h + A_index h + b_index`` for the stream entering block ``index``, (..., D)."""
        index = options.index(index, self.num_hidden_layers, "index", "translator")
        hidden = options.vectors(hidden, self._config["d_model"], "hidden")
        return hidden + self.layer_translators[index](hidden)

    def __call__(self, hidden: mx.array, index: int) -> mx.array:
        return self.transform_hidden(hidden, index)

    # -- files ---------------------------------------------------------------------------------

    def state(self) -> dict[str, mx.array]:
        """The reference's state dict: ``{"{i}.weight": (D, D), "{i}.bias": (D,)}``."""
        found = {}
        for i, translator in enumerate(self.layer_translators):
            found[f"{i}.weight"] = translator.weight
            if "bias" in translator:
                found[f"{i}.bias"] = translator.bias
        return found

    def load_state(self, state: dict[str, mx.array]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise InputError(f"tuned-lens weights do not fit this lens: missing {missing[:4]}, unexpected {extra[:4]}.")
        d = self._config["d_model"]
        for key, value in state.items():
            i, kind = key.split(".")
            want = (d, d) if kind == "weight" else (d,)
            if tuple(value.shape) != want:
                raise InputError(f"tuned-lens weight {key!r} has shape {tuple(value.shape)}, expected {want}.")
            setattr(self.layer_translators[int(i)], kind, value.astype(mx.float32))

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``params.safetensors`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        mx.eval(self.parameters())
        write_atomic(path / WEIGHTS, lambda tmp: mx.save_safetensors(str(tmp), self.state()))
        write_atomic(path / CONFIG, json.dumps(self.config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> TunedLens:
        """Read a lens folder (ours, or the reference's ``params.pt`` where torch is installed).
        With ``model``, warn when the lens was trained on another unembedding."""
        if not str(path).strip():
            raise InputError("TunedLens.load needs the path of a lens folder, got an empty one.")
        path = Path(path)
        if path.name and not (path / CONFIG).is_file() and path.with_suffix(".npz").is_file() and path.with_suffix(".json").is_file():
            raise InputError(
                f"{str(path)!r} holds upstream mlxterp's tuned-lens files (.npz + .json), which mlxterp does not "
                "read: train a lens with model.train_tuned_lens(...) and save it in the tuned-lens layout "
                "(docs/guide/migrating.md)."
            )
        if not (path / CONFIG).is_file():
            raise InputError(f"no tuned lens at {str(path)!r}: expected a folder with {CONFIG} and {WEIGHTS}.")
        expected = "a tuned lens (saved by TunedLens.save or the tuned-lens package)"
        config = read_json(path / CONFIG, f"the {CONFIG} of {expected}", error=InputError)
        try:
            lens = cls(int(config["d_model"]), int(config["num_hidden_layers"]), bool(config.get("bias", True)),
                       config.get("base_model_name_or_path") or "", config.get("unembed_hash"))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path / CONFIG} is not a tuned-lens config ({type(e).__name__}: {e}).") from None
        if (path / WEIGHTS).is_file():
            state = read_safetensors(path / WEIGHTS, f"the weights of {expected}", error=InputError,
                                     advice="Save the lens again, or retrain it.")
        elif (path / REFERENCE_WEIGHTS).is_file():
            state = _torch_state(path / REFERENCE_WEIGHTS)
        else:
            raise InputError(f"{path} has {CONFIG} but no {WEIGHTS} (or the reference's {REFERENCE_WEIGHTS}).")
        lens.load_state(state)
        lens.source = str(path)
        if model is not None and config.get("unembed_hash") and config["unembed_hash"] != unembed_hash(model):
            import warnings

            warnings.warn(f"the tuned lens at {path} was trained on another unembedding than this model's.", stacklevel=2)
        return lens


def log_softmax(logits: mx.array, axis: int = -1) -> mx.array:
    return logits - mx.logsumexp(logits, axis=axis, keepdims=True)


def unembed_hash(model) -> str:
    """sha256 of numpy's summarised print (precision 1) of the (V, D) unembedding matrix, as the
    reference's ``tensor_hash`` computes it."""
    arch = model.architecture_or_raise("the tuned lens")
    d = model.run([[0]], capture=["layers.0.input"]).activations["layers.0.input"].shape[-1]
    weight = arch.unembed(mx.eye(d), softcap=False).astype(mx.float32).T  # (V, D)
    return hashlib.sha256(np.array_str(np.array(weight), precision=1).encode()).hexdigest()


def _torch_state(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise InputError(f"{path} is a torch file; install torch to read it, or convert it to {WEIGHTS}.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a short or foreign file
        raise InputError(f"{path} is corrupt or truncated: torch cannot read it ({type(e).__name__}: {e}).") from None
    return {key: mx.array(value.float().numpy()) for key, value in state.items()}
