"""Steering: a direction from contrastive prompts, added while the model runs or generates.

``steering_vector`` is the difference of mean activations (Turner et al.'s activation
addition; Rimsky et al.'s contrastive activation addition with several prompts per side) at a
standard-name site, by default the residual stream leaving a layer. ``generate`` runs mlx-lm's
KV-cache decoding with interventions applied at every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import attrs
import mlx.core as mx

from mlxterp.plugin import OptionError, options
from mlxterp.plugin import Activations, Hooks

from .results import GenerationResult, SteeringVector
from mlxterp.plugin import ids_text, token_ids


def steering_vector(
    model,
    positive: str | Sequence[str],
    negative: str | Sequence[str],
    layer: int,
    position: str = "last",
    component: str = "output",
) -> SteeringVector:
    """mean(activation on positive prompts) - mean(activation on negative prompts).

    Args:
        positive: a prompt or a list of prompts.
        negative: a prompt or a list of prompts.
        layer: the layer whose ``component`` is read.
        position: "last" (each prompt's last real token) or "mean" (its mean over real tokens).
        component: a block-level standard name; "output" is the residual stream leaving the layer.
    """
    layer = options.layer(layer, model.architecture_or_raise("steering vectors").n_layers)
    position = options.choice(position, ("last", "mean"), "position")
    name = f"layers.{layer}.{component}"
    positive, negative = options.prompts(positive, "positive"), options.prompts(negative, "negative")
    pos, neg = _summaries(model, positive, name, position), _summaries(model, negative, name, position)
    vector = pos.mean(axis=0) - neg.mean(axis=0)
    unit = vector / (mx.linalg.norm(vector) + 1e-12)
    return SteeringVector(
        name=name,
        layer=layer,
        position=position,
        vector=vector.tolist(),
        positive=[p if isinstance(p, str) else ids_text(model, p) for p in positive],
        negative=[p if isinstance(p, str) else ids_text(model, p) for p in negative],
        positive_projections=(pos @ unit).tolist(),
        negative_projections=(neg @ unit).tolist(),
    )


def _summaries(model, prompts: list[str], name: str, position: str) -> mx.array:
    """(N, D) float32: one vector per prompt, from a single right-padded batch."""
    trace = model.run(prompts, capture=[name])
    acts = trace.activations[name].astype(mx.float32)  # (N, T, D)
    lengths = mx.array(trace.lengths)
    if position == "last":
        return acts[mx.arange(acts.shape[0]), lengths - 1]
    mask = trace.mask[..., None].astype(mx.float32)
    return (acts * mask).sum(axis=1) / lengths[:, None]


@attrs.frozen
class GenerationStep:
    """One generated token, streamed: its id, the text it adds, and the activations captured
    in the forward pass whose logits it was sampled from."""

    token: int
    text: str
    activations: Activations | None = None


def generate(
    model,
    prompt: str | Sequence[int],
    max_tokens: int = 50,
    interventions: Mapping[str, Callable] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    intervene_on: str = "all",
    capture: list[str] | None = None,
    stream: bool = False,
    stop_at_eos: bool = True,
    saes: Any = None,
    max_new_tokens: int | None = None,
    transcoders: Any = None,
) -> GenerationResult | Iterator[GenerationStep]:
    """Generate with mlx-lm's KV cache, with ``interventions`` applied in every forward pass.

    Args:
        prompt: a string or token ids (apply the tokenizer's chat template yourself for chat).
        interventions: as for ``trace``; applied to the prompt and every generated token
            (``intervene_on="all"``), only to ``"generated"`` tokens, or only to the ``"prompt"``.
            After the prompt each pass sees one token, so ``.at(positions=...)`` is meaningful
            only with ``intervene_on="prompt"``.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling threshold.
        seed: seed of MLX's random state before sampling.
        capture: names to record in every pass; ``result.activations[k]`` is the pass whose
            logits token k was sampled from.
        stream: return an iterator of GenerationStep instead of the finished result.
        saes: splices (SAEs, transcoders) in every pass, as in ``with model.saes(...)``;
            ``transcoders`` is the same argument.
        max_new_tokens: the same as ``max_tokens`` (Hugging Face's and TransformerLens's name).
    """
    if max_new_tokens is not None:
        if max_tokens != 50 and max_tokens != max_new_tokens:
            raise OptionError(f"max_tokens={max_tokens} and max_new_tokens={max_new_tokens} disagree: give one of them.")
        max_tokens = max_new_tokens
    intervene_on = options.choice(intervene_on, ("all", "generated", "prompt"), "intervene_on")
    max_tokens = options.integer(max_tokens, "max_tokens", 0)
    temperature = options.number(temperature, "temperature", 0.0)
    top_p = options.number(top_p, "top_p", 0.0, 1.0, open_low=True)
    seed = None if seed is None else options.integer(seed, "seed", 0)
    prompt_ids = token_ids(model, prompt)
    steps = _steps(model, prompt_ids, max_tokens, interventions, temperature, top_p, seed, intervene_on, capture, stop_at_eos,
                   [saes, transcoders])
    if stream:
        return steps
    collected = list(steps)
    tokens = [step.token for step in collected]
    return GenerationResult(
        prompt=prompt if isinstance(prompt, str) else ids_text(model, prompt_ids),
        prompt_tokens=prompt_ids,
        tokens=tokens,
        text=ids_text(model, tokens) if tokens else "",
        finish_reason="length" if len(tokens) == max_tokens else "stop",
        activations=[step.activations for step in collected if step.activations is not None],
    )


def _steps(model, ids, max_tokens, interventions, temperature, top_p, seed, intervene_on, capture, stop_at_eos, saes=None):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    cache = make_prompt_cache(model.model)
    hooks = Hooks(model, interventions, capture or [], saes=saes)  # Hooks' None would record every site
    eos = _eos_ids(model.tokenizer) if stop_at_eos else set()
    edit_prompt, edit_generated = intervene_on in ("all", "prompt"), intervene_on in ("all", "generated")
    edited = False

    def step(tokens: mx.array, edit: bool):
        """Build one pass and start computing it; its sampled token (1,) and records, lazy.
        Probes are installed for each pass and removed after it: an abandoned stream never
        leaves the model probed."""
        with hooks:
            logits, recorded = hooks(tokens, cache=cache, edit=edit, evaluate=False)
        last = logits[:, -1].astype(mx.float32)
        token = sampler(last - mx.logsumexp(last, axis=-1, keepdims=True))
        mx.async_eval(token, [v for v in recorded.values() if isinstance(v, mx.array)])
        return token, recorded

    token, recorded = step(mx.array([ids]), edit_prompt)
    edited |= edit_prompt
    generated: list[int] = []
    text = ""
    for count in range(max_tokens):
        if count + 1 < max_tokens:  # build the next pass while this one computes, as mlx-lm does
            following = step(token[None], edit_generated)
            edited |= edit_generated
        value = token.item()
        if value in eos:
            break
        generated.append(value)
        new_text = ids_text(model, generated)
        yield GenerationStep(value, new_text[len(text):], Activations(dict(recorded), model) if capture else None)
        text = new_text
        if count + 1 == max_tokens:
            break
        token, recorded = following
    if interventions and edited:
        hooks.check_reached()


def _eos_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return ids
