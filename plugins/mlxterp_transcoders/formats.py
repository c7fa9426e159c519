"""Transcoder files: circuit-tracer's two layouts, and SAELens transcoder folders.

circuit-tracer (``../shared/research/circuit-tracing.md`` §3):

- per-layer set: ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
  ``feature_output_hook``, optional ``activation: relu | topk`` and ``k``) and one
  ``layer_{i}.safetensors`` per layer: ``W_enc`` (F, d), ``W_dec`` (F, d), ``b_enc`` (F,),
  ``b_dec`` (d,), optional ``activation_function.threshold`` (F,) (JumpReLU) and ``W_skip``
  (d, d) (applied as ``x @ W_skip.T``);
- cross-layer transcoder: ``config.yaml`` (``model_kind: cross_layer_transcoder``),
  ``W_enc_{i}.safetensors`` (``W_enc_{i}`` (F, d), ``b_enc_{i}``, ``b_dec_{i}``, optional
  ``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i}`` (F, L - i, d): slot j writes
  layer i + j).

Hooks: ``mlp.hook_in`` (the MLP's normalised input) is ``layers[i].ln2``, ``hook_resid_mid``
``layers[i].resid_mid``; ``mlp.hook_out`` / ``hook_mlp_out`` ``layers[i].mlp``.

SAELens: a folder of transcoder folders, one per layer (``cfg.json`` + ``sae_weights.safetensors``
of architecture ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` or
``jumprelu_skip_transcoder``), read with :func:`mlxterp_saes.load_sae`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxterp.plugin import FileFormatError, read_safetensors, read_text, write_atomic

from .transcoders import TranscoderError, Transcoders

CONFIG = "config.yaml"
HOOKS_IN = {"mlp.hook_in": "ln2", "hook_resid_mid": "resid_mid"}
HOOKS_OUT = ("mlp.hook_out", "hook_mlp_out")
SAELENS = {"transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu",
           "jumprelu_skip_transcoder": "jumprelu"}


def load_transcoders(source: str | os.PathLike | list, *, model=None) -> Transcoders:
    """Transcoders from circuit-tracer's per-layer or cross-layer layout (a folder with
    ``config.yaml``), or from SAELens transcoder folders (a folder holding one per layer, or a
    list of them). With ``model``, check now that it has every site the transcoders read and
    write, at their width."""
    if isinstance(source, (list, tuple)):
        tc = _from_saelens([Path(s).expanduser() for s in source])
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileFormatError(f"{path}: no such folder (expected a transcoder folder with {CONFIG}, or SAELens transcoder folders).")
        if (path / CONFIG).is_file():
            tc = _from_circuit_tracer(path)
        else:
            folders = sorted((p for p in path.iterdir() if (p / "cfg.json").is_file()), key=_layer_order)
            if not folders:
                raise FileFormatError(f"{path} has neither {CONFIG} (circuit-tracer) nor SAELens transcoder folders (cfg.json).")
            tc = _from_saelens(folders)
    if model is not None:
        check_model(tc, model)
    return tc


def check_model(tc: Transcoders, model) -> None:
    """Fail clearly when ``model`` lacks a site ``tc`` reads or writes, or its width differs."""
    arch = model.architecture_or_raise("transcoders")
    if tc.layers[-1] >= arch.n_layers:
        raise TranscoderError(f"these transcoders cover layers up to {tc.layers[-1]}; the model has {arch.n_layers} ({arch.family}).")
    for sub in (tc.reads, "mlp"):
        if not arch.has(sub, tc.layers[0]):
            raise TranscoderError(
                f"these transcoders read layers[i].{tc.reads} and write layers[i].mlp, but this {arch.family} model "
                f"has no '{sub}' (its block names: {', '.join(arch.block_names(0))})."
            )
    width = model.run([[0]], capture=[f"layers.{tc.layers[0]}.mlp"]).activations[f"layers.{tc.layers[0]}.mlp"].shape[-1]
    if width != tc.d_model:
        raise TranscoderError(f"these transcoders are {tc.d_model} wide; this model's MLP outputs are {width} wide.")


# -- circuit-tracer --------------------------------------------------------------------------------


def _config(path: Path) -> dict[str, Any]:
    import yaml

    text = read_text(path / CONFIG, "a circuit-tracer transcoder config")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FileFormatError(f"{path / CONFIG} is not valid YAML ({e}).") from None
    if not isinstance(config, dict):
        raise FileFormatError(f"{path / CONFIG} holds no mapping of settings.")
    return config


def _hooks(config: dict, path: Path) -> str:
    hook_in, hook_out = config.get("feature_input_hook"), config.get("feature_output_hook")
    if hook_in not in HOOKS_IN:
        raise TranscoderError(
            f"{path / CONFIG}: feature_input_hook {hook_in!r} is not one mlxterp reads; it reads "
            f"{', '.join(HOOKS_IN)} (layers[i].ln2, layers[i].resid_mid)."
        )
    if hook_out not in HOOKS_OUT:
        raise TranscoderError(f"{path / CONFIG}: feature_output_hook {hook_out!r}: transcoders write {' or '.join(HOOKS_OUT)} (layers[i].mlp).")
    return HOOKS_IN[hook_in]


def _from_circuit_tracer(path: Path) -> Transcoders:
    config = _config(path)
    reads = _hooks(config, path)
    kind = config.get("model_kind")
    metadata = {k: config[k] for k in ("model_name", "scan") if config.get(k)}
    if kind == "cross_layer_transcoder":
        return _clt(path, reads, metadata)
    if kind not in ("transcoder_set", None):
        raise TranscoderError(f"{path / CONFIG}: model_kind {kind!r}: expected transcoder_set or cross_layer_transcoder.")
    files = config.get("transcoders")
    if files:
        paths = [Path(f) if Path(f).is_absolute() else path / f for f in files]
        layers = list(range(len(paths)))
    else:
        paths = sorted(path.glob("layer_*.safetensors"), key=_layer_order)
        layers = [_layer_order(p) for p in paths]
        missing = sorted(set(range(max(layers) + 1)) - set(layers)) if layers else []
        if missing:
            raise TranscoderError(f"{path}: layer files {', '.join(f'layer_{i}.safetensors' for i in missing)} are missing.")
    if not paths:
        raise TranscoderError(f"{path}: no layer_{{i}}.safetensors files.")
    layer_tensors = [read_safetensors(p, "a circuit-tracer transcoder layer") for p in paths]
    for p, tensors in zip(paths, layer_tensors):
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if key not in tensors:
                raise TranscoderError(f"{p}: no {key!r} tensor (a circuit-tracer transcoder has W_enc, W_dec, b_enc, b_dec).")
    thresholds = [t.get("activation_function.threshold", t.get("threshold")) for t in layer_tensors]
    skips = [t.get("W_skip") for t in layer_tensors]
    if any(s is None for s in skips) and any(s is not None for s in skips):
        raise TranscoderError(f"{path}: some layers have W_skip and some do not; a set skips on every layer or none.")
    activation = config.get("activation")
    if activation == "topk":
        kind_act, k = "topk", int(config.get("k") or layer_tensors[0].get("k", mx.array(0)).item())
    elif any(t is not None for t in thresholds):
        if any(t is None for t in thresholds):
            raise TranscoderError(f"{path}: some layers have a threshold (JumpReLU) and some do not.")
        kind_act, k = "jumprelu", None
    else:
        kind_act, k = "relu", None
    return Transcoders(
        "plt", layers, [t["W_enc"] for t in layer_tensors], [t["b_enc"] for t in layer_tensors],
        [t["W_dec"][:, None, :] for t in layer_tensors], [t["b_dec"] for t in layer_tensors],
        activation=kind_act, threshold=thresholds if kind_act == "jumprelu" else None,
        W_skip=skips if skips[0] is not None else None, k=k, reads=reads, metadata=metadata,
    )


def _clt(path: Path, reads: str, metadata: dict) -> Transcoders:
    encoders = sorted(path.glob("W_enc_*.safetensors"), key=_layer_order)
    n = len(encoders)
    if not n:
        raise TranscoderError(f"{path}: no W_enc_{{i}}.safetensors files (a circuit-tracer cross-layer transcoder).")
    W_enc, b_enc, b_dec, thresholds, W_dec = [], [], [], [], []
    for i in range(n):
        enc_path, dec_path = path / f"W_enc_{i}.safetensors", path / f"W_dec_{i}.safetensors"
        for p in (enc_path, dec_path):
            if not p.is_file():
                raise TranscoderError(f"{path}: {p.name} is missing (a CLT over {n} layers has W_enc_0..{n - 1} and W_dec_0..{n - 1}).")
        enc, dec = read_safetensors(enc_path, "a circuit-tracer CLT encoder"), read_safetensors(dec_path, "a circuit-tracer CLT decoder")
        for key, tensors, where in ((f"W_enc_{i}", enc, enc_path), (f"b_enc_{i}", enc, enc_path),
                                    (f"b_dec_{i}", enc, enc_path), (f"W_dec_{i}", dec, dec_path)):
            if key not in tensors:
                raise TranscoderError(f"{where}: no {key!r} tensor.")
        decoder = dec[f"W_dec_{i}"]
        if decoder.ndim != 3 or decoder.shape[1] != n - i:
            raise TranscoderError(
                f"{dec_path}: W_dec_{i} has shape {tuple(decoder.shape)}; a CLT over {n} layers writes from layer {i} "
                f"to {n - i} layers: expected (F, {n - i}, d)."
            )
        W_enc.append(enc[f"W_enc_{i}"])
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        thresholds.append(enc.get(f"threshold_{i}"))
        W_dec.append(decoder)
    if any(t is None for t in thresholds) and any(t is not None for t in thresholds):
        raise TranscoderError(f"{path}: some layers have threshold_{{i}} (JumpReLU) and some do not.")
    jump = thresholds[0] is not None
    return Transcoders("clt", list(range(n)), W_enc, b_enc, W_dec, b_dec, activation="jumprelu" if jump else "relu",
                       threshold=[t.reshape(-1) for t in thresholds] if jump else None, reads=reads, metadata=metadata)


def _layer_order(path: Path) -> int:
    found = re.findall(r"(\d+)", path.stem if path.suffix else path.name)
    return int(found[-1]) if found else -1


# -- SAELens ---------------------------------------------------------------------------------------


def _from_saelens(folders: list[Path]) -> Transcoders:
    from mlxterp_saes import load_sae

    saes = [load_sae(folder) for folder in folders]
    layers, reads = [], set()
    for folder, sae in zip(folders, saes):
        cfg = sae.cfg
        if cfg.architecture not in SAELENS:
            raise TranscoderError(f"{folder}: a {cfg.architecture!r} SAE, not a transcoder ({', '.join(SAELENS)}).")
        if cfg.normalize_activations != "none" or cfg.apply_b_dec_to_input:
            raise TranscoderError(f"{folder}: normalize_activations={cfg.normalize_activations!r} / apply_b_dec_to_input: transcoders here read raw inputs.")
        site_in, site_out = _parse(cfg.site, folder), _parse(cfg.site_out, folder)
        if site_out[1] != "mlp" or site_in[0] != site_out[0] or site_in[1] not in ("ln2", "resid_mid"):
            raise TranscoderError(f"{folder}: reads {cfg.site} and writes {cfg.site_out}; a transcoder here reads layers[i].ln2 or .resid_mid and writes layers[i].mlp.")
        layers.append(site_in[0])
        reads.add(site_in[1])
    if len(reads) != 1 or len({s.cfg.architecture for s in saes}) != 1 or len({s.cfg.d_sae for s in saes}) != 1:
        raise TranscoderError(f"{folders[0].parent}: the transcoder folders differ in architecture, width or the site they read; a set shares them.")
    order = sorted(range(len(saes)), key=lambda i: layers[i])
    saes, layers = [saes[i] for i in order], [layers[i] for i in order]
    arch = saes[0].cfg.architecture
    return Transcoders(
        "plt", layers, [s.W_enc.T for s in saes], [s.b_enc for s in saes], [s.W_dec[:, None, :] for s in saes],
        [s.b_dec for s in saes], activation=SAELENS[arch],
        threshold=[s.threshold for s in saes] if SAELENS[arch] == "jumprelu" else None,
        W_skip=[s.W_skip for s in saes] if "skip" in arch else None, reads=reads.pop(),
        metadata={"model_name": saes[0].cfg.model_name} if saes[0].cfg.model_name else {},
    )


def _parse(site: str | None, folder: Path) -> tuple[int, str]:
    match = re.match(r"^layers\.(\d+)\.(.+)$", site or "")
    if match is None:
        raise TranscoderError(f"{folder}: site {site!r} is not a block's standard name (layers.i....).")
    return int(match.group(1)), match.group(2)


# -- saving ----------------------------------------------------------------------------------------


def save_transcoders(tc: Transcoders, path: str | os.PathLike, layout: str = "circuit-tracer") -> Path:
    """Write ``tc`` to the folder ``path``: ``layout="circuit-tracer"`` (its per-layer or
    cross-layer layout, as it loads them with ``load_transcoder_from_hub(<folder>)``) or
    ``"saelens"`` (per-layer transcoders only: one SAELens v6 folder per layer,
    ``layer_{i}/``). Files are written atomically, the config last."""
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    if layout == "saelens":
        return _save_saelens(tc, path)
    if layout != "circuit-tracer":
        raise TranscoderError(f"layout={layout!r}: use 'circuit-tracer' or 'saelens'.")
    hook_in = next(h for h, sub in HOOKS_IN.items() if sub == tc.reads)
    config = {"model_kind": "cross_layer_transcoder" if tc.kind == "clt" else "transcoder_set",
              "feature_input_hook": hook_in, "feature_output_hook": "mlp.hook_out", **tc.metadata}
    if tc.kind == "clt":
        if tc.layers != list(range(len(tc.layers))):
            raise TranscoderError(f"circuit-tracer's CLT layout covers layers 0..n-1; these cover {tc.layers}.")
        if tc.skip:
            raise TranscoderError("circuit-tracer's CLT layout has no skip weights (its loader reads none): save a CLT without skip.")
        for i in range(len(tc.layers)):
            enc = {f"W_enc_{i}": tc.W_enc[i], f"b_enc_{i}": tc.b_enc[i], f"b_dec_{i}": tc.b_dec[i]}
            if tc.threshold is not None:
                enc[f"threshold_{i}"] = tc.threshold[i]
            _save(path / f"W_enc_{i}.safetensors", enc)
            _save(path / f"W_dec_{i}.safetensors", {f"W_dec_{i}": tc.W_dec[i]})
    else:
        if tc.activation == "topk":
            config.update(activation="topk", k=tc.k)
        for p, layer in enumerate(tc.layers):
            tensors = {"W_enc": tc.W_enc[p], "W_dec": tc.W_dec[p][:, 0], "b_enc": tc.b_enc[p], "b_dec": tc.b_dec[p]}
            if tc.threshold is not None:
                tensors["activation_function.threshold"] = tc.threshold[p]
            if tc.W_skip is not None:
                tensors["W_skip"] = tc.W_skip[p]
            _save(path / f"layer_{layer}.safetensors", tensors)
    import yaml

    write_atomic(path / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return path


def _save_saelens(tc: Transcoders, path: Path) -> Path:
    from mlxterp_saes import SAE, SAEConfig

    if tc.kind != "plt" or tc.activation == "topk":
        raise TranscoderError("the SAELens layout holds per-layer ReLU or JumpReLU transcoders; use layout='circuit-tracer' for this set.")
    arch = ("jumprelu_" if tc.activation == "jumprelu" else "") + ("skip_transcoder" if tc.skip else "transcoder")
    for p, (layer, (site_in, site_out)) in enumerate(zip(tc.layers, tc.sites())):
        weights = {"W_enc": tc.W_enc[p].T, "b_enc": tc.b_enc[p], "W_dec": tc.W_dec[p][:, 0], "b_dec": tc.b_dec[p]}
        if tc.threshold is not None:
            weights["threshold"] = tc.threshold[p]
        if tc.W_skip is not None:
            weights["W_skip"] = tc.W_skip[p]
        cfg = SAEConfig(arch, tc.d_model, tc.d_features, d_out=tc.d_model, apply_b_dec_to_input=False, site=site_in,
                        site_out=site_out, model_name=tc.metadata.get("model_name"))
        SAE(cfg, weights).save(path / f"layer_{layer}")
    return path


def _save(path: Path, tensors: dict[str, mx.array]) -> None:
    write_atomic(path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata={"format": "pt"}))
