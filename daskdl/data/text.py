"""Text on Dask: word frequencies over a corpus, a vocabulary, and token-id data sets.

Counting is the classic distributed NLP job: every partition (a block of a file, a partition of
a bag or of a dataframe column) is tokenised and counted where it lives, and Dask adds the
partition counts up in a tree. Only the counts travel, never the raw text.

Tokenisation: lowercase, then words of Unicode letters with inner apostrophes (``don't``,
``café``, ``naïve``); digits and underscores separate words. Optional stop words and a minimum
length.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import dask
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd

WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
PAD, UNK = "<pad>", "<unk>"
ERRORS = ("strict", "replace", "ignore")


def tokenize(text: str, stop_words: frozenset[str] = frozenset(), min_length: int = 1):
    """The words of ``text``, lowercased, in order.

    Examples
    --------
    >>> tokenize("Don't panic: café NAÏVE_42 x", min_length=2)
    ["don't", 'panic', 'café', 'naïve']
    """
    words = WORD.findall(text.lower())
    if stop_words or min_length > 1:
        words = [w for w in words if len(w) >= min_length and w not in stop_words]
    return words


def _stop_words(stop_words) -> frozenset[str]:
    if stop_words is None:
        return frozenset()
    if stop_words == "english":
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS)
    if isinstance(stop_words, str):
        raise ValueError(
            f"stop_words must be 'english' or a collection of words, got {stop_words!r}."
        )
    return frozenset(w.lower() for w in stop_words)


def _count_texts(texts: Iterable[str], stop_words, min_length) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        if isinstance(text, str):  # a missing value in a dataframe column counts nothing
            counts.update(tokenize(text, stop_words, min_length))
    return counts


def _count_block(block: bytes, path: str, offset: int, errors: str, stop_words, min_length):
    try:
        text = block.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {offset + e.start}: {e.reason}). Fix the file, or "
            "decode it anyway with errors='replace' (or 'ignore'; CLI: --errors replace)."
        ) from None
    return [_count_texts([text], stop_words, min_length)]


def _merge(parts: Iterable[Counter]) -> Counter:
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def _files(source: str | os.PathLike | Sequence) -> list[str]:
    import glob

    patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for pattern in [os.fspath(p) for p in patterns]:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [f for f in matched if not os.path.isfile(f)]
        if not matched or missing:
            raise FileNotFoundError(f"No text file at {missing[0] if missing else pattern!r}.")
        files += matched
    return files


def _file_counts(files: list[str], blocksize: int, errors: str, stop_words, min_length):
    """One delayed count per block of about ``blocksize`` bytes, cut at line ends."""
    from dask.bytes import read_bytes

    parts = []
    for path in files:
        _, blocks = read_bytes(path, delimiter=b"\n", blocksize=blocksize, sample=False)
        size = os.path.getsize(path)
        offsets = range(0, max(size, 1), blocksize) if blocksize else [0]
        for block, offset in zip(blocks[0], offsets):
            parts.append(
                dask.delayed(_count_block)(block, path, offset, errors, stop_words, min_length)
            )
    return db.from_delayed(parts)


def word_frequencies(
    source,
    *,
    stop_words: str | Iterable[str] | None = None,
    min_length: int = 1,
    top: int | None = None,
    errors: str = "strict",
    blocksize: int | str = "32MiB",
    client=None,
) -> pd.Series:
    """Count the words of a corpus on the cluster.

    Parameters
    ----------
    source
        A path or glob of text files (or a list of them), a ``dask.bag`` of strings (lines,
        paragraphs, documents), or a text column of a Dask dataframe (a ``dask`` Series).
    stop_words
        ``"english"`` (scikit-learn's list) or any collection of words to leave out.
    min_length
        Shorter words are left out.
    top
        Only the ``top`` most frequent words.
    errors
        Files that are not valid UTF-8 are an error naming the file (``"strict"``), or are
        decoded with ``"replace"`` (U+FFFD) or ``"ignore"``.
    blocksize
        Files are read in blocks of about this size, so that one large file is counted in
        parallel too.
    client
        The ``distributed.Client`` to compute on (default: the current one).

    Returns
    -------
    A pandas Series of counts indexed by word, most frequent first (ties alphabetical).

    Examples
    --------
    >>> freqs = word_frequencies("corpus/*.txt", stop_words="english", top=20)  # doctest: +SKIP
    """
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}.")
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 1:
        raise ValueError(f"min_length must be a positive integer, got {min_length!r}.")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive integer, got {top!r}.")
    stops = _stop_words(stop_words)
    if isinstance(source, db.Bag):
        counts = source.map_partitions(lambda texts: [_count_texts(texts, stops, min_length)])
    elif isinstance(source, dd.Series):
        counts = db.from_delayed(
            [
                dask.delayed(lambda s: [_count_texts(s, stops, min_length)])(part)
                for part in source.to_delayed()
            ]
        )
    elif isinstance(source, dd.DataFrame):
        raise TypeError("Pass one text column of the dataframe, as ddf['text'].")
    else:
        size = dask.utils.parse_bytes(blocksize) if isinstance(blocksize, str) else blocksize
        counts = _file_counts(_files(source), size, errors, stops, min_length)
    total = counts.reduction(_merge, _merge, split_every=8)
    result = total.compute() if client is None else client.compute(total).result()
    return _sorted_series(result, top)


def _sorted_series(counts: Counter, top: int | None = None) -> pd.Series:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top is not None:
        items = items[:top]
    series = pd.Series(
        [c for _, c in items], index=pd.Index([w for w, _ in items], name="word"), dtype="int64"
    )
    return series.rename("count")


class Vocab:
    """Words to ids: ``<pad>`` is 0, ``<unk>`` (every other word) is 1.

    Examples
    --------
    >>> vocab = build_vocab(pd.Series({"the": 5, "cat": 2, "sat": 1}), min_count=2)
    >>> len(vocab), vocab.ids(["the", "dog"])
    (4, [2, 1])
    """

    def __init__(self, words: Sequence[str]):
        self.itos = [PAD, UNK, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"<daskdl.data.text.Vocab {len(self)} ids>"

    def ids(self, words: Iterable[str]) -> list[int]:
        stoi = self.stoi
        return [stoi.get(w, 1) for w in words]


def build_vocab(freqs: pd.Series, max_size: int | None = None, min_count: int = 1) -> Vocab:
    """The most frequent words (at most ``max_size`` ids in all, PAD and UNK included), each
    seen at least ``min_count`` times."""
    if max_size is not None and max_size < 3:
        raise ValueError(f"max_size must leave room for a word besides PAD and UNK: {max_size}.")
    words = _sorted_series(Counter(freqs.to_dict()))
    words = words[words >= min_count].index.tolist()
    if max_size is not None:
        words = words[: max_size - 2]
    return Vocab(words)


def _encode_rows(texts, vocab: Vocab, seq_len: int) -> np.ndarray:
    texts = list(texts)
    out = np.zeros((len(texts), seq_len), dtype=np.int32)
    for i, text in enumerate(texts):
        ids = vocab.ids(tokenize(text if isinstance(text, str) else ""))[:seq_len]
        out[i, : len(ids)] = ids
    return out


def encode(texts, vocab: Vocab, seq_len: int):
    """Token ids ``(n, seq_len)`` (padded with 0, cut at ``seq_len``) as a lazy Dask array,
    one block per partition of ``texts`` (a ``dask.bag`` of strings or a Dask Series)."""
    import dask.array as da

    blocks = [
        da.from_delayed(
            dask.delayed(_encode_rows)(part, vocab, seq_len), (np.nan, seq_len), np.int32
        )
        for part in texts.to_delayed()
    ]
    return da.concatenate(blocks, allow_unknown_chunksizes=True)


def token_columns(seq_len: int) -> list[str]:
    return [f"t{i}" for i in range(seq_len)]


def labelled_frame(ddf: dd.DataFrame, text: str, label: str, vocab: Vocab, seq_len: int):
    """``ddf`` with its ``text`` column replaced by ``seq_len`` token-id columns; labels that
    are not integers (topic names, say) become ids in sorted order."""
    for column in (text, label):
        if column not in ddf.columns:
            raise KeyError(
                f"Column {column!r} is not in the dataframe; it has {list(ddf.columns)}."
            )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    classes = None
    if not pd.api.types.is_integer_dtype(ddf[label].dtype):
        classes = sorted(ddf[label].dropna().unique().compute().tolist())
    columns = token_columns(seq_len)

    def encode_partition(pdf: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(
            _encode_rows(pdf[text].tolist(), vocab, seq_len), columns=columns, index=pdf.index
        )
        y = pdf[label]
        out[label] = y.map({c: i for i, c in enumerate(classes)}) if classes else y
        return out.astype({label: "int64"})

    meta = pd.DataFrame({c: pd.Series(dtype="int32") for c in columns})
    meta[label] = pd.Series(dtype="int64")
    return ddf.map_partitions(encode_partition, meta=meta), classes


def _windows(texts, vocab: Vocab, seq_len: int, stride: int) -> pd.DataFrame:
    ids = np.asarray([i for t in texts for i in vocab.ids(tokenize(t))], dtype=np.int32)
    columns = [*token_columns(seq_len), "next"]
    if len(ids) <= seq_len:
        return pd.DataFrame(np.zeros((0, seq_len + 1), np.int32), columns=columns)
    starts = np.arange(0, len(ids) - seq_len, stride)
    rows = ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return pd.DataFrame(rows, columns=columns).astype({"next": "int64"})


def corpus_frame(bag: db.Bag, vocab: Vocab, seq_len: int, stride: int = 1) -> dd.DataFrame:
    """Next-word windows of a ``dask.bag`` of texts: ``seq_len`` token ids and the id that
    follows them, every ``stride`` tokens, within each partition."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}.")
    meta = _windows([], vocab, seq_len, stride)
    parts = [dask.delayed(_windows)(part, vocab, seq_len, stride) for part in bag.to_delayed()]
    return dd.from_delayed(parts, meta=meta)


