"""Caching across processes: a SIGKILLed run resumes to the uninterrupted dataset, and two ring
ranks on localhost write the one-process dataset bit for bit. Each rank's exit status is
checked here (mlx.launch returns 0 whatever its ranks do)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import environment, tiny_llama, train_tokenizer, write_gguf

import mlxterp
from mlxterp import default_corpus
from mlxterp_tools.ring import run_ring

OPTIONS = ["--context-size", "16", "--batch-size", "2", "--shard-tokens", "32", "--max-tokens", "1200"]
SITES = ["layers[*]", "layers[1].mlp.act"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    gguf = root / "tiny.gguf"
    write_gguf(gguf, tiny_llama(), train_tokenizer(), "llama")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in default_corpus()[:60]) + "\n")
    return root, gguf, corpus


@pytest.fixture(scope="module")
def reference(files):
    """The one-process dataset, made by a process with the BLAS threads of the others (the
    reduction order of a matmul, and so its last bits, can depend on the thread count)."""
    root, gguf, corpus = files
    done = subprocess.run(command(gguf, corpus, root / "reference"), env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return mlxterp.ActivationDataset(root / "reference")


def command(gguf, corpus, out, *extra):
    return [sys.executable, "-m", "mlxterp", "cache", str(gguf), "--corpus", str(corpus), "--sites", *SITES,
            "--out", str(out), *OPTIONS, *extra]


def digests(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return [(s["file"], s["rows"], s["tokens"], s["sha256"]) for s in manifest["shards"]], manifest


def test_sigkill_mid_run_loses_at_most_one_shard(files, reference):
    root, gguf, corpus = files
    out = root / "killed"
    proc = subprocess.Popen(command(gguf, corpus, out), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / "journal-rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    lock = out / "writer-rank0.lock"
    assert json.loads(lock.read_text())["pid"] == proc.pid  # the killed writer's lock file stays behind
    done = [json.loads(line)["shard"] for line in journal.read_text().splitlines()]
    assert not (out / "manifest.json").exists() and len(done) < len(reference.shards)
    kept = {f"shard-{k:06d}.safetensors": (out / f"shard-{k:06d}.safetensors").stat().st_mtime_ns for k in done}
    resumed = subprocess.run(command(gguf, corpus, out), env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    shards, manifest = digests(out)
    assert shards == digests(reference.path)[0]  # identical to the uninterrupted run
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished shards untouched
    lines = [json.loads(line)["shard"] for line in journal.read_text().splitlines()]
    assert sorted(lines) == list(range(len(manifest["shards"])))  # every shard made exactly once
    assert not list(out.glob("*.tmp")) and not lock.exists()


def test_two_writers_started_together_one_is_refused(files, reference, tmp_path):
    """Two jobs caching into one folder at once: the second to lock it stops at once, naming
    the first; the first writes the one-process dataset."""
    root, gguf, corpus = files
    out, go = tmp_path / "ds", tmp_path / "go"
    writer = [sys.executable, os.path.join(os.path.dirname(__file__), "cache_writer.py"), str(go)]
    procs = [subprocess.Popen(writer + command(gguf, corpus, out)[4:], env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in procs) and len(list(tmp_path.glob("holding-*"))) < 2:
            time.sleep(0.02)
        go.touch()  # one writer is out (refused), or both hold the folder at once (no lock)
        outcome = [(p.pid, *p.communicate(timeout=180)[1:], p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = sorted(code for _, _, code in outcome)
    assert codes == [0, 2], [(code, err[-1000:]) for _, err, code in outcome]
    (winner, _, _), (_, refused, _) = sorted(outcome, key=lambda o: o[2])
    assert f"is being written by another process: process {winner} on {socket.gethostname()}, started" in refused
    assert "Wait for that process to finish" in refused
    assert mlxterp.ActivationDataset(out).verify() == {}
    assert digests(out)[0] == digests(reference.path)[0]


def test_the_cache_command_reads_a_corpus_in_another_encoding(files, tmp_path, capsys):
    from mlxterp_core.cli import main

    root, gguf, _ = files
    docs = [f"{d.replace(chr(10), ' ')} caf\u00e9" for d in default_corpus()[:40] if d.isascii()]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\n".join(docs).encode("latin-1"))
    assert main(command(gguf, latin, tmp_path / "strict")[3:]) == 2
    assert f"{latin} is not utf-8 text at line 1" in capsys.readouterr().err
    assert main(command(gguf, latin, tmp_path / "latin", "--encoding", "latin-1")[3:]) == 0
    expected = mlxterp.load(gguf).cache_activations(docs, SITES, tmp_path / "list", context_size=16, batch_size=2,
                                                    shard_tokens=32, max_tokens=1200)
    assert digests(tmp_path / "latin")[0] == digests(expected.path)[0]


def test_two_ring_ranks_write_the_one_process_dataset(files, reference):
    root, gguf, corpus = files
    out = root / "two-ranks"
    results = run_ring([command(gguf, corpus, out)] * 2, root, timeout=240, env=environment())
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-2000:]}"
    shards, manifest = digests(out)
    assert shards == digests(reference.path)[0]  # bit for bit
    assert {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert sorted(p.name for p in out.glob("journal-*")) == ["journal-rank0.jsonl", "journal-rank1.jsonl"]


def test_ranks_that_disagree_all_fail(files, tmp_path):
    root, gguf, corpus = files
    other = tmp_path / "other.txt"
    other.write_text("A different first document.\n" + corpus.read_text())
    out = tmp_path / "disagree"
    results = run_ring([command(gguf, corpus, out), command(gguf, other, out)], tmp_path, timeout=240, env=environment())
    for rank, (code, err) in enumerate(results):
        assert code == 2 and "disagree" in err, f"rank {rank}: {code} {err[-1000:]}"
    assert not (out / "manifest.json").exists()


def test_patching_split_across_two_ranks_equals_one_process(tmp_path):

    script = os.path.join(os.path.dirname(__file__), "distributed_patching.py")
    single = tmp_path / "single"
    single.mkdir()
    done = subprocess.run([sys.executable, script, str(single)], env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    alone = json.loads((single / "rank0.json").read_text())
    assert alone["size"] == 1
    outcome = run_ring([[sys.executable, script, str(tmp_path)]] * 2, tmp_path, timeout=240, env=environment())
    for rank, (code, err) in enumerate(outcome):
        assert code == 0, f"rank {rank}: {err[-2000:]}"
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["size"] == 2
        for key in ("resid", "heads"):
            assert got[key] == alone[key], key  # bit for bit
        assert got["attribution"] == alone["attribution"]
