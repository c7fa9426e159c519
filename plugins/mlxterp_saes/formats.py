"""Reading and writing the field's SAE formats.

- SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``), the
  v6 layout (model and hook fields under ``metadata``) and the older flat one, migrated as
  SAELens's ``handle_pre_6_0_config`` does. Float64 tensors are read as float32; a training
  checkpoint of an architecture that is saved as another (SAELens's ``batchtopk``) is converted
  by its module's ``from_checkpoint``, as SAELens's ``save_inference_model`` would.
- Gemma Scope: ``params.npz`` (Gemma Scope 1) or ``params.safetensors`` (Gemma Scope 2), keys
  ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``: JumpReLU with
  ``apply_b_dec_to_input=False``. The site comes from the folder path (``...-res/layer_12/...``)
  or ``site=``.
- A Hugging Face repo id (``"org/repo"`` or ``"org/repo/folder/of/the/sae"``) through
  ``huggingface_hub`` where the hub can be reached.

Hook names are TransformerLens's (``blocks.8.hook_resid_post``) in the files and mlxterp
standard names (``layers.8.output``) in :class:`~mlxterp_saes.sae.SAEConfig`; we write both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxterp.plugin import UnknownNameError, read_json, read_safetensors, write_atomic
from mlxterp.plugin import StandardName, parse

from .architectures import architectures
from .sae import SAE, SAEConfig, SAEError, hook_name_of, site_width

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
WHITENING = "activation_whitening.safetensors"  # SAELens training checkpoints of covariance_whitening
GEMMA_SCOPE = ("params.npz", "params.safetensors")
WRITTEN_BY = "6.0.0"  # the SAELens cfg layout we write (v6): SAELens must not migrate it again

_V6_TOP = {"architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input",
           "normalize_activations", "reshape_activations", "k", "rescale_acts_by_decoder_norm", "metadata"}


def load_sae(
    source: str | os.PathLike,
    *,
    site: str | None = None,
    site_out: str | None = None,
    model=None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """Load an SAE or transcoder from a SAELens folder, a Gemma Scope params file or folder,
    or a Hugging Face repo id.

    Args:
        source: a folder, a ``params.npz`` / ``params.safetensors`` / ``sae_weights.safetensors``
            file, or ``"org/repo[/folder]"`` on the hub.
        site: the standard name the SAE reads (overrides the file's hook name); needed for a
            Gemma Scope file whose path does not say.
        site_out: a transcoder's output site (overrides the file's ``hook_name_out``).
        model: an InterpretableModel to check now that it has the SAE's sites.
        norm_scaling_factor: for ``normalize_activations="expected_average_only_in"``: the
            scalar SAELens's registry gives, folded into the weights as SAELens does.
    """
    path = Path(source).expanduser()
    if not path.exists():
        path = _from_hub(str(source))
    if path.is_file():
        folder, files = path.parent, [path.name]
    else:
        folder, files = path, [p.name for p in path.iterdir()]
    if CFG in files and (WEIGHTS in files or path.name == WEIGHTS):
        sae = _saelens(folder, norm_scaling_factor)
    elif any(name in files for name in GEMMA_SCOPE):
        name = next(name for name in GEMMA_SCOPE if name in files)
        sae = _gemma_scope(folder / name, site)
    elif {"config.json", "weights.safetensors"} <= set(files):
        raise SAEError(
            f"{path} is upstream mlxterp's SAE folder (config.json + weights.safetensors), which mlxterp does not "
            "read: train one with mlxterp.train_sae(...), which writes SAELens's format, or load an SAELens or "
            "Gemma Scope SAE (docs/guide/migrating.md)."
        )
    else:
        raise SAEError(
            f"{path}: no SAE files found (looked for {CFG} + {WEIGHTS}, or {' / '.join(GEMMA_SCOPE)}); "
            f"it has: {', '.join(sorted(files)[:10]) or 'nothing'}."
        )
    if site is not None or site_out is not None:
        sae.cfg = _with_sites(sae.cfg, site or sae.cfg.site, site_out or sae.cfg.site_out, folder)
    if model is not None:
        check_sites(sae, model, where=str(folder))
    return sae


def check_sites(sae: SAE, model, where: str = "the SAE") -> None:
    """Fail unless ``model`` has the SAE's site(s), of the SAE's widths (``d_in``; a
    transcoder's ``d_out`` at its output site), naming the field that gave them."""
    pairs = [(sae.cfg.site, "metadata.hook_name", sae.cfg.hook_name, "d_in", sae.cfg.d_in)]
    if sae.cfg.is_transcoder:
        pairs.append((sae.cfg.site_out, "metadata.hook_name_out", sae.cfg.hook_name_out, "d_out",
                      sae.cfg.d_out or sae.cfg.d_in))
    for name, field, hook, size, expected in pairs:
        if name is None:
            raise SAEError(f"{where}: the SAE names no site ({field} is empty): pass site=.")
        try:
            model.architecture_or_raise(name).resolve(name)
        except UnknownNameError as e:
            raise SAEError(f"{where}: cfg field {field} = {hook!r} ({name}) is not a site of this model: {e}") from e
        width = site_width(model, name)
        if width != expected:
            raise SAEError(
                f"{where}: the SAE's {size} = {expected}, but {name} ({field} = {hook!r}) has width {width} "
                "in this model: the SAE was trained for another model or site."
            )


# -- SAELens folders -----------------------------------------------------------------------------


def _saelens(folder: Path, norm_scaling_factor: float | None) -> SAE:
    cfg_path = folder / CFG
    raw = read_json(cfg_path, "an SAE config (SAELens cfg.json)", error=SAEError)
    cfg_dict = _v6(raw)
    weights = _read_tensors(folder / WEIGHTS)
    trained = next((a for a in architectures() if a.name == cfg_dict.get("architecture") and a.from_checkpoint), None)
    if trained is not None:  # a training checkpoint (SAELens's batchtopk): as SAELens saves it for inference
        cfg_dict, weights = trained.from_checkpoint(cfg_dict, weights)
    cfg = _config(cfg_dict, cfg_path)
    weights = _legacy_tensors(weights, folder / WEIGHTS)
    if cfg.normalize_activations == "expected_average_only_in":
        if norm_scaling_factor is not None:
            # x is multiplied by s before the SAE: fold s in (W_enc * s, W_dec / s, b_dec / s)
            s = float(norm_scaling_factor)
            weights["W_enc"] = weights["W_enc"] * s
            weights["W_dec"] = weights["W_dec"] / s
            weights["b_dec"] = weights["b_dec"] / s
        else:
            import warnings

            warnings.warn(
                f"{cfg_path}: normalize_activations='expected_average_only_in' without a scaling factor: "
                "inputs are used unscaled; pass norm_scaling_factor= (SAELens's registry has it).",
                stacklevel=3,
            )
        cfg = _evolve(cfg, normalize_activations="none")
    if (folder / WHITENING).is_file():
        import warnings

        warnings.warn(
            f"{folder}: {WHITENING} is ignored, as SAELens ignores it: this is a training checkpoint whose "
            "weights expect whitened inputs, (x - mean) @ matrix. Fold the whitening in with SAELens "
            "(save_inference_model, or SAE.fold_activation_whitening) and load that folder instead.",
            stacklevel=3,
        )
    try:
        sae = SAE(cfg, weights)
    except SAEError as e:
        raise SAEError(f"{folder}: {e}") from e
    sparsity = folder / SPARSITY
    if sparsity.is_file():
        object.__setattr__(sae, "log_sparsity", _read_tensors(sparsity).get("sparsity"))
    return sae


def _v6(raw: dict[str, Any]) -> dict[str, Any]:
    """A SAELens config in the v6 layout: pre-6.0 configs migrated (``handle_pre_6_0_config``)."""
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if version and _major(version) >= 6 and "metadata" in raw:
        return raw
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn", "hook_point_layer": "hook_layer"}
    cfg = {renames.get(k, k): v for k, v in raw.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("prepend_bos", True)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("reshape_activations", "hook_z" if "hook_z" in (cfg.get("hook_name") or "") else "none")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and (kwargs.get("k") or cfg.get("k")):
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs.get("k") or cfg.get("k")
    norm = cfg.get("normalize_activations")
    if norm is True:
        cfg["normalize_activations"] = "expected_average_only_in"
    elif norm in (None, False):
        cfg["normalize_activations"] = "none"
    top = {k: v for k, v in cfg.items() if k in _V6_TOP}
    top["metadata"] = {**(raw.get("metadata") or {}), **{k: v for k, v in cfg.items() if k not in _V6_TOP}}
    return top


def _major(version: str) -> int:
    match = re.match(r"\s*(\d+)", str(version))
    return int(match.group(1)) if match else 0


def _config(cfg: dict[str, Any], cfg_path: Path) -> SAEConfig:
    meta = dict(cfg.get("metadata") or {})
    for field in ("d_in", "d_sae", "d_out", "k"):
        value = cfg.get(field)
        if (field in ("d_in", "d_sae") or value is not None) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SAEError(f"{cfg_path}: cfg field {field!r} is missing or not a positive integer ({value!r}).")
    if meta.get("hook_head_index") is not None:
        raise SAEError(
            f"{cfg_path}: metadata.hook_head_index = {meta['hook_head_index']} (an SAE on one attention head) "
            "is not supported yet; use an SAE on the whole site."
        )
    architecture = cfg.get("architecture", "standard")
    hook, hook_out = meta.get("hook_name"), meta.get("hook_name_out")
    site = meta.get("mlxterp_name") or _site(hook, cfg_path, "metadata.hook_name")
    site_out = meta.get("mlxterp_name_out") or _site(hook_out, cfg_path, "metadata.hook_name_out")
    known = {"model_name", "hook_name", "hook_name_out", "context_size", "prepend_bos", "mlxterp_name", "mlxterp_name_out"}
    return SAEConfig(
        architecture=architecture,
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        d_out=cfg.get("d_out"),
        k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=cfg.get("normalize_activations") or "none",
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        site=site,
        site_out=site_out,
        hook_name=hook,
        hook_name_out=hook_out,
        model_name=meta.get("model_name"),
        context_size=meta.get("context_size"),
        prepend_bos=bool(meta.get("prepend_bos", True)),
        reshape_activations=cfg.get("reshape_activations") or "none",  # missing: "none", as SAELens reads it
        metadata={k: v for k, v in meta.items() if k not in known},
    )


def _site(hook: str | None, where: Path | str, field: str) -> str | None:
    """mlxterp's standard name of a TransformerLens hook name (kept as given where the family
    decides, e.g. ``mlp.hook_pre`` = gate or up)."""
    if hook is None:
        return None
    try:
        parsed = parse(hook)
    except UnknownNameError as e:
        raise SAEError(f"{where}: cfg field {field} = {hook!r} is not a hook name mlxterp can map: {e}") from e
    if "|" in parsed.sub:
        return hook
    return str(StandardName(parsed.sub, parsed.layer))


def _with_sites(cfg: SAEConfig, site: str | None, site_out: str | None, where: Path) -> SAEConfig:
    def standard(name):
        if name is None or name.startswith("model."):
            return name
        return _site(name, where, "site=")

    site, site_out = standard(site), standard(site_out)
    return _evolve(
        cfg,
        site=site,
        site_out=site_out,
        hook_name=cfg.hook_name or (site and hook_name_of(site)),
        hook_name_out=cfg.hook_name_out or (site_out and hook_name_of(site_out)),
    )


def _legacy_tensors(weights: dict[str, mx.array], where: Path) -> dict[str, mx.array]:
    weights = dict(weights)
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = mx.exp(weights.pop("log_threshold"))
    scale = weights.pop("scaling_factor", weights.pop("finetuning_scaling_factor", None))
    if scale is not None and not bool(mx.all(scale == 1).item()):
        # features are multiplied by it before the decoder: fold it into W_dec's rows
        weights["W_dec"] = weights["W_dec"] * scale[:, None]
    return weights


def _read_tensors(path: Path) -> dict[str, mx.array]:
    if path.suffix == ".safetensors":  # float64 ones too, which MLX does not read, as float32
        return read_safetensors(path, "SAE tensors", error=SAEError, advice="Download or save the SAE again.")
    if not path.is_file():
        raise SAEError(f"{path}: no such file (expected SAE tensors).")
    try:
        found = mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError / ValueError on truncated or foreign files
        raise SAEError(
            f"{path}: cannot read the tensors ({type(e).__name__}: {e}); the file is corrupt or truncated "
            "(download it again)."
        ) from e
    if not isinstance(found, dict):
        raise SAEError(f"{path}: holds a single array, not named tensors.")
    return found


def _evolve(cfg: SAEConfig, **changes) -> SAEConfig:
    import attrs

    return attrs.evolve(cfg, **changes)


# -- Gemma Scope ---------------------------------------------------------------------------------

_GEMMA_SITES = {"res": "output", "resid_post": "output", "mlp": "mlp", "mlp_out": "mlp",
                "att": "attn.z", "attn_out": "attn"}


def _gemma_scope(path: Path, site: str | None) -> SAE:
    raw = _read_tensors(path)
    weights = {{"w_enc": "W_enc", "w_dec": "W_dec"}.get(k.lower(), k): v for k, v in raw.items()}
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in weights]
    if missing:
        raise SAEError(f"{path}: a Gemma Scope file has w_enc, w_dec, b_enc, b_dec and threshold; this one lacks {', '.join(missing)}.")
    d_in, d_sae = weights["W_enc"].shape
    guessed = _gemma_site(path)
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=int(d_in),
        d_sae=int(d_sae),
        apply_b_dec_to_input=False,
        site=None,
        context_size=1024,
        metadata={"source": "gemma_scope", "path": str(path)},
    )
    if site is None and guessed is None:
        raise SAEError(
            f"{path}: the path does not say which site this Gemma Scope SAE reads (expected "
            "'...-res/layer_12/...' or '.../resid_post/layer_12_...'): pass site='layers.12.output'."
        )
    cfg = _with_sites(cfg, site or guessed, None, path)
    try:
        return SAE(cfg, weights)
    except SAEError as e:
        raise SAEError(f"{path}: {e}") from e