def split_corpus(bag: db.Bag, test_size: float = 0.1, seed: int = 0) -> tuple[db.Bag, db.Bag]:
    """Split a bag of texts (paragraphs, documents) into two, seeded per partition.

    Split texts, not windows: windows cut from one text overlap, so splitting them would put
    nearly the same sample on both sides and flatter the validation score.
    """
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size!r}.")

    parts = bag.to_delayed()
    train = db.from_delayed(
        [dask.delayed(_pick)(p, i, seed, test_size, False) for i, p in enumerate(parts)]
    )
    test = db.from_delayed(
        [dask.delayed(_pick)(p, i, seed, test_size, True) for i, p in enumerate(parts)]
    )
    return train, test


def _pick(part, index: int, seed: int, test_size: float, keep_test: bool) -> list:
    part = list(part)
    test = np.random.default_rng([seed, index]).random(len(part)) < test_size
    return [t for t, is_test in zip(part, test) if bool(is_test) == keep_test]


def unigram_perplexity(train_targets: np.ndarray, val_targets: np.ndarray, vocab_size: int):
    """Perplexity on ``val_targets`` of word frequencies counted on ``train_targets`` (add-one
    smoothed): the baseline a language model has to beat."""
    counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[np.asarray(val_targets, dtype=np.int64)].mean()))
