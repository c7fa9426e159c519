"""Activation caching: every cached row is the traced activation at its token; reruns resume;
bad input is refused before anything is written; the reader streams what was written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import CORPUS, tiny_llama, train_tokenizer

import mlxterp
from mlxterp import ActivationDataset, CorpusError, DatasetError, InterpretableModel, UnknownNameError, token_windows
from mlxterp_core import caching, dataset, stream

DOCS = CORPUS * 4
SITES = ["layers[1]", "layers[*].mlp", "model.model.layers.0.self_attn.*_proj"]


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(), tokenizer=train_tokenizer(bos=True))


def cache(model, out, sites=SITES, docs=DOCS, **options):
    options = {"context_size": 16, "batch_size": 3, "shard_tokens": 40, **options}
    return model.cache_activations(docs, sites, out, **options)


def shard_digests(ds):
    return [(s["file"], s["rows"], s["sha256"]) for s in ds.shards]


@pytest.mark.parametrize("packing", [True, False])
def test_cached_rows_are_the_traced_activations(model, tmp_path, packing):
    ds = cache(model, tmp_path / "ds", packing=packing)
    assert ds.sites == [
        "layers.1.output", *[f"layers.{i}.mlp" for i in range(4)],
        *[f"model.model.layers.0.self_attn.{p}_proj" for p in "qkvo"],
    ]
    assert len(ds.shards) > 3
    names = {"layers.1.output": "layers[1]", **{f"layers.{i}.mlp": f"layers[{i}].mlp" for i in range(4)}}
    row = 0
    for batch in token_windows(model, DOCS, 16, batch_size=3, packing=packing):
        mask = batch.mask
        with model.trace(batch.inputs, capture=SITES) as tr:
            pass
        for site in ds.sites:
            expected = np.array(tr.activations[names.get(site, site)])
            expected = expected.reshape(mask.size, -1)[mask.reshape(-1)]
            assert np.array_equal(np.array(ds[site][row : row + batch.n_tokens]), expected), site
        assert (ds.tokens[row : row + batch.n_tokens] == batch.tokens[mask]).all()
        assert (ds.document[row : row + batch.n_tokens] == batch.document[mask]).all()
        assert (ds.position[row : row + batch.n_tokens] == batch.position[mask]).all()
        row += batch.n_tokens
    assert row == ds.n_tokens == len(ds["layers[1]"])
    assert ds.bos.sum() == len(DOCS) and (ds.position[ds.bos] == 0).all()
    assert ds.verify() == {}
    # shards are ordinary safetensors files
    shard = mx.load(str(ds.path / ds.shards[1]["file"]))
    start, stop = ds.shards[1]["tokens"]
    assert np.array_equal(np.array(shard["layers.1.output"]), np.array(ds["layers.1.output"][start:stop]))
    manifest = ds.manifest
    assert manifest["context_size"] == 16 and manifest["model"]["family"] == "llama"
    assert manifest["sites"][0] == {"name": "layers.1.output", "raw": "model.model.layers.1", "shape": [64], "dtype": "float32"}
    assert [s["tokens"][0] for s in manifest["shards"]] == list(np.cumsum([0] + [s["rows"] for s in manifest["shards"][:-1]]))


def test_forward_stops_after_the_last_layer_needed(model, tmp_path, monkeypatch):
    sites = stream.resolve_sites(model, ["layers[1].mlp.act", "embed"], mx.array([[1, 2, 3]]), None)
    assert stream.stop_for(model, sites) == "layers.1.output"  # (Hooks stop there: the input of block 2)
    assert stream.stop_for(model, sites, mx.array([[1, 2, 3]])) == "layers.1.output"  # checked
    assert stream.stop_for(model, stream.resolve_sites(model, ["ln_final"], mx.array([[1, 2]]), None)) is None
    calls = []
    block = type(model.model.model.layers[2])
    original = block.__call__
    late = [model.model.model.layers[2], model.model.model.layers[3]]

    def counted(self, x, *args, **kwargs):
        if any(self is layer for layer in late) and x.shape[1] > 5:  # not the 5-token probe
            calls.append(1)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(block, "__call__", counted)
    ds = cache(model, tmp_path / "stop", sites=["layers[1].mlp.act"])
    assert ds.n_tokens > 0 and not calls  # layers 2 and 3 never ran
    cache(model, tmp_path / "full", sites=["layers[3]"])
    assert calls  # the counter counts
    batch = next(token_windows(model, DOCS, 16, batch_size=3))
    with model.trace(batch.inputs, capture=["layers[1].mlp.act"]) as tr:
        pass
    expected = np.array(tr.activations["layers[1].mlp.act"]).reshape(-1, 128)[batch.mask.reshape(-1)]
    assert np.array_equal(np.array(ds["layers[1].mlp.act"][: batch.n_tokens]), expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_dtype(model, tmp_path, dtype):
    full = cache(model, tmp_path / "f32", sites=["layers[2]"])
    half = cache(model, tmp_path / dtype, sites=["layers[2]"], dtype=dtype)
    rows = half["layers[2]"][:]
    assert rows.dtype == getattr(mx, dtype) and half.site_info("layers[2]")["dtype"] == dtype
    assert mx.array_equal(rows, full["layers[2]"][:].astype(getattr(mx, dtype))).item()
    batch = next(half.batches("layers[2]", 7, seed=1))
    assert batch.dtype == getattr(mx, dtype) and batch.shape == (7, 64)


def test_batches_cover_every_row_once(model, tmp_path):
    ds = cache(model, tmp_path / "ds", sites=["layers[0]"])
    rows = np.array(ds["layers[0]"][:])
    seen = []
    for batch, index in ds.batches("layers[0]", 10, seed=3, buffer_rows=50, with_index=True):
        assert np.array_equal(np.array(batch), rows[index])
        seen.append(index)
    seen = np.concatenate(seen)
    # every row once but BOS and each window's first position (the attention sink)
    assert sorted(seen) == list(np.flatnonzero(~ds.bos & (ds.offset != 0)))
    assert (ds.offset == 0).sum() > (ds.bos & (ds.offset == 0)).sum()  # first positions that are not BOS
    kept = np.concatenate([i for _, i in ds.batches("layers[0]", 10, seed=3, skip_first=False, with_index=True)])
    assert sorted(kept) == list(np.flatnonzero(~ds.bos))
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    again = np.concatenate([i for _, i in ds.batches("layers[0]", 10, seed=3, buffer_rows=50, with_index=True)])
    other = np.concatenate([i for _, i in ds.batches("layers[0]", 10, seed=4, buffer_rows=50, with_index=True)])
    assert np.array_equal(seen, again) and not np.array_equal(seen, other)
    ordered = np.concatenate([i for _, i in ds.batches("layers[0]", 10, shuffle=False, skip_bos=False, skip_first=False, with_index=True)])
    assert np.array_equal(ordered, np.arange(ds.n_tokens))
    sizes = [len(b) for b in ds.batches("layers[0]", 10, drop_last=True)]
    assert set(sizes) == {10}
    assert np.array_equal(np.array(ds["layers[0]"][[5, 0, ds.n_tokens - 1]]), rows[[5, 0, -1]])
    with pytest.raises(DatasetError, match=r"no site 'layers\[3\].mlp'"):
        ds["layers[3].mlp"]


def test_rerun_skips_verified_shards_and_remakes_bad_ones(model, tmp_path):
    first = cache(model, tmp_path / "ds")
    times = {p.name: p.stat().st_mtime_ns for p in first.path.glob("shard-*")}
    again = cache(model, tmp_path / "ds")
    assert shard_digests(again) == shard_digests(first)
    assert {p.name: p.stat().st_mtime_ns for p in first.path.glob("shard-*")} == times
    # a flipped byte: re-made, not trusted
    victim = first.path / first.shards[2]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(data)
    (first.path / first.shards[4]["file"]).unlink()
    with pytest.warns(UserWarning, match="does not match its recorded checksum"):
        remade = cache(model, tmp_path / "ds")
    assert shard_digests(remade) == shard_digests(first)
    changed = {p.name for p in first.path.glob("shard-*") if p.stat().st_mtime_ns != times[p.name]}
    assert changed == {first.shards[2]["file"], first.shards[4]["file"]}


def test_a_different_dataset_in_the_folder_is_refused(model, tmp_path):
    out = tmp_path / "ds"
    first = cache(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DatasetError, match="sites: the folder has"):
        cache(model, out, sites=["layers[2]"])
    with pytest.raises(DatasetError, match="context_size: the folder has 16, this call asks for 8"):
        cache(model, out, context_size=8)
    with pytest.raises(DatasetError, match="corpus"):
        cache(model, out, docs=DOCS[:-1])
    other = InterpretableModel(tiny_llama(hidden_size=32), tokenizer=model.tokenizer)
    with pytest.raises(DatasetError, match="model: the folder has"):
        cache(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    replaced = cache(model, out, sites=["layers[2]"], overwrite=True)
    assert replaced.sites == ["layers.2.output"] and first.n_tokens == replaced.n_tokens
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="not an mlxterp activation dataset"):
            cache(model, foreign, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_bad_input_writes_nothing(model, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(UnknownNameError):
        cache(model, out, sites=["layers[9]"])
    with pytest.raises(UnknownNameError):
        cache(model, out, sites=["model.model.layers.0.nothing"])
    with pytest.raises(DatasetError, match="not one row per token"):
        cache(model, out, sites=["layers[0].attn.pattern"])
    with pytest.raises(CorpusError, match="no corpus file"):
        cache(model, out, docs=tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="no documents"):
        cache(model, out, docs=["", "  "])
    with pytest.raises(DatasetError, match="dtype"):
        cache(model, out, dtype="int8")
    assert not out.exists()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        ActivationDataset(out)


def test_write_error_keeps_the_folder_consistent_and_resume_recovers(model, tmp_path, monkeypatch):
    reference = cache(model, tmp_path / "reference")
    out = tmp_path / "ds"
    real = dataset._pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(dataset, "_pwrite", failing)
    with pytest.raises(DatasetError, match="No space left on device.*rerun the same command"):
        cache(model, out)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    finished = [json.loads(line)["shard"] for line in (out / "journal-rank0.jsonl").read_text().splitlines()]
    assert finished and len(finished) < len(reference.shards)
    with pytest.raises(DatasetError, match="unfinished cache"):
        ActivationDataset(out)
    monkeypatch.setattr(dataset, "_pwrite", real)
    resumed = cache(model, out)
    assert shard_digests(resumed) == shard_digests(reference)


def test_damaged_shards_are_named_by_readers_and_verify_and_remade_by_a_rerun(model, tmp_path):
    reference = cache(model, tmp_path / "reference")
    ds = cache(model, tmp_path / "ds")
    files = [s["file"] for s in ds.shards]
    truncated, emptied, missing, flipped = (ds.path / files[k] for k in (1, 2, 3, 4))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    emptied.write_bytes(b"")
    missing.unlink()
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(data)
    problems = ActivationDataset(ds.path).verify()
    assert list(problems) == files[1:5]
    assert problems[files[1]].startswith("truncated") and problems[files[2]].startswith("truncated")
    assert problems[files[3]] == "missing" and problems[files[4]].startswith("checksum mismatch")
    for read in (lambda d: d["layers[1]"][:], lambda d: d.tokens, lambda d: list(d.batches("layers[1]", 4)),
                 lambda d: d["layers[1]"][np.arange(0, d.n_tokens, 7)], lambda d: d.load_shard(1)):
        with pytest.raises(DatasetError, match=r"shard-00000[123].safetensors is (corrupt or truncated|truncated|missing).*Rerun the cache_activations call"):
            read(ActivationDataset(ds.path))
    with pytest.warns(UserWarning, match="re-making it"):
        remade = cache(model, tmp_path / "ds")
    assert shard_digests(remade) == shard_digests(reference) and remade.verify() == {}


def test_a_shard_cut_short_while_open_is_an_error_not_a_crash(model, tmp_path):
    """Rows are read with positioned reads: a memory map of a file that shrinks under it dies of
    SIGBUS (in a subprocess here, so a crash fails the test and not the test run)."""
    ds = cache(model, tmp_path / "ds")
    script = (
        "import os, sys\n"
        "from mlxterp_core.dataset import ActivationDataset, DatasetError\n"
        "ds = ActivationDataset(sys.argv[1])\n"
        "rows = ds['layers[1]']\n"
        "os.truncate(ds.path / ds.shards[1]['file'], 100)\n"
        "try:\n"
        "    rows[:]\n"
        "except DatasetError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ds.path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert f"{ds.shards[1]['file']} is truncated" in done.stdout


def test_a_held_writer_lock_refuses_a_second_writer_and_a_stale_one_blocks_nothing(model, tmp_path):
    import socket

    out = tmp_path / "ds"
    reference = cache(model, out)
    assert not list(out.glob("*.lock"))  # released and removed when the run ends
    other = caching._lock_folder(out, 0)  # another writer (flock conflicts within a process too)
    try:
        before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".lock")}
        for overwrite in (False, True):
            with pytest.raises(DatasetError, match=rf"{out} is being written by another process: process {os.getpid()} "
                                                   rf"on {socket.gethostname()}, started .*stopped before changing anything"):
                cache(model, out, overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".lock")} == before
        rank1 = caching._lock_folder(out, 1)  # another rank of the same job: another lock file
        caching._unlock_folder(rank1)
    finally:
        caching._unlock_folder(other)
    # a killed writer's lock file (no one holds it) is no foreign file and blocks nothing
    for folder, options in ((out, {}), (out, {"overwrite": True}), (tmp_path / "new", {})):
        folder.mkdir(exist_ok=True)
        (folder / "writer-rank0.lock").write_text('{"pid": 1, "host": "gone"}')
        assert shard_digests(cache(model, folder, **options)) == shard_digests(reference)


def test_a_writer_refused_while_the_holder_is_still_writing_its_name_names_it(tmp_path):
    """The instant between a writer taking the lock and writing its name into the lock file: a
    second writer refused then reads an empty file, or a killed writer's name left behind; it
    waits briefly for the living holder's name instead of printing either."""
    import fcntl
    import socket
    import threading

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "ds"
    out.mkdir()
    path = out / "writer-rank0.lock"
    for left_behind in ("", json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"})):
        path.write_text(left_behind)
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner holds the lock, its name not yet written
        name = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
        late = threading.Timer(0.3, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, name.encode(), 0)))
        late.start()
        try:
            with pytest.raises(DatasetError, match=rf"another process: process {os.getpid()} on {socket.gethostname()}, started now"):
                caching._lock_folder(out, 0)
        finally:
            late.join()
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)  # a holder that never names itself: the refusal still comes, after a short wait
    try:
        with pytest.raises(DatasetError, match="another process: a process that is just starting"):
            caching._lock_folder(out, 0)
    finally:
        os.close(fd)


