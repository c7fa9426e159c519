"""The robustness worker's groups for what reads and writes files and trains: activation datasets,
SAEs, tuned lenses, probes and the HTML views, with hypothesis-generated arguments and files
damaged in every way (cut, emptied, deleted, bytes flipped or replaced, JSON values and
safetensors headers rewritten). Used by tests/robustness_worker.py (see there).

The files are made once, on first use, in a scratch folder; a damaged file is always a copy.
``unchanged()`` lists the made files whose bytes changed (it must be empty at the end)."""

from __future__ import annotations

import atexit
import json
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np
from helpers import CORPUS
from hypothesis import given
from hypothesis import strategies as st

TEXTS = CORPUS * 2
SITE = "layers.1.output"

# values an option may be given: right, out of range, of the wrong kind
junk = st.sampled_from([None, -1, 0, 1, 2, 3, 7, 10**9, -(10**9), 0.5, -0.5, 2.5, float("nan"), float("inf"), "x", "",
                        True, False, [], [0], [1, 0], (1,), {}, b"b"])
small = st.one_of(st.integers(-2, 9), junk)
fractions = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0, -0.1, 1.5, float("nan")]), junk)
flags = st.one_of(st.booleans(), junk)
texts = st.one_of(st.just(TEXTS[:4]), st.lists(st.text(max_size=12), max_size=4), st.sampled_from(["", "text", TEXTS[0]]), junk)


def mostly(valid, bad=junk):
    """A valid value three times in four, else a bad one: enough calls get past the checks."""
    return st.one_of(valid, valid, valid, bad)


def float_arrays(width: int):
    """Arrays of activations: the right width or not, of any dtype and rank, or not arrays."""
    shapes = st.sampled_from([(width,), (2, width), (1, 3, width), (width - 1,), (2, width + 1), (0, width), (), (0,)])
    dtypes = st.sampled_from([mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.bool_])

    def build(shape, dtype, scale):
        return (mx.random.normal(shape, key=mx.random.key(1)) * scale).astype(dtype) if shape else mx.array(scale).astype(dtype)

    arrays = st.builds(build, shapes, dtypes, st.sampled_from([1.0, 1e30, float("nan")]))
    return st.one_of(arrays, arrays, st.builds(np.ones, st.sampled_from([(width,), (3, width)])), junk)


