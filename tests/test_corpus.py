"""Corpora and token windows: every real token is accounted for exactly once, in order, with
its document and position; padding is marked; BOS is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CORPUS, train_tokenizer

import mlxterp
from mlxterp import CorpusError, default_corpus, read_documents, token_windows


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(bos=True)  # a BOS id, so prepending and flagging are exercised


def test_read_documents_every_source(tmp_path):
    docs = ["first document", "second one\twith a tab", "third"]
    (tmp_path / "c.txt").write_text("\n".join([docs[0], "", docs[1], "   ", docs[2]]) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    (folder / "ignored.md").write_text("not a .txt file")
    assert list(read_documents(tmp_path / "c.txt")) == docs
    assert list(read_documents(str(tmp_path / "c.jsonl"))) == docs
    assert list(read_documents(folder)) == docs
    assert list(read_documents(iter(docs + [""]))) == docs


def test_read_documents_bad_input(tmp_path):
    with pytest.raises(CorpusError, match="no corpus file or folder"):
        list(read_documents(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="no documents"):
        list(read_documents(tmp_path / "empty.txt"))
    with pytest.raises(CorpusError, match="no documents"):
        list(read_documents([]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2 .*\"text\""):
        list(read_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(CorpusError, match="not valid JSON"):
        list(read_documents(tmp_path / "broken.jsonl"))
    with pytest.raises(CorpusError, match="document 1 .* int"):
        list(read_documents(["fine", 3]))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        list(read_documents(tmp_path / "nothing"))
    assert issubclass(CorpusError, mlxterp.MlxterpError)


def _expected(tokenizer, docs):
    return [[tokenizer.bos_token_id, *tokenizer.encode(d)] for d in docs]


def test_a_corpus_that_is_not_utf8_is_named_with_its_line_and_can_be_decoded(tokenizer, tmp_path):
    docs = ["first document", "caf\u00e9 cr\u00e8me", "third"]
    text = tmp_path / "latin.txt"
    text.write_bytes("\n".join(docs).encode("latin-1"))
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs).encode("latin-1"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_bytes(d.encode("latin-1"))
    for path, where in ((text, "line 2, byte 18"), (jsonl, "line 2, byte 40"), (folder, "line 1, byte 3")):
        named = str(folder / "1.txt") if path == folder else str(path)
        with pytest.raises(CorpusError, match=rf"{named} is not utf-8 text at {where} .*encoding='latin-1'.*errors='replace'"):
            list(read_documents(path))
        assert list(read_documents(path, encoding="latin-1")) == docs
        assert list(read_documents(path, errors="replace"))[1] == "caf\ufffd cr\ufffdme"
    with pytest.raises(CorpusError, match=r"line 2, byte 18"):
        next(token_windows(tokenizer, text, 8))
    assert [b.tokens.tolist() for b in token_windows(tokenizer, text, 8, encoding="latin-1")] == \
        [b.tokens.tolist() for b in token_windows(tokenizer, docs, 8)]
    with pytest.raises(CorpusError, match="encoding='nope'"):
        list(read_documents(text, encoding="nope"))
    (folder / "not-a-document.txt").mkdir()  # a folder named like a document is not one
    assert list(read_documents(folder, encoding="latin-1")) == docs


@pytest.mark.parametrize("packing", [True, False])
def test_windows_cover_the_corpus_in_order(tokenizer, packing):
    docs = CORPUS * 3
    expected = _expected(tokenizer, docs)
    batches = list(token_windows(tokenizer, docs, 7, batch_size=3, packing=packing))
    seen = {d: [] for d in range(len(docs))}
    for i, batch in enumerate(batches):
        assert batch.index == i and len(batch) <= 3 and batch.tokens.shape[1] <= 7
        mask = batch.mask
        assert (batch.document[~mask] == -1).all() and (batch.position[~mask] == -1).all()
        for row in range(len(batch)):
            real = mask[row]
            for doc, pos, tok in zip(batch.document[row, real], batch.position[row, real], batch.tokens[row, real]):
                assert len(seen[doc]) == pos  # positions count up within each document, no gaps
                seen[doc].append(int(tok))
            if not packing:
                assert len(set(batch.document[row, real])) == 1  # one document per window
        assert (batch.bos == (batch.position == 0)).all()  # BOS exactly at document starts
    assert [seen[d] for d in range(len(docs))] == expected
    firsts = [b.first_window for b in batches]
    assert firsts == list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
    if packing:  # full windows, only the last may be short
        lengths = np.concatenate([b.lengths for b in batches])
        assert (lengths[:-1] == 7).all() and lengths.sum() == sum(map(len, expected))


def test_windows_options(tokenizer):
    docs = CORPUS
    plain = list(token_windows(tokenizer, docs, 16, batch_size=2, prepend_bos=False))
    assert not any(b.bos.any() for b in plain)
    assert sum(b.n_tokens for b in plain) == sum(len(tokenizer.encode(d)) for d in docs)
    capped = list(token_windows(tokenizer, docs, 16, batch_size=2, max_tokens=20))
    assert sum(b.n_tokens for b in capped) == 20
    assert capped[0].inputs.shape == (2, 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(CorpusError, match="context_size"):
            next(token_windows(tokenizer, docs, bad))
    with pytest.raises(CorpusError, match="batch_size"):
        next(token_windows(tokenizer, docs, 8, batch_size=0))
    with pytest.raises(CorpusError, match="tokenizer"):
        from helpers import tiny_llama

        next(token_windows(mlxterp.InterpretableModel(tiny_llama()), docs, 8))


def test_default_corpus_is_real_text():
    docs = default_corpus()
    assert len(docs) > 1000 and all(isinstance(d, str) and len(d.strip()) >= 40 for d in docs)
    assert sum(len(d) for d in docs) > 300_000
    assert any("statement" in d for d in docs)
    assert docs == default_corpus()  # deterministic
