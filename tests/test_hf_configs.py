"""A Hugging Face folder loads the same whichever transformers version saved its config.json.

transformers 5 keeps RoPE settings only under ``rope_parameters`` and renames or drops keys
that mlx-lm reads (``n_ctx``, ``num_experts``, ``num_layers``, ``rotary_pct``, ...). Each test
writes the same tiny random weights twice, once with the config as mlx-lm (and transformers 4)
write it and once as transformers 5 writes it, and requires the same logits from both.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import bitwise_equal, family_config, family_names, tiny_family

import mlxterp
from mlxterp import MlxterpError
from mlxterp_loaders.hf_config import legacy_keys

IDS = mx.array([[5, 17, 3, 42, 9, 77, 1, 30, 64, 11]])
# A RoPE base no family defaults to, so a config whose base is lost cannot pass by luck.
# (OLMo 3: transformers 5 converts a single rope_theta into per-layer-type settings and gives the
# sliding-window layers its default, 5e5, instead; with 5e5 both agree. Other values are refused,
# see test_a_rope_mlx_lm_cannot_build_is_refused.)
BASE = {"olmo3": 500000.0}
# transformers has no such model type
NOT_IN_TRANSFORMERS = {"internlm2"}


def write_folder(path, module, config: dict, tokenizer) -> None:
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(nn.utils.tree_flatten(module.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)


def rope_overrides(family: str) -> dict:
    config = family_config(family)
    fields = {f.name for f in dataclasses.fields(importlib.import_module(f"mlx_lm.models.{config['module']}").ModelArgs)}
    return {k: BASE.get(family, 50000.0) for k in ("rope_theta", "rotary_emb_base") if k in fields}


def as_transformers_5_saves_it(legacy: dict) -> dict:
    """The config.json transformers (5, as installed) writes for a legacy config."""
    from transformers import AutoConfig

    args = dict(legacy)
    config = AutoConfig.for_model(args.pop("model_type"), **args).to_dict()
    config.pop("n_ctx", None)  # transformers 5's GPT2Config has no n_ctx: a config made there lacks it
    return config


@pytest.mark.parametrize("family", [f for f in family_names() if f not in NOT_IN_TRANSFORMERS])
def test_transformers_5_config_loads_the_same_model(tmp_path, hf_tokenizer, family):
    overrides = rope_overrides(family)
    module = tiny_family(family, **overrides)
    legacy = {**family_config(family)["args"], **overrides}
    new = as_transformers_5_saves_it(legacy)
    write_folder(tmp_path / "legacy", module, legacy, hf_tokenizer)
    write_folder(tmp_path / "new", module, new, hf_tokenizer)
    # kernels=False: compare with mlx-lm's own forward bit for bit (mlxterp's CPU SiLU is within
    # float tolerance of it, not bitwise; tests/test_cpu_kernels.py checks that)
    old_style, new_style = (mlxterp.load(tmp_path / d, kernels=False) for d in ("legacy", "new"))
    assert bitwise_equal(old_style.model(IDS), module(IDS))
    assert bitwise_equal(new_style.model(IDS), module(IDS))
    # and as loaded by default, both styles are still the same model
    default_old, default_new = (mlxterp.load(tmp_path / d) for d in ("legacy", "new"))
    assert bitwise_equal(default_old.model(IDS), default_new.model(IDS))
    if "rope_parameters" in new:
        assert "transformers 5 keys" in new_style.load_report["config"]
    assert "config" not in old_style.load_report  # a legacy config is read as it is


# transformers 5 configs written out by hand, as it saves them (independent of the installed
# transformers), with the keys mlx-lm reads that they lack
HAND_WRITTEN = {
    "gpt2": ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 3, "n_positions": 32,
              "layer_norm_epsilon": 1e-5, "vocab_size": 128, "transformers_version": "5.24.0"},
             {"n_ctx": 32}),
    "gpt_neox": ({"model_type": "gpt_neox", "max_position_embeddings": 64, "hidden_size": 64,
                  "num_attention_heads": 4, "num_hidden_layers": 3, "layer_norm_eps": 1e-5,
                  "vocab_size": 128, "use_parallel_residual": True,
                  "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 50000, "rope_type": "default"}},
                 {"rotary_emb_base": 50000, "rotary_pct": 0.25}),
    "gemma3_text": ({"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 3,
                     "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 24, "rms_norm_eps": 1e-6, "vocab_size": 128, "query_pre_attn_scalar": 32,
                     "sliding_window": 4, "max_position_embeddings": 512,
                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                     "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
                    {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "type": "linear"},
                     "rope_local_base_freq": 1e4, "sliding_window_pattern": 2}),
    "qwen3_moe": ({"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 96,
                   "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
                   "num_local_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "norm_topk_prob": True, "rms_norm_eps": 1e-6, "vocab_size": 128, "max_position_embeddings": 512,
                   "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 50000, "rope_type": "default"}},
                  {"rope_theta": 50000, "num_experts": 4}),
}


@pytest.mark.parametrize("family", sorted(HAND_WRITTEN))
def test_hand_written_transformers_5_configs(tmp_path, hf_tokenizer, family):
    new, added = HAND_WRITTEN[family]
    assert legacy_keys(new) == added
    module = tiny_family(family, **added)  # the tiny model's config, with the values written above
    write_folder(tmp_path / "new", module, new, hf_tokenizer)
    assert bitwise_equal(mlxterp.load(tmp_path / "new", kernels=False).model(IDS), module(IDS))


def test_a_legacy_config_gains_nothing():
    for family in family_names():
        assert legacy_keys(family_config(family)["args"]) == {}, family


def test_a_rope_mlx_lm_cannot_build_is_refused(tmp_path, hf_tokenizer):
    module = tiny_family("olmo3", rope_theta=50000.0)
    config = {**family_config("olmo3")["args"]}
    config.pop("rope_theta")
    config["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    write_folder(tmp_path / "olmo3", module, config, hf_tokenizer)
    with pytest.raises(MlxterpError, match=r"rope_parameters\.sliding_attention\.rope_theta is 500000.0"):
        mlxterp.load(tmp_path / "olmo3")


def test_a_missing_required_key_is_named(tmp_path, hf_tokenizer):
    module = tiny_family("glm4")
    config = {**family_config("glm4")["args"]}
    del config["partial_rotary_factor"]
    write_folder(tmp_path / "glm4", module, config, hf_tokenizer)
    with pytest.raises(MlxterpError, match=r"no 'partial_rotary_factor', which mlx-lm's mlx_lm\.models\.glm4\.ModelArgs requires"):
        mlxterp.load(tmp_path / "glm4")