def file_groups(model, attempt: Callable, settings, names) -> tuple[dict[str, Callable], Callable[[], list[str]]]:
    """{group name: hypothesis test} and ``unchanged`` for the worker's ``model`` and ``attempt``."""
    made: dict = {}
    scratch = Path(tempfile.mkdtemp(prefix="mlxterp-robustness-out-"))

    @atexit.register
    def remove_the_files() -> None:
        for folder in (scratch, made.get("root")):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def things() -> dict:
        """The dataset, SAE, lens and results, and their files (made on first use)."""
        if made:
            return made
        from mlxterp_lenses import TunedLens
        from mlxterp_saes import SAE, SAEConfig, save_sae

        root = Path(tempfile.mkdtemp(prefix="mlxterp-robustness-"))
        dataset = model.cache_activations(TEXTS, ["layers[1]", "layers[2].mlp"], root / "dataset", context_size=8,
                                          batch_size=2, shard_tokens=24, progress=False)
        key = mx.random.key(0)
        weights = {"W_enc": mx.random.normal((64, 32), key=key) * 0.1, "b_enc": mx.zeros((32,)),
                   "W_dec": mx.random.normal((32, 64), key=key) * 0.1, "b_dec": mx.zeros((64,))}
        sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, site=SITE), weights)
        save_sae(sae, root / "sae", sparsity=mx.full((32,), -2.0))
        lens = TunedLens.for_model(model)
        for translator in lens.layer_translators:
            translator.weight = mx.random.normal(translator.weight.shape, key=key) * 0.01
        lens.save(root / "lens")
        (root / "results").mkdir()
        results = {
            "lens": model.logit_lens(TEXTS[0], top_k=3),
            "patching": model.activation_patching([1, 5, 9, 17, 3], [1, 5, 8, 17, 3], component="resid", answers=(1, 2), progress=False),
            "attention": model.attention_patterns(TEXTS[0], layer="all"),
            "tuned": model.tuned_lens(TEXTS[0], lens),
            "probe": model.probe(TEXTS[:6], [1, 0, 1, 0, 1, 0], test_fraction=0.5),
            "examples": sae.top_activations(model, TEXTS[:4], [0, 1], context_size=8, progress=False),
        }
        for name, result in results.items():
            result.save(root / "results" / f"{name}.json")
        made.update(root=root, dataset=dataset, sae=sae, lens=lens, results=results,
                    pristine={str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()})
        return made

    def unchanged() -> list[str]:
        if not made:
            return []
        now = {str(p): p.read_bytes() for p in made["root"].rglob("*") if p.is_file()}
        return sorted(k for k in made["pristine"].keys() | now.keys() if made["pristine"].get(k) != now.get(k))

    def out(draw_name: str) -> Path:
        """A fresh folder for what a call writes."""
        return Path(tempfile.mkdtemp(prefix=f"{draw_name}-", dir=scratch))

    # -- damaged files ---------------------------------------------------------------------------

    def damage(path: Path, how: str, seed: int) -> None:
        rng = random.Random(seed)
        data = path.read_bytes() if path.exists() else b""
        if how == "delete":
            path.unlink(missing_ok=True)
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "truncate":
            path.write_bytes(data[: rng.randrange(len(data) or 1)])
        elif how == "append":
            path.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        elif how == "junk":
            path.write_bytes(bytes(rng.randrange(256) for _ in range(len(data))))
        elif how == "json" and path.suffix in (".json", ".jsonl"):
            lines = data.decode().splitlines() if path.suffix == ".jsonl" else [data.decode()]
            k = rng.randrange(len(lines))
            lines[k] = json.dumps(mutate(json.loads(lines[k]), rng))
            path.write_text("\n".join(lines) + "\n")
        elif how == "json" and path.suffix == ".safetensors":  # a header that parses, with other values
            (length,) = struct.unpack("<Q", data[:8])
            header = mutate(json.loads(data[8 : 8 + length]), rng)
            text = json.dumps(header).encode()
            path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
        else:  # flip a few bytes
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 9)):
                if flipped:
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(flipped))

    def mutate(value, rng: random.Random):
        """``value`` (parsed JSON) with one value somewhere in it replaced by another of any kind."""
        replacements = [None, 0, -1, 1, 2**40, 1.5, -1e300, "", "F32", "x", [], [0, 1], [2**40], {}, True]
        containers = [value] if isinstance(value, (dict, list)) and value else []
        while containers:
            node = containers.pop(rng.randrange(len(containers)))
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = rng.choice(keys)
            child = node[key]
            if isinstance(child, (dict, list)) and child and rng.random() < 0.7:
                containers.append(child)
                continue
            node[key] = rng.choice(replacements)
            return value
        return rng.choice(replacements)

    def read(kind: str, folder: Path):
        from mlxterp import ActivationDataset, load_sae
        from mlxterp_analyses import LogitLensResult, PatchingResult
        from mlxterp_lenses import TunedLens
        from mlxterp_probes import ProbeSweep
        from mlxterp_saes import FeatureExamples

        if kind == "dataset":
            ds = ActivationDataset(folder)
            for site in ds.sites:
                mx.eval(ds[site][:], ds[site][[0, -1]])
            ds.tokens, ds.bos, ds.offset
            mx.eval(list(islice(ds.batches(ds.sites[0], 4), 3)))
            mx.eval(list(ds.load_shard(len(ds.shards) - 1).values()))
            return ds.verify()
        if kind == "sae":
            sae = load_sae(folder, model=model)
            return sae(mx.ones((2, sae.cfg.d_in)))
        if kind == "lens":
            return model.tuned_lens(TEXTS[0], TunedLens.load(folder, model=model))
        for cls, name in ((LogitLensResult, "lens"), (PatchingResult, "patching"), (ProbeSweep, "probe"),
                          (FeatureExamples, "examples")):
            result = cls.load(folder / f"{name}.json")
            repr(result)
            if hasattr(result, "to_html"):
                result.to_html(out("html") / "view.html")
        return None

    FILES = [("dataset", name) for name in ("manifest.json", "cache.json", "journal-rank0.jsonl", "shard-000000.safetensors",
                                            "shard-000001.safetensors")]
    FILES += [("sae", name) for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")]
    FILES += [("lens", "config.json"), ("lens", "params.safetensors")]
    FILES += [("results", f"{name}.json") for name in ("lens", "patching", "probe", "examples")]
    hows = st.sampled_from(["delete", "empty", "truncate", "append", "junk", "json", "json", "json", "flip"])

    @settings
    @given(st.sampled_from(FILES), hows, st.integers(0, 2**32))
    def files_group(file, how, seed):
        kind, name = file
        copy = out(kind) / kind
        shutil.copytree(things()["root"] / kind, copy)
        damage(copy / name, how, seed)
        attempt(f"read {kind} with {name} damaged: {how} (seed {seed})", lambda: read(kind, copy))

    # -- datasets --------------------------------------------------------------------------------

    indices = st.one_of(
        st.integers(-200, 200), st.sampled_from([2**40, -(2**40), np.int64(3), np.uint8(2), Ellipsis, None, "0", 1.5, (0, 1), ()]),
        st.builds(slice, small, small, st.one_of(st.none(), st.integers(-3, 3))),
        st.lists(st.integers(-200, 200), max_size=5),
        st.builds(lambda n, dtype: np.arange(n).astype(dtype), st.integers(0, 6), st.sampled_from(["int32", "int64", "uint16", "float32", "bool"])),
        st.builds(lambda n: mx.arange(n), st.integers(0, 4)),
    )

    @st.composite
    def dataset_calls(draw):
        from mlxterp import probes

        ds = things()["dataset"]
        kind = draw(st.sampled_from(["rows", "rows", "batches", "batches", "shard", "site", "open", "probe", "cache"]))
        if kind == "rows":
            site, index = draw(st.one_of(st.sampled_from(ds.sites + ["tokens", "bos"]), names())), draw(indices)
            return f"ds[{site!r}][{index!r:.80}]", lambda: ds[site][index]
        if kind == "batches":
            site = draw(st.one_of(st.sampled_from(ds.sites), names()))
            options = {k: draw(v) for k, v in (("shuffle", flags), ("seed", small),
                                               ("skip_bos", flags), ("skip_first", flags), ("buffer_rows", small),
                                               ("drop_last", flags), ("with_index", flags)) if draw(st.booleans())}
            size = draw(small)
            return f"ds.batches({site!r}, {size!r}, {options})", lambda: mx.eval([b for b in islice(ds.batches(site, size, **options), 3)])
        if kind == "shard":
            k = draw(small)
            return f"ds.load_shard({k!r})", lambda: mx.eval(list(ds.load_shard(k).values()))
        if kind == "site":
            name = draw(names())
            return f"ds.site_info({name!r})", lambda: ds.site_info(name)
        if kind == "open":
            from mlxterp import ActivationDataset

            path = draw(st.sampled_from([str(things()["root"] / "sae"), str(things()["root"] / "results" / "lens.json"), "",
                                         "/nonexistent/folder", str(scratch)]))
            return f"ActivationDataset({path!r})", lambda: ActivationDataset(path)
        if kind == "probe":
            labels = draw(st.one_of(st.just([i % 2 for i in range(len(TEXTS) * 2)]), st.lists(st.integers(-1, 2), max_size=30), junk))
            options = {k: draw(v) for k, v in (("sites", st.one_of(st.none(), st.lists(names(), max_size=2), junk)),
                                               ("position", st.one_of(st.sampled_from(["last", "mean", "all"]), junk)),
                                               ("method", st.one_of(st.sampled_from(["logistic", "mass_mean"]), junk)),
                                               ("l2", st.one_of(st.just(0.01), junk)), ("test_fraction", fractions),
                                               ("seed", small)) if draw(st.booleans())}
            return f"probe_dataset(ds, {labels!r:.60}, {options})", lambda: probes.probe_dataset(ds, labels, **options)
        sites = draw(st.one_of(st.lists(names(), min_size=1, max_size=2), st.sampled_from([["layers[1]"], []]), junk))
        options = {k: draw(v) for k, v in (("context_size", small), ("batch_size", small), ("max_tokens", st.one_of(st.none(), small)),
                                           ("shard_tokens", st.one_of(st.none(), small)), ("packing", flags),
                                           ("dtype", st.one_of(st.sampled_from(["float16", "bfloat16", "int8", None]), junk)),
                                           ("overwrite", flags), ("encoding", st.sampled_from(["utf-8", "latin-1", "nope"])))
                   if draw(st.booleans())}
        corpus = draw(texts)
        return (f"cache_activations({corpus!r:.60}, {sites!r}, {options})",
                lambda: model.cache_activations(corpus, sites, out("cache") / "ds", progress=False, **options))

    @settings
    @given(dataset_calls())
    def dataset_group(case):
        attempt(*case)

    # -- SAEs ------------------------------------------------------------------------------------

    @st.composite
    def sae_calls(draw):
        from mlxterp_saes import load_sae, train_sae

        sae = things()["sae"]
        kind = draw(st.sampled_from(["maths", "maths", "direction", "steer", "ablate", "top", "evaluate", "attribution",
                                     "load", "train", "train"]))
        if kind == "maths":
            method, x = draw(st.sampled_from(["encode", "decode", "__call__", "pre_acts"])), draw(float_arrays(64 if True else 32))
            if method == "decode":
                x = draw(float_arrays(32))
            return f"sae.{method}({getattr(x, 'shape', x)!r} {getattr(x, 'dtype', '')})", lambda: getattr(sae, method)(x)
        if kind == "direction":
            f = draw(small)
            return f"sae.direction({f!r})", lambda: sae.direction(f)
        if kind in ("steer", "ablate"):
            feature, value, positions = draw(small), draw(st.one_of(st.just(2.0), junk)), draw(st.one_of(st.none(), small))
            make = (lambda: sae.steer(feature, value, positions)) if kind == "steer" else (lambda: sae.ablate(feature, value, positions))
            saes = [sae] if kind == "ablate" else None
            return (f"sae.{kind}({feature!r}, {value!r}, {positions!r})",
                    lambda: model.run([[1, 5, 9, 17]], interventions=make(), saes=saes).output)
        if kind == "top":
            features = draw(st.one_of(small, st.lists(st.integers(-1, 40), max_size=3)))
            options = {k: draw(v) for k, v in (("n_examples", small), ("n_tokens", small), ("context_size", small),
                                               ("batch_size", small), ("prefix", small), ("suffix", small)) if draw(st.booleans())}
            corpus = draw(texts)
            return (f"sae.top_activations({corpus!r:.40}, {features!r}, {options})",
                    lambda: repr(sae.top_activations(model, corpus, features, progress=False, **options)))
        if kind == "evaluate":
            options = {k: draw(v) for k, v in (("n_tokens", small), ("context_size", small), ("batch_size", small))
                       if draw(st.booleans())}
            corpus = draw(texts)
            return f"sae.evaluate({corpus!r:.40}, {options})", lambda: repr(sae.evaluate(model, corpus, progress=False, **options))
        if kind == "attribution":
            text, answer, top = draw(texts), draw(st.one_of(st.none(), small)), draw(small)
            return f"sae.attribution({text!r:.40}, answer={answer!r}, top={top!r})", lambda: repr(sae.attribution(model, text, answer=answer, top=top))
        if kind == "load":
            source = draw(st.sampled_from([str(things()["root"] / "sae"), str(things()["root"] / "sae" / "cfg.json"),
                                           str(things()["root"] / "dataset"), "", "nope/nothing/here"]))
            site = draw(st.one_of(st.none(), names()))
            return f"load_sae({source!r}, site={site!r})", lambda: load_sae(source, site=site, model=model)
        # train_sae through its public call, with arguments that are not its SAE options (k, d_sae, ...)
        site = draw(st.one_of(st.just(SITE), names()))
        data = draw(st.one_of(texts, float_arrays(64), st.just(str(things()["root"] / "dataset")),
                              st.builds(lambda: {SITE: mx.ones((300, 64))})))
        options = {k: draw(v) for k, v in (("batch_size", st.sampled_from([32, 64, 0, "64"])),
                                           ("context_size", st.sampled_from([8, 16])), ("seed", st.sampled_from([0, 1])),
                                           ("checkpoint_dir", st.sampled_from([None, "new"])), ("save_dir", st.sampled_from([None, "new"])))
                   if draw(st.booleans())}
        for key in ("checkpoint_dir", "save_dir"):
            if options.get(key) == "new":
                options[key] = out(key)
        options["n_tokens"] = draw(st.sampled_from([64, 256, 0, -5, 2.5]))  # always small: arrays of 2 rows repeat
        return (f"train_sae({site!r}, {getattr(data, 'shape', data)!r:.60}, {options})",
                lambda: train_sae(model, site, data, d_sae=32, k=4, buffer_tokens=128, progress=False, **options))

    @settings
    @given(sae_calls())
    def saes_group(case):
        attempt(*case)

    # -- tuned lenses ----------------------------------------------------------------------------

    @st.composite
    def lens_calls(draw):
        from mlxterp_lenses import TunedLens

        lens = things()["lens"]
        kind = draw(st.sampled_from(["lens", "lens", "transform", "new", "load", "train", "evaluate"]))
        if kind == "lens":
            text = draw(texts)
            options = {k: draw(v) for k, v in (("layers", st.one_of(st.none(), st.lists(st.integers(-6, 6), max_size=3), junk)),
                                               ("top_k", small)) if draw(st.booleans())}
            given_lens = draw(st.sampled_from([lens, lens, None, TunedLens(64, 3), "lens"]))
            return f"tuned_lens({text!r:.40}, {type(given_lens).__name__}, {options})", lambda: model.tuned_lens(text, given_lens, **options)
        if kind == "transform":
            h, index = draw(float_arrays(64)), draw(small)
            return f"lens.transform_hidden({getattr(h, 'shape', h)!r}, {index!r})", lambda: lens.transform_hidden(h, index)
        if kind == "new":  # sizes are not drawn huge: TunedLens(10**9, 10**9) would fill the memory
            d, n = (draw(st.one_of(st.integers(-2, 70), junk.filter(lambda v: v != 10**9))) for _ in range(2))
            return f"TunedLens({d!r}, {n!r})", lambda: TunedLens(d, n)
        if kind == "load":
            path = draw(st.sampled_from([str(things()["root"] / "lens"), str(things()["root"] / "sae"), "", "nope"]))
            return f"TunedLens.load({path!r})", lambda: TunedLens.load(path, model=model)
        options = {k: draw(v) for k, v in (("context_size", st.one_of(st.just(8), small)), ("batch_size", small)) if draw(st.booleans())}
        corpus = draw(texts)
        if kind == "evaluate":
            options.update({k: draw(v) for k, v in (("max_tokens", st.one_of(st.none(), small)),) if draw(st.booleans())})
            given_lens = draw(st.sampled_from([lens, lens, None, TunedLens(64, 2)]))
            return (f"evaluate_tuned_lens({corpus!r:.40}, {options})",
                    lambda: repr(model.evaluate_tuned_lens(given_lens, corpus, **options)))
        options.update({k: draw(v) for k, v in (("num_steps", st.sampled_from([1, 2, 0, -1, 2.5])),
                                                ("tokens_per_step", st.sampled_from([8, 16, 0, "8"])), ("lr", fractions),
                                                ("momentum", fractions), ("weight_decay", fractions), ("grad_clip", fractions),
                                                ("checkpoint_every", small), ("checkpoint_dir", st.sampled_from([None, "new", 3])))
                        if draw(st.booleans())})
        if options.get("checkpoint_dir") == "new":
            options["checkpoint_dir"] = out("lens")
        options.setdefault("num_steps", 1)
        options.setdefault("tokens_per_step", 8)
        return f"train_tuned_lens({corpus!r:.40}, {options})", lambda: model.train_tuned_lens(corpus, progress=False, **options)

    @settings
    @given(lens_calls())
    def lens_group(case):
        attempt(*case)

    # -- probes ----------------------------------------------------------------------------------

    @st.composite
    def probe_calls(draw):
        from mlxterp import probes

        kind = draw(st.sampled_from(["probe", "probe", "fit", "auroc", "split"]))
        if kind == "probe":
            prompts = draw(mostly(st.just(TEXTS[:6]), texts))
            labels = draw(mostly(st.just([1, 0, 1, 0, 1, 0]), st.one_of(st.lists(st.integers(-1, 2), max_size=6), junk)))
            options = {k: draw(v) for k, v in (("groups", mostly(st.sampled_from([None, [0, 0, 1, 1, 2, 2]]), st.lists(st.integers(0, 2), max_size=6))),
                                               ("layers", mostly(st.sampled_from([None, [0, -1]]), st.lists(st.integers(-6, 6), max_size=2))),
                                               ("component", mostly(st.sampled_from(["output", "mlp", "attn"]), st.sampled_from(["nope", "", 3]))),
                                               ("position", mostly(st.sampled_from(["last", "mean", -1, 0]), st.one_of(st.just("first"), small))),
                                               ("include_embed", flags), ("method", mostly(st.sampled_from(["logistic", "mass_mean"]), st.sampled_from(["svm", None]))),
                                               ("l2", mostly(st.just(0.01))), ("test_fraction", mostly(st.just(0.5), fractions)),
                                               ("seed", mostly(st.integers(0, 3), small)), ("batch_size", mostly(st.just(4), small)))
                       if draw(st.booleans())}
            return f"probe({prompts!r:.60}, {labels!r:.40}, {options})", lambda: repr(model.probe(prompts, labels, **options))
        if kind == "fit":
            x = draw(mostly(st.builds(lambda: mx.random.normal((6, 8), key=mx.random.key(2))), float_arrays(8)))
            y = draw(mostly(st.just([1, 0, 1, 0, 1, 0]), st.one_of(st.lists(st.integers(-1, 2), max_size=4), junk)))
            method, l2 = draw(mostly(st.sampled_from(["logistic", "mass_mean"]), st.just("x"))), draw(mostly(st.just(0.01)))
            return f"fit({getattr(x, 'shape', x)!r}, {y!r}, {method!r}, {l2!r})", lambda: probes.fit(x, y, method, l2)
        if kind == "auroc":
            scores = draw(mostly(st.lists(st.floats(-1e6, 1e6), min_size=5, max_size=5), st.lists(st.floats(allow_nan=True), max_size=5)))
            labels = draw(mostly(st.lists(st.integers(0, 1), min_size=5, max_size=5), st.one_of(st.lists(st.integers(-1, 2), max_size=5), junk)))
            return f"auroc({scores!r}, {labels!r})", lambda: probes.auroc(scores, labels)
        groups = draw(mostly(st.lists(st.integers(0, 3), max_size=8)))
        fraction, seed = draw(mostly(st.just(0.3), fractions)), draw(mostly(st.integers(0, 5), small))
        return f"split_groups({groups!r}, {fraction!r}, {seed!r})", lambda: probes.split_groups(groups, fraction, seed)

    @settings
    @given(probe_calls())
    def probes_group(case):
        attempt(*case)

    # -- views -----------------------------------------------------------------------------------

    labels_ = st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=3), junk)
    values = st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
                       st.lists(st.lists(st.floats(-2, 2), max_size=3), max_size=3), float_arrays(3), junk)
    words = st.one_of(st.lists(st.text(max_size=5), max_size=4), st.lists(st.lists(st.text(max_size=3), max_size=3), max_size=2), junk)

    @st.composite
    def view_calls(draw):
        from mlxterp import plugin as views

        kind = draw(st.sampled_from(["to_html", "to_html", "tokens", "attention", "lens", "heatmap", "write"]))
        if kind == "to_html":
            name = draw(st.sampled_from([name for name, r in sorted(things()["results"].items()) if hasattr(r, "to_html")]))
            where = draw(st.sampled_from(["page.html", "deeper/still/page.html", ".", "", "page", "file/under/a/file.html"]))
            folder = out("view")
            (folder / "file").write_text("a file, not a folder")
            return f"{name}.to_html({where!r})", lambda: things()["results"][name].to_html(folder / where if where else where)
        if kind == "tokens":
            args = draw(words), draw(values), draw(labels_), draw(st.one_of(st.text(max_size=5), junk))
            return f"token_heatmap_html{args!r:.200}", lambda: views.token_heatmap_html(*args)
        if kind == "attention":
            args = draw(words), draw(values), draw(st.one_of(st.lists(st.integers(-2, 5), max_size=2), junk)), draw(st.one_of(st.lists(st.integers(-2, 5), max_size=2), junk))
            return f"attention_html{args!r:.200}", lambda: views.attention_html(*args)
        if kind == "lens":
            predictions = draw(st.one_of(st.lists(st.lists(st.lists(st.tuples(small, fractions, st.text(max_size=3)), max_size=2), max_size=2), max_size=2), junk))
            args = draw(words), draw(st.one_of(st.lists(st.integers(-2, 5), max_size=2), junk)), predictions
            return f"lens_html{args!r:.200}", lambda: views.lens_html(*args)
        if kind == "heatmap":
            args = draw(words), draw(words), draw(values)
            options = {k: draw(v) for k, v in (("scale", st.one_of(st.none(), fractions, junk)), ("flip", flags), ("title", st.one_of(st.text(max_size=4), junk)))
                       if draw(st.booleans())}
            return f"heatmap_html{args!r:.200} {options}", lambda: views.heatmap_html(*args, **options)
        fragment, title = draw(st.one_of(st.text(max_size=20), junk)), draw(st.one_of(st.text(max_size=5), junk))
        where = draw(st.sampled_from(["page.html", "", "file/x.html"]))
        folder = out("write")
        (folder / "file").write_text("a file, not a folder")
        return f"write_html({where!r}, {fragment!r:.40}, {title!r})", lambda: views.write_html(folder / where if where else where, fragment, title)

    @settings
    @given(view_calls())
    def views_group(case):
        attempt(*case)

    groups = {"files": files_group, "dataset": dataset_group, "saes": saes_group, "lens": lens_group,
              "probes": probes_group, "views": views_group}
    return groups, unchanged
