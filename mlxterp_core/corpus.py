"""Corpora and token windows: documents in, batches of fixed-width token windows out.

One windowing code for every consumer (``cache_activations``, SAE, probe and tuned-lens
training), so that a row of a cached dataset and a row traced on the fly mean the same thing.

Corpus: a text file (one document per line), a ``.jsonl`` file (one JSON object per line, its
``"text"`` field is the document), a folder of ``.txt`` files (each file one document, in
sorted name order), or any iterable of strings. Blank documents are skipped; document indices
count the documents that remain, in reading order.

Windows: every document is tokenized with the tokenizer's default special tokens and, unless
the tokenizer already put one there, a BOS token is prepended (``prepend_bos``). Then either

- ``packing=True`` (the default, as SAELens and sparsify do): documents are concatenated into
  one token stream that is cut into windows of exactly ``context_size`` tokens; a window may
  span a document boundary (the BOS marks it) and a long document spans several windows. Only
  the very last window can be short. No compute is spent on padding.
- ``packing=False``: each document is cut into consecutive windows of at most ``context_size``
  tokens; a window never holds two documents. Rows are RIGHT-padded to the longest row of the
  batch: causal attention means no real token sees a pad, so activations at real positions are
  those of the window run alone.

Either way every real token carries its document index, its index within the document
(the prepended BOS is index 0) and its id; ``bos`` flags BOS tokens so trainers can skip them
(their activations are outliers); padding is never cached or trained on (``mask``).
The windows and their batches depend only on the corpus, the tokenizer and these arguments,
never on how many processes consume them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from .errors import CorpusError
from .inputs import check_token_ids, encode, pad_id

DEFAULT_BATCH_SIZE = 8


def read_documents(corpus: str | Path | Iterable[str], *, encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
    """The documents of ``corpus`` (see the module doc), blank ones skipped.

    Files are decoded with ``encoding`` (UTF-8 by default); ``errors`` is what to do with bytes
    that do not decode, as for ``open()``: "strict" (an error naming the file and the line),
    "replace" (U+FFFD), "ignore", "backslashreplace", "surrogateescape".

    Raises CorpusError for a path that does not exist, a file that does not decode, a corpus
    with no documents, a JSONL line that is not an object with a string ``"text"``, or an
    iterable that yields a non-string.
    """
    import codecs

    try:
        codecs.lookup(encoding)
        codecs.lookup_error(errors)
    except (LookupError, TypeError):
        raise CorpusError(
            f"encoding={encoding!r}, errors={errors!r}: not an encoding and an error handler Python knows "
            "(e.g. encoding='utf-8' or 'latin-1'; errors='strict', 'replace' or 'ignore')."
        ) from None
    count = 0
    for document in _documents(corpus, encoding, errors):
        if document.strip():
            count += 1
            yield document
    if count == 0:
        raise CorpusError(f"the corpus {_describe(corpus)} has no documents (every one is empty); pass some text.")


def _documents(corpus: Any, encoding: str, errors: str) -> Iterator[str]:
    if isinstance(corpus, (str, Path)):
        path = Path(corpus).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not files:
                raise CorpusError(f"the corpus folder {path} holds no .txt files; put one document per .txt file there.")
            for file in files:
                with _reading(file, encoding):
                    text = file.read_text(encoding=encoding, errors=errors)
                yield text
        elif path.is_file():
            yield from (_jsonl(path, encoding, errors) if path.suffix == ".jsonl" else _lines(path, encoding, errors))
        else:
            raise CorpusError(
                f"no corpus file or folder at {str(corpus)!r}: pass a text file (one document per "
                "line), a .jsonl file with a \"text\" field, a folder of .txt files, or a list of "
                "strings (a single string is read as a path)."
            )
        return
    if isinstance(corpus, (bytes, bytearray)) or not isinstance(corpus, Iterable):
        raise CorpusError(
            f"cannot read a corpus from {type(corpus).__name__}: pass a path or an iterable of strings."
        )
    for i, document in enumerate(corpus):
        if not isinstance(document, str):
            raise CorpusError(f"document {i} of the corpus is a {type(document).__name__}, not a string.")
        yield document


@contextmanager
def _reading(path: Path, encoding: str) -> Iterator[None]:
    """Bytes that do not decode, or a file that cannot be read, as a CorpusError naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise _undecodable(path, encoding, e) from None
    except OSError as e:
        raise CorpusError(f"{path} could not be read ({e.strerror or e}).") from None


def _lines(path: Path, encoding: str, errors: str) -> Iterator[str]:
    with _reading(path, encoding), path.open(encoding=encoding, errors=errors) as f:
        for line in f:
            yield line.rstrip("\n")


def _jsonl(path: Path, encoding: str, errors: str) -> Iterator[str]:
    with _reading(path, encoding), path.open(encoding=encoding, errors=errors) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{number} is not valid JSON ({e}); each line must be one JSON object.") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{number} has no string \"text\" field; each line must be {{\"text\": \"...\"}}.")
            yield text


