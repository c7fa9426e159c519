"""mlxterp's first-party model loaders: GGUF files, local mlx-lm checkpoints, Hugging Face repos.

Each loader takes ``(source, **options)`` and returns ``(module, tokenizer, report)``, or None
when the source is not its kind; ``mlxterp.load`` tries every plugin's loaders in turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxterp.plugin import LoadError, hookimpl, read_json


def load_gguf(source: Any, **options):
    if not str(source).lower().endswith(".gguf"):
        return None
    from . import gguf

    return gguf.build(Path(source).expanduser())


def load_mlx_lm_directory(source: Any, lazy: bool = False, **options):
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise LoadError(
            f"{path} is a directory but not an mlx-lm model: it has no config.json (found: "
            f"{', '.join(found) or 'nothing'}). Pass a model directory (config.json, *.safetensors, "
            "tokenizer files), a .gguf file, or a Hugging Face repo id."
        )
    from mlx_lm import load as mlx_lm_load

    from .hf_config import check_required, legacy_keys

    config = read_json(path / "config.json", "an mlx-lm model config", error=LoadError)
    added = legacy_keys(config)  # transformers 5's keys, in the names mlx-lm reads
    check_required({**config, **added})
    try:
        module, tokenizer = mlx_lm_load(str(path), model_config=added, lazy=lazy)
    except Exception as e:  # missing or truncated weights, tokenizer files, ...
        raise LoadError(
            f"{path} could not be loaded as an mlx-lm model directory (config.json, "
            f"*.safetensors, tokenizer files): {type(e).__name__}: {str(e)[:300]}"
        ) from None
    report = {"format": "mlx-lm", "directory": str(path)}
    if added:
        report["config"] = "added for mlx-lm from transformers 5 keys: " + ", ".join(f"{k}={v!r}" for k, v in added.items())
    return module, tokenizer, report


def load_hub_repo(source: Any, lazy: bool = False, **options):
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not Path(text).exists() and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        return None
    from mlx_lm import load as mlx_lm_load

    try:
        module, tokenizer = mlx_lm_load(text, lazy=lazy)
    except Exception as e:  # huggingface_hub raises many kinds when offline or not found
        raise LoadError(
            f"could not load {text!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Without network access, load a local .gguf file or mlx-lm model directory instead, "
            "or call mlxterp.load() for the default model."
        ) from None
    return module, tokenizer, {"format": "mlx-lm", "repo": text}


@hookimpl
def mlxterp_loaders():
    return [load_gguf, load_mlx_lm_directory, load_hub_repo]