def test_one_shot_iterators_and_files(model, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    from_file = cache(model, tmp_path / "a", docs=corpus, sites=["layers[0]"])
    from_iter = cache(model, tmp_path / "b", docs=iter(DOCS), sites=["layers[0]"])
    assert shard_digests(from_file) == shard_digests(from_iter)


def test_max_tokens(model, tmp_path):
    ds = cache(model, tmp_path / "ds", sites=["layers[0]"], max_tokens=50)
    assert ds.n_tokens == 50


def test_reexports():
    assert mlxterp.ActivationDataset is ActivationDataset
    assert issubclass(DatasetError, mlxterp.MlxterpError)
    assert os.path.basename(caching.__file__) == "caching.py"


def test_memory_stays_flat_over_many_shards(model, tmp_path):
    """Resident memory after most of a run of ~50 shards is within a few MB of its level
    after the first shards: rows go to disk as they are computed, nothing accumulates."""
    import threading
    import time

    from mlxterp import default_corpus

    page = os.sysconf("SC_PAGE_SIZE")
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/statm") as f:
                samples.append((time.perf_counter(), int(f.read().split()[1]) * page))
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        ds = model.cache_activations(default_corpus()[:400], ["layers[*]", "layers[*].mlp.act"], tmp_path / "ds",
                                     context_size=64, batch_size=8, shard_tokens=512, max_tokens=24_000)
    finally:
        stop.set()
        thread.join()
    written = sum(s["bytes"] for s in ds.shards)
    assert len(ds.shards) >= 45 and written > 70e6
    rss = np.array([r for _, r in samples])
    early = rss[len(rss) // 10 : len(rss) // 5].max()  # after the first shards (warm-up done)
    late = rss[len(rss) // 2 :].max()
    print(f"\nRSS {early / 1e6:.0f} MB early, {late / 1e6:.0f} MB late, {written / 1e6:.0f} MB written in {len(ds.shards)} shards")
    assert late - early < 24e6


def test_bench_cache_speed_runs_on_a_tiny_model(model):
    from mlxterp_tools.cache_rows import cache_speed

    speed = cache_speed(model, sites=("layers[1]",), cut=2, batch_size=2, context_size=8, batches=2, repeats=1)
    assert set(speed) == {"plain", "cache"} and all(v > 0 for v in speed.values())


def test_real_model_rows_are_the_traced_activations(tmp_path):
    model = mlxterp.load()
    docs = mlxterp.default_corpus()[:10]
    sites = ["layers[*]", "layers[3].mlp.act", "layers[7].attn.z"]
    ds = model.cache_activations(docs, sites, tmp_path / "ds", context_size=16, batch_size=2, max_tokens=64)
    assert ds.n_tokens == 64 and len(ds.sites) == 32
    row = 0
    for batch in token_windows(model, docs, 16, batch_size=2, max_tokens=64):
        with model.trace(batch.inputs, capture=sites) as tr:
            pass
        for site, name in (("layers.0.output", "layers[0]"), ("layers.29.output", "layers[29]"),
                           ("layers.3.mlp.act", "layers[3].mlp.act"), ("layers.7.attn.z", "layers[7].attn.z")):
            expected = np.array(tr.activations[name]).reshape(batch.mask.size, -1)[batch.mask.reshape(-1)]
            assert np.array_equal(np.array(ds[site][row : row + batch.n_tokens]), expected), site
        row += batch.n_tokens
    assert ds.manifest["model"]["weights_sha256"] == dataset.sha256_file(mlxterp.default_model_path())


def test_caching_encodes_each_document_once(model, tmp_path):
    """The plan keeps the corpus's token ids: a document is encoded once per run (the plan
    and the forward passes read the same ids), one encode call per non-empty document."""
    tok = train_tokenizer(bos=True)
    encoded: list[str] = []
    real_encode = type(tok).encode

    class Counting(type(tok)):
        def encode(self, text, *args, **kwargs):
            encoded.append(text)
            return real_encode(self, text, *args, **kwargs)

    tok.__class__ = Counting
    counted = InterpretableModel(model.model, tokenizer=tok)
    docs = DOCS * 3
    ds = cache(counted, tmp_path / "once", docs=docs)
    assert ds.n_tokens > 0
    assert sorted(encoded) == sorted(d for d in docs if d.strip())