def _undecodable(path: Path, encoding: str, error: UnicodeDecodeError) -> CorpusError:
    """A CorpusError saying where in ``path`` the first byte ``encoding`` cannot decode is (the
    decoder reads in chunks, so find the line again: exact for ASCII-compatible encodings)."""
    where, offset = "", 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                where = f" at line {number}, byte {offset + e.start} ({raw[e.start : e.start + 4]!r}...)"
                break
            offset += len(raw)
    return CorpusError(
        f"{path} is not {encoding} text{where}: {error.reason}. Pass the file's encoding (encoding='latin-1', "
        "'cp1252', ...; `mlxterp cache --encoding`), or errors='replace' to read it with U+FFFD for the bad "
        "bytes, or convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 in.txt > out.txt)."
    )


def _describe(corpus: Any) -> str:
    return repr(str(corpus)) if isinstance(corpus, (str, Path)) else f"({type(corpus).__name__})"


def default_corpus(min_chars: int = 40) -> list[str]:
    """An offline corpus of real English: the paragraphs of the Python language reference
    topics that ship with every CPython (``pydoc_data.topics``), in sorted topic order.

    About 2,000 documents (~108K tokens for SmolLM2); the text varies with the Python
    version, so a dataset's manifest records the token stream's hash, not the corpus name.
    """
    from pydoc_data.topics import topics

    documents = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if len(paragraph.strip()) >= min_chars and not set(paragraph.strip()) <= set("*=-~^"):
                documents.append(paragraph)
    return documents


@attrs.frozen(eq=False)
class Windows:
    """One batch of token windows and where every token came from.

    Attributes (B rows, T = the longest row of the batch, at most ``context_size``):
        tokens: (B, T) int32 token ids, the pad id at padding.
        lengths: (B,) int32 real tokens per row; positions at and after it are padding.
        document: (B, T) int32 index of each token's document in the corpus, -1 at padding.
        position: (B, T) int32 index of each token within its document, -1 at padding.
        bos: (B, T) bool, True at BOS tokens.
        index: this batch's number, counted from 0.
        first_window: the number of this batch's first row among all windows.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    document: np.ndarray
    position: np.ndarray
    bos: np.ndarray
    index: int
    first_window: int

    @property
    def mask(self) -> np.ndarray:
        """(B, T) bool: True at real tokens, False at padding."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    @property
    def inputs(self) -> mx.array:
        """The (B, T) token ids as an mx.array, ready for ``model(...)`` or ``model.trace``."""
        return mx.array(self.tokens)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.tokens.shape[0]


