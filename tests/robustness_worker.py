"""Run by tests/test_robustness.py in a subprocess (so a crash of the interpreter is caught as a
failure, not lost with the test run): hypothesis-generated bad input through mlxterp.

    python robustness_worker.py GROUPS EXAMPLES [real]
    GROUPS: ids,names,analyses and files,dataset,saes,lens,probes,views

Every call must either succeed or raise an MlxterpError; anything else is printed with its
input and the worker exits 1. Each case is printed (flushed) before it runs, so when the process
dies the last line names the input that killed it. At the end the model's output on a fixed
prompt must be bitwise what it was before, no probe may be left on any module, and the files
made for the file groups (a dataset, an SAE, a tuned lens, saved results: damaged only in
copies) must be byte for byte what they were.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlxterp  # noqa: E402, F401  first: it loads the optimized BLAS before anything imports mlx
import mlx.core as mx  # noqa: E402, I001
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp import interventions as iv  # noqa: E402
from mlxterp_core.errors import MlxterpError  # noqa: E402
from mlxterp_core.names import DERIVED_BLOCK_NAMES, MODEL_NAMES  # noqa: E402
from mlxterp_core.module_probes import walk_modules  # noqa: E402
from mlxterp_core.trace import active_traces  # noqa: E402
from mlxterp_core.schema import BLOCK_NAMES  # noqa: E402

GROUP, EXAMPLES = sys.argv[1], int(sys.argv[2])
REAL = len(sys.argv) > 3 and sys.argv[3] == "real"

if REAL:
    model = mlxterp.load()
else:
    from helpers import tiny_llama, train_tokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model = InterpretableModel(tiny_llama(), tokenizer=TokenizerWrapper(train_tokenizer()))
VOCAB = model.embedding_vocab_size
if os.environ.get("MLXTERP_ROBUSTNESS_SABOTAGE"):  # the test that this harness can fail
    model.__dict__["_embedding_rows"] = None  # token ids go unchecked
N_LAYERS = model.architecture.n_layers
N_HEADS = model.architecture.n_heads
REFERENCE_IDS = mx.array([[1, 5, 9, 17, 33]])
REFERENCE = model.model(REFERENCE_IDS)
mx.eval(REFERENCE)
CLASSES = [(path, type(m)) for path, m in walk_modules(model.model)]

# -- strategies ---------------------------------------------------------------------------------

edge_ids = st.sampled_from([0, VOCAB - 1, VOCAB, VOCAB + 1, -1, -VOCAB, 2**31 - 1, -(2**31), 2**31, 2**40, 2**63 - 1])
ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), edge_ids, st.integers(-(2**63), 2**63 - 1))
rows = st.lists(ids, min_size=0, max_size=6)
dtypes = st.sampled_from(["int32", "int64", "uint32", "int8", "uint8", "float32", "float16", "bool"])


@st.composite
def id_arrays(draw):
    """Token ids in every container: lists, nested lists (ragged too), mx and NumPy arrays."""
    kind = draw(st.sampled_from(["list", "nested", "mx", "numpy", "text", "texts", "other"]))
    if kind == "list":
        return draw(rows)
    if kind == "nested":
        return draw(st.lists(rows, min_size=0, max_size=3))
    if kind == "text":
        return draw(st.text(max_size=12))
    if kind == "texts":
        return draw(st.lists(st.text(max_size=8), min_size=0, max_size=3))
    if kind == "other":
        return draw(st.sampled_from([None, 3, 2.5, {"ids": [1]}, b"bytes", [[1, 2], "a"], [1.5, 2], [[[1]]]]))
    shape = draw(st.sampled_from([(0,), (4,), (1, 5), (2, 3), (3, 1), (1, 0), (1, 2, 2), ()]))
    dtype = np.dtype(draw(dtypes))
    values = draw(st.lists(ids, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    if dtype.kind in "iu":  # wrap into the dtype's range, as a cast would
        info = np.iinfo(dtype)
        values = [(v - int(info.min)) % (int(info.max) - int(info.min) + 1) + int(info.min) for v in values]
        array = np.array(values, dtype=dtype)
    else:
        with np.errstate(over="ignore"):
            array = np.array(values, dtype=np.float64).astype(dtype)
    array = array.reshape(shape)
    return array if kind == "numpy" else mx.array(array)


layer_numbers = st.one_of(st.integers(-N_LAYERS - 2, N_LAYERS + 2), st.sampled_from(["*", "x", "1.5", "-0"]))
block_subs = st.sampled_from(sorted({*BLOCK_NAMES, *DERIVED_BLOCK_NAMES, "mlp.nonsense", "attn.q.x", ""}))
raw_modules = st.sampled_from(["", ".self_attn", ".self_attn.q_proj", ".mlp", ".mlp.down_proj", ".input_layernorm", ".nope"])


@st.composite
def names(draw):
    """Names from the grammar: standard (brackets or dots), TransformerLens, nnterp, raw, junk."""
    layer = draw(layer_numbers)
    kind = draw(st.sampled_from(["bracket", "dots", "model", "tl", "nnterp", "raw", "glob", "junk"]))
    sub = draw(block_subs)
    if kind == "bracket":
        return f"layers[{layer}]" + (f".{sub}" if sub else "")
    if kind == "dots":
        return f"layers.{layer}" + (f".{sub}" if sub else "")
    if kind == "model":
        return draw(st.sampled_from(sorted(MODEL_NAMES)))
    if kind == "tl":
        hook = draw(st.sampled_from(["hook_resid_pre", "hook_resid_post", "attn.hook_z", "attn.hook_q", "attn.hook_pattern", "mlp.hook_post", "hook_nope"]))
        return f"blocks.{layer}.{hook}"
    if kind == "nnterp":
        return f"{draw(st.sampled_from(['layers_output', 'attentions_output', 'mlps_output', 'layers_input']))}.{layer}"
    if kind == "raw":
        suffix = draw(st.sampled_from(["", "#1", "#0", ":input", ":pattern", "#2:input", ":output"]))
        return f"model.model.layers.{layer}{draw(raw_modules)}{suffix}"
    if kind == "glob":
        return draw(st.sampled_from(["model.model.layers.*.mlp", "model.*.q_proj", "layers.*.attn", "model.zzz*", "*"]))
    return draw(st.text(max_size=16))


def _replies():
    """What an intervention returns: right, wrong shape, wrong dtype, not an array, or raises."""

    def reply(kind):
        def fn(x):
            if kind == "same":
                return x
            if kind == "zeros":
                return mx.zeros_like(x)
            if kind == "nan":
                return x * float("nan")
            if kind == "cast":
                return x.astype(mx.int32 if mx.issubdtype(x.dtype, mx.floating) else mx.float32)
            if kind == "half":
                return x.astype(mx.float16)
            if kind == "shorter":
                return x[..., :-1]
            if kind == "sum":
                return x.sum()
            if kind == "bigger":
                return mx.zeros((*x.shape, 2), dtype=x.dtype)
            if kind == "numpy":
                return np.zeros(x.shape, dtype=np.float32)
            if kind == "none":
                return None
            if kind == "number":
                return 3.0
            raise RuntimeError("an intervention that fails")

        fn.__name__ = f"reply_{kind}"
        return fn

    kinds = ["same", "zeros", "nan", "cast", "half", "shorter", "sum", "bigger", "numpy", "none", "number", "raise"]
    plain = st.sampled_from(kinds).map(reply)
    index = st.one_of(st.none(), st.integers(-8, 8), st.lists(st.integers(-8, 8), max_size=3))
    library = st.sampled_from([iv.zero_out, iv.scale(2.0), iv.clamp(-1.0, 1.0), iv.noise(0.1)])
    restricted = st.builds(lambda f, p, h, r: f.at(positions=p, heads=h, rows=r), library, index, index, index)
    return st.one_of(plain, library, restricted)


replies = _replies()

# -- the property -------------------------------------------------------------------------------


TALLY = {"succeeded": 0, "refused": 0}


def attempt(label: str, call) -> None:
    print(label[:300], flush=True)
    try:
        result = call()
        if isinstance(result, mx.array):
            mx.eval(result)
    except MlxterpError as e:
        TALLY["refused"] += 1
        print(f"  -> {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    except Exception:
        print(f"NOT AN MlxterpError for {label[:1000]}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        raise
    TALLY["succeeded"] += 1


good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
texts = st.one_of(good_ids, good_ids, st.text(min_size=1, max_size=10), st.text(max_size=10), id_arrays())
options = st.one_of(st.none(), st.none(), st.integers(-3, 3), st.integers(-12, 12), st.sampled_from([0, 10**6, -(10**6), 2.5, "all", "x", True, [], [0, -1], [99], (0, 1), [1.5]]))
metrics = st.sampled_from([
    None,
    lambda lg: lg[:, -1, 0] - lg[:, -1, 1],
    lambda lg: lg.sum(),
    lambda lg: lg[:, -1],
    lambda lg: 1.0,
    lambda lg: (lg[:, -1, 0] > 0),
    lambda lg: lg[:, -1, :2].astype(mx.int32).sum(-1),
])


@st.composite
def analysis_calls(draw):
    """(label, call) of one analysis with random options."""
    name = draw(st.sampled_from([
        "logit_lens", "activation_patching", "attribution_patching", "steering_vector", "generate",
        "decompose_resid", "accumulated_resid", "direct_logit_attribution", "attention_patterns",
        "get_token_predictions",
    ]))
    a, b = draw(texts), draw(texts)
    o1, o2, o3 = draw(options), draw(options), draw(options)
    if name == "logit_lens":
        kwargs = dict(layers=o1, top_k=o2)
        call = lambda: model.logit_lens(a, **kwargs)  # noqa: E731
    elif name == "activation_patching":
        kwargs = dict(
            component=draw(st.sampled_from(["mlp", "attn", "resid", "resid_pre", "resid_mid", "heads", "x"])),
            layers=o1, positions=o2, heads=draw(st.booleans()), metric=draw(metrics),
            answers=draw(st.sampled_from([None, (1, 2), (0, VOCAB), (-1, 3), (1,), ("a", "b"), (1.5, 2)])),
            align=draw(st.sampled_from([None, "start", "end", "mid"])),
        )
        call = lambda: model.activation_patching(a, b, **kwargs)  # noqa: E731
    elif name == "attribution_patching":
        kwargs = dict(
            components=draw(st.sampled_from([("resid",), ("heads", "mlp"), (), "attn", ("nope",)])),
            layers=o1, metric=draw(metrics), answers=draw(st.sampled_from([None, (1, 2), (VOCAB, 0)])),
            align=draw(st.sampled_from([None, "start", "end"])),
        )
        call = lambda: model.attribution_patching(a, b, **kwargs)  # noqa: E731
    elif name == "steering_vector":
        many = draw(st.sampled_from(["one", "list", "empty"]))
        pos = a if many == "one" else [a, b] if many == "list" else []
        kwargs = dict(layer=o1, position=draw(st.sampled_from(["last", "mean", "first", 0])),
                      component=draw(st.sampled_from(["output", "attn", "mlp", "nope"])))
        call = lambda: model.steering_vector(pos, b, **kwargs)  # noqa: E731
    elif name == "generate":
        kwargs = dict(
            max_tokens=draw(st.one_of(st.integers(-3, 3), st.sampled_from([2.5, None, "2"]))),
            temperature=draw(st.sampled_from([0.0, 0.7, -1.0, float("nan"), float("inf"), "hot"])),
            top_p=draw(st.sampled_from([1.0, 0.5, 0.0, 1.5, -0.1])),
            seed=draw(st.sampled_from([None, 0, -1, 2.5])),
            intervene_on=draw(st.sampled_from(["all", "generated", "prompt", "none"])),
            interventions=draw(st.one_of(st.none(), st.dictionaries(names(), replies, max_size=1))),
        )
        call = lambda: model.generate(a, **kwargs)  # noqa: E731
    elif name in ("decompose_resid", "accumulated_resid"):
        kwargs = dict(layer=o1)
        call = lambda: getattr(model, name)(a, **kwargs)  # noqa: E731
    elif name == "direct_logit_attribution":
        kwargs = dict(position=draw(st.one_of(st.integers(-8, 8), st.sampled_from([2.5, "x"]))),
                      answers=draw(st.sampled_from([None, (1, 2), (VOCAB, 0), (-3, 1)])), heads=draw(st.booleans()))
        call = lambda: model.direct_logit_attribution(a, **kwargs)  # noqa: E731
    elif name == "attention_patterns":
        kwargs = dict(layer=o1 if o1 is not None else 0, heads=o2)
        call = lambda: model.attention_patterns(a, **kwargs)  # noqa: E731
    else:
        hidden = draw(st.sampled_from([(64,), (2, 64), (63,), (0,), (), (1, 5, 64)]))
        kwargs = dict(top_k=o1 if o1 is not None else 5)
        array = mx.ones(hidden) if hidden else mx.array(1.0)
        call = lambda: model.get_token_predictions(array, **kwargs)  # noqa: E731
    return f"{name}({a!r:.60}, {b!r:.60}, {kwargs})", call


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@SETTINGS
@given(st.sampled_from(["run", "trace", "call", "generate"]), id_arrays())
def ids_group(how, inputs):
    label = f"{how}({type(inputs).__name__} {getattr(inputs, 'dtype', '')} {inputs!r:.200})"
    if how == "run":
        attempt(label, lambda: model.run(inputs, capture=["logits"]).output)
    elif how == "trace":
        def traced():
            with model.trace(inputs) as tr:
                return tr.output
        attempt(label, traced)
    elif how == "call":
        attempt(label, lambda: model(inputs))
    else:
        attempt(label, lambda: model.generate(inputs, max_tokens=2).tokens)


@SETTINGS
@given(st.lists(names(), min_size=1, max_size=3), st.dictionaries(names(), replies, max_size=2), names())
def names_group(capture, interventions, lookup):
    label = f"run(capture={capture}, interventions={ {k: getattr(v, '__name__', repr(v)) for k, v in interventions.items()} }, lookup={lookup!r})"

    def call():
        tr = model.run([[1, 5, 9, 17]], interventions=interventions, capture=capture)
        for name in capture:
            tr.activations[name] if name in tr.activations else None
        return tr.activations[lookup]

    attempt(label, call)


@SETTINGS
@given(analysis_calls())
def analyses_group(case):
    label, call = case
    attempt(label, call)


from robustness_files import file_groups  # noqa: E402

FILE_GROUPS, unchanged = file_groups(model, attempt, SETTINGS, names)

try:
    for group in GROUP.split(","):
        {"ids": ids_group, "names": names_group, "analyses": analyses_group, **FILE_GROUPS}[group]()
except Exception as e:
    print(f"FAILED: {type(e).__name__}: {e}"[:2000], flush=True)
    sys.exit(1)

changed = unchanged()
if changed:
    print(f"FAILED: files that existed before were changed: {changed[:5]}", flush=True)
    sys.exit(1)

after = model.model(REFERENCE_IDS)
if not (after.dtype == REFERENCE.dtype and mx.array_equal(after, REFERENCE).item()):
    print("FAILED: the model's output changed after the bad inputs", flush=True)
    sys.exit(1)
left = [(path, cls.__name__, type(m).__name__) for (path, cls), (_, m) in zip(CLASSES, walk_modules(model.model)) if type(m) is not cls]
if left or active_traces(model):
    print(f"FAILED: probes or traces left behind: {left[:3]} {active_traces(model)}", flush=True)
    sys.exit(1)
print(f"OK {GROUP}: {EXAMPLES} examples, calls {TALLY}", flush=True)