def _gemma_site(path: Path) -> str | None:
    text = str(path)
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"(?:-|/)(resid_post|mlp_out|attn_out|res|mlp|att)(?:[-/_]|$)", text)
    if layer is None or kind is None:
        return None
    return f"layers.{layer.group(1)}.{_GEMMA_SITES[kind.group(1)]}"


# -- the hub -------------------------------------------------------------------------------------


def _from_hub(source: str) -> Path:
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/", "~")):
        raise SAEError(f"{source!r}: no such file or folder (a hub id is 'org/repo' or 'org/repo/folder').")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise SAEError(f"{source!r} is not a local path, and huggingface_hub is not installed to fetch it.") from e
    try:
        root = snapshot_download(repo, allow_patterns=[f"{folder}/*"] if folder else None)
    except Exception as e:
        raise SAEError(
            f"could not fetch {source!r} from the Hugging Face hub ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
            "Offline? Download the folder elsewhere and pass its local path."
        ) from e
    return Path(root) / folder if folder else Path(root)


# -- writing -------------------------------------------------------------------------------------


def save_sae(sae: SAE, path, sparsity: mx.array | None = None) -> Path:
    """Write ``sae`` as a SAELens v6 folder: ``cfg.json`` (TransformerLens hook names under
    ``metadata``, our standard names beside them as ``mlxterp_name``), ``sae_weights.safetensors``
    and, given feature densities' log10 (``sparsity``, (d_sae,)), ``sparsity.safetensors``.
    Files are written to temporary names and renamed, the config last."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    data: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape,
    }
    data.update(sae.architecture.config_fields(cfg))
    if cfg.is_transcoder:
        data["d_out"] = cfg.d_out or cfg.d_in
    meta = {
        **cfg.metadata,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name or (cfg.site and hook_name_of(cfg.site)),
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "seqpos_slice": [None],
        "model_from_pretrained_kwargs": {},
        "sae_lens_version": WRITTEN_BY,
        "mlxterp_name": cfg.site,
    }
    if cfg.is_transcoder:
        meta.update(hook_name_out=cfg.hook_name_out or (cfg.site_out and hook_name_of(cfg.site_out)),
                    hook_head_index_out=None, mlxterp_name_out=cfg.site_out)
    data["metadata"] = meta
    _save_safetensors(folder / WEIGHTS, sae.state_dict())
    if sparsity is not None:
        _save_safetensors(folder / SPARSITY, {"sparsity": mx.array(sparsity).astype(mx.float32)})
    write_atomic(folder / CFG, json.dumps(data, indent=2))  # last: a folder with a cfg.json is whole
    return folder


def _save_safetensors(path: Path, tensors: dict[str, mx.array]) -> None:
    write_atomic(path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata={"format": "pt"}))