def token_windows(
    tokenizer: Any,
    corpus: str | Path | Iterable[str] | TokenizedCorpus,
    context_size: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    packing: bool = True,
    prepend_bos: bool = True,
    max_tokens: int | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> Iterator[Windows]:
    """Batches of ``batch_size`` token windows of ``corpus`` (see the module doc).

    Args:
        tokenizer: the tokenizer; an InterpretableModel stands for its own tokenizer (and
            then the ids are also checked against its embedding).
        corpus: a path or an iterable of strings (see :func:`read_documents`), read and
            tokenized as the windows are made; or a :class:`TokenizedCorpus` (tokenized once
            by :func:`tokenize`, then ``prepend_bos`` and ``max_tokens`` are its own).
        context_size: tokens per window (T).
        batch_size: windows per batch (B); only the last batch can have fewer.
        packing: pack documents into full windows (True) or one document per window (False).
        prepend_bos: start every document with the tokenizer's BOS token (if it has one).
        max_tokens: stop after this many tokens (BOS tokens included); None reads everything.
        encoding: the text encoding of corpus files (see :func:`read_documents`).
        errors: what to do with bytes that do not decode ("strict": a CorpusError).

    Yields:
        :class:`Windows`, in corpus order.
    """
    if isinstance(corpus, TokenizedCorpus):
        return corpus.windows(context_size, batch_size=batch_size, packing=packing)
    return tokenize(tokenizer, corpus, prepend_bos=prepend_bos, max_tokens=max_tokens, keep=False,
                    encoding=encoding, errors=errors).windows(context_size, batch_size=batch_size, packing=packing)


def tokenize(
    tokenizer: Any,
    corpus: str | Path | Iterable[str],
    *,
    prepend_bos: bool = True,
    max_tokens: int | None = None,
    keep: bool = True,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> TokenizedCorpus:
    """``corpus`` tokenized once (each document encoded once, BOS prepended as
    :func:`token_windows` does), so that it can be windowed any number of times without
    reading or encoding it again; ``keep=False`` reads and encodes lazily instead, for one
    pass. ``tokenizer`` as in :func:`token_windows`; corpus files are decoded with
    ``encoding`` and ``errors`` (see :func:`read_documents`)."""
    tokenizer, vocab = _tokenizer(tokenizer)
    if max_tokens is not None and (not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise CorpusError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    bos_id = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    bos_id = bos_id if isinstance(bos_id, int) else None
    pieces = _tokenized(tokenizer, read_documents(corpus, encoding=encoding, errors=errors), bos_id, max_tokens)
    return TokenizedCorpus(tokenizer, list(pieces) if keep else pieces, vocab)


class TokenizedCorpus:
    """A corpus tokenized by :func:`tokenize`: per document, its int32 ids (BOS prepended).
    ``windows(...)`` cuts it into batches of token windows as :func:`token_windows` does;
    ``n_tokens`` counts its tokens. Kept in memory: 4 bytes a token."""

    def __init__(self, tokenizer: Any, pieces: Any, vocab_size: int | None):
        self.tokenizer, self.pieces, self.vocab_size = tokenizer, pieces, vocab_size
        self._read = False

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.pieces)

    def windows(self, context_size: int, *, batch_size: int = DEFAULT_BATCH_SIZE, packing: bool = True) -> Iterator[Windows]:
        """Batches of token windows (see :func:`token_windows`)."""
        for name, value in (("context_size", context_size), ("batch_size", batch_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise CorpusError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.pieces, list):
            if self._read:
                raise CorpusError("this corpus was read lazily and has been read: tokenize(..., keep=True) to window it again.")
            self._read = True
        return self._windows(context_size, batch_size, packing)

    def _windows(self, context_size: int, batch_size: int, packing: bool) -> Iterator[Windows]:
        tokenizer = self.tokenizer
        windows = _packed(self.pieces, context_size) if packing else _per_document(self.pieces, context_size)
        fill = pad_id(tokenizer)
        marker = getattr(tokenizer, "bos_token_id", None)
        marker = marker if isinstance(marker, int) else None
        batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        index = first = 0
        for window in windows:
            batch.append(window)
            if len(batch) == batch_size:
                yield _checked(_batch(batch, fill, marker, index, first), self.vocab_size)
                index, first, batch = index + 1, first + len(batch), []
        if batch:
            yield _checked(_batch(batch, fill, marker, index, first), self.vocab_size)


def _checked(windows: Windows, vocab_size: int | None) -> Windows:
    """The batch, its ids checked against the model's embedding (a tokenizer of another model
    gives ids this one does not have)."""
    check_token_ids(mx.array(windows.tokens), vocab_size)
    return windows


def _tokenizer(source: Any) -> tuple[Any, int | None]:
    """(tokenizer, embedding rows to check ids against) of a tokenizer or of an
    InterpretableModel (anything with ``.tokenizer`` and ``.embedding_vocab_size``)."""
    if not hasattr(source, "embedding_vocab_size"):
        return source, None
    if source.tokenizer is None:
        raise CorpusError(
            "windowing a text corpus needs a tokenizer: InterpretableModel(module, tokenizer=...) "
            "or mlxterp.load(...), which brings the model's own."
        )
    return source.tokenizer, source.embedding_vocab_size


def _tokenized(tokenizer, documents, bos_id, max_tokens) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, int32 token ids) per document, BOS prepended, cut at ``max_tokens``."""
    seen = 0
    for doc, text in enumerate(documents):
        ids = encode(tokenizer, text)
        if bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        if not ids:
            continue
        if max_tokens is not None:
            ids = ids[: max_tokens - seen]
        seen += len(ids)
        yield doc, np.asarray(ids, dtype=np.int32)
        if max_tokens is not None and seen >= max_tokens:
            return


def _packed(pieces, width: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows of exactly ``width`` tokens of the concatenated stream (the last may be short):
    (ids, document, position) per window."""
    ids: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    held = 0
    for doc, tokens in pieces:
        ids.append(tokens)
        docs.append(np.full(len(tokens), doc, dtype=np.int32))
        positions.append(np.arange(len(tokens), dtype=np.int32))
        held += len(tokens)
        if held >= width:
            stream = [np.concatenate(a) for a in (ids, docs, positions)]
            full = held // width * width
            for start in range(0, full, width):
                yield tuple(a[start : start + width] for a in stream)
            ids, docs, positions = ([a[full:]] for a in stream)
            held -= full
    if held:
        yield tuple(np.concatenate(a) for a in (ids, docs, positions))


def _per_document(pieces, width: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for doc, tokens in pieces:
        for start in range(0, len(tokens), width):
            piece = tokens[start : start + width]
            yield piece, np.full(len(piece), doc, dtype=np.int32), np.arange(start, start + len(piece), dtype=np.int32)


def _batch(rows, fill: int, bos_id: int | None, index: int, first: int) -> Windows:
    lengths = np.array([len(ids) for ids, _, _ in rows], dtype=np.int32)
    shape = (len(rows), int(lengths.max()))
    tokens = np.full(shape, fill, dtype=np.int32)
    document = np.full(shape, -1, dtype=np.int32)
    position = np.full(shape, -1, dtype=np.int32)
    for b, (ids, docs, positions) in enumerate(rows):
        n = len(ids)
        tokens[b, :n], document[b, :n], position[b, :n] = ids, docs, positions
    bos = (tokens == bos_id) & (position >= 0) if bos_id is not None else np.zeros(shape, dtype=bool)
    return Windows(tokens, lengths, document, position, bos, index, first)
