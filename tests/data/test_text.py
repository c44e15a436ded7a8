"""Text: word counts equal collections.Counter exactly, vocabularies, token-id data sets, and
text models trained through daskdl.fit."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskdl
from daskdl.data import text
from daskdl.data.dataset import Dataset

LINES = [
    "The cat sat on the mat.",
    "Le café est très bon; naïve façade, ÉCOLE école!",
    "Don't panic: it's 42 o'clock_now and the cat's toy",
    "",
    "Ünïcödé wörds, ПРИВЕТ мир, and the end",
] * 7


def _expected(lines, stop_words=frozenset(), min_length=1):
    counts = Counter()
    for line in lines:
        counts.update(
            w for w in text.tokenize(line) if len(w) >= min_length and w not in stop_words
        )
    return counts


def test_tokenize_is_unicode_aware():
    assert text.tokenize("Café NAÏVE don't x_y 42abc ПРИВЕТ") == [
        "café",
        "naïve",
        "don't",
        "x",
        "y",
        "abc",
        "привет",
    ]


@pytest.mark.parametrize("npartitions", [1, 3, 7])
def test_counts_from_a_bag_equal_counter(client, npartitions):
    freqs = text.word_frequencies(db.from_sequence(LINES, npartitions=npartitions))
    assert dict(freqs) == _expected(LINES)
    assert list(freqs) == sorted(freqs, reverse=True)  # most frequent first


@pytest.mark.parametrize("npartitions", [1, 4])
def test_counts_from_a_dataframe_column_equal_counter(client, npartitions):
    pdf = pd.DataFrame({"text": LINES + [None], "n": range(len(LINES) + 1)})
    freqs = text.word_frequencies(dd.from_pandas(pdf, npartitions=npartitions)["text"])
    assert dict(freqs) == _expected(LINES)


@pytest.mark.parametrize("blocksize", [40, 1000, 2**20])
def test_counts_from_files_equal_counter(client, tmp_path, blocksize):
    for i in range(3):
        (tmp_path / f"part-{i}.txt").write_text("\n".join(LINES[i::3]) + "\n", encoding="utf-8")
    # Small blocks cut the files into many pieces, at line ends.
    freqs = text.word_frequencies(str(tmp_path / "*.txt"), blocksize=blocksize)
    assert dict(freqs) == _expected(LINES)


def test_stop_words_min_length_and_top(client):
    bag = db.from_sequence(LINES, npartitions=2)
    freqs = text.word_frequencies(bag, stop_words="english", min_length=3, top=5)
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    expected = _expected(LINES, frozenset(ENGLISH_STOP_WORDS), 3)
    top = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert list(freqs.items()) == top
    assert "the" not in freqs.index


def test_invalid_utf8_names_the_file_or_is_replaced(client, tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine words here\n")
    bad.write_bytes(b"caf\xe9 latin-1 text\n")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8 \(byte 3.*errors='replace'"):
        text.word_frequencies([str(good), str(bad)])
    freqs = text.word_frequencies([str(good), str(bad)], errors="replace")
    assert freqs["caf"] == 1 and freqs["fine"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"errors": "loose"}, "errors must be one of"),
        ({"min_length": 0}, "min_length must be a positive integer"),
        ({"top": -1}, "top must be a positive integer"),
        ({"stop_words": "german"}, "stop_words must be 'english'"),
    ],
)
def test_bad_options_are_named(client, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text.word_frequencies(db.from_sequence(LINES), **kwargs)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        text.word_frequencies(str(tmp_path / "nothing-here*.txt"))


def test_vocab_and_encode(client):
    freqs = text.word_frequencies(db.from_sequence(LINES, npartitions=2))
    vocab = text.build_vocab(freqs, max_size=6, min_count=2)
    assert vocab.itos[:2] == ["<pad>", "<unk>"] and len(vocab) == 6
    assert vocab.itos[2] == "the"  # the most frequent word gets the first id
    second = vocab.itos[3]
    texts = db.from_sequence([f"the {second}", "zebra the the the"], npartitions=2)
    ids = text.encode(texts, vocab, 3)
    # Padded with 0, unknown words are 1, cut at seq_len.
    assert ids.compute().tolist() == [[2, 3, 0], [1, 2, 2]]


def _topics(n=800, seed=0):
    """Two topics drawn from different word distributions, with shared noise words."""
    rng = np.random.default_rng(seed)
    topics = {
        "sport": "ball goal team match score player coach league win field".split(),
        "science": "atom cell energy theory data lab experiment gene star physics".split(),
    }
    noise = "the a of and to in is it that for on with as was".split()
    rows = []
    for i in range(n):
        topic = ["sport", "science"][i % 2]
        words = list(rng.choice(topics[topic], size=4)) + list(rng.choice(noise, size=8))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topic": topic})
    return pd.DataFrame(rows)


def test_fasttext_classifies_topics(client):
    ddf = dd.from_pandas(_topics(), npartitions=4)
    vocab = text.build_vocab(text.word_frequencies(ddf["text"]))
    data = Dataset.from_text(ddf, "text", "topic", vocab, seq_len=16)
    assert data.classes == ["science", "sport"] and data.sample_shape == (16,)
    train, val = data.split(0.25, seed=0)
    run = daskdl.fit(
        client,
        ("fasttext", {"vocab_size": len(vocab)}),
        train,
        val=val,
        epochs=6,
        batch_size=16,
        lr=0.5,
        progress=False,
    )
    assert run.history["val_accuracy"].iloc[-1] >= 0.95
    assert run.evaluate(val)["accuracy"] >= 0.95


def test_text_runs_checkpoint_resume_and_average_like_any_other(client, tmp_path):
    ddf = dd.from_pandas(_topics(400, seed=2), npartitions=4)
    vocab = text.build_vocab(text.word_frequencies(ddf["text"]))
    train, val = Dataset.from_text(ddf, "text", "topic", vocab, seq_len=12).split(0.25, seed=0)
    model = ("fasttext", {"vocab_size": len(vocab), "dim": 16})
    # A constant rate: a 2-epoch run then follows the same schedule as a 4-epoch one.
    opts = dict(batch_size=16, lr=0.5, schedule="constant", sync_every=3, seed=1, progress=False)
    whole = daskdl.fit(client, model, train, val=val, epochs=4, **opts)
    daskdl.fit(client, model, train, val=val, epochs=2, out=tmp_path, **opts)
    resumed = daskdl.fit(
        client, model, train, val=val, epochs=4, out=tmp_path, resume=tmp_path, **opts
    )
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert a.detach().equal(b.detach())
    assert resumed.history["epoch"].tolist() == [1, 2, 3, 4]


def test_transformer_classifier_trains(client):
    ddf = dd.from_pandas(_topics(400, seed=1), npartitions=4)
    vocab = text.build_vocab(text.word_frequencies(ddf["text"]))
    train, val = Dataset.from_text(ddf, "text", "topic", vocab, seq_len=12).split(0.25, seed=0)
    run = daskdl.fit(
        client,
        ("transformer", {"vocab_size": len(vocab), "dim": 32, "layers": 1}),
        train,
        val=val,
        epochs=4,
        batch_size=16,
        lr=1e-3,
        optimizer="adamw",
        progress=False,
    )
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_language_model_beats_unigram_perplexity(client):
    paragraphs = daskdl.datasets.python_docs(npartitions=4)
    train_text, val_text = text.split_corpus(paragraphs, test_size=0.1, seed=0)
    vocab = text.build_vocab(text.word_frequencies(train_text), max_size=2000)
    train = Dataset.from_corpus(train_text, vocab, seq_len=12, stride=2)
    val = Dataset.from_corpus(val_text, vocab, seq_len=12, stride=2)
    run = daskdl.fit(
        client,
        ("gru_lm", {"dim": 96}),
        train,
        val=val,
        epochs=3,
        batch_size=128,
        lr=2e-3,
        optimizer="adamw",
        schedule="constant",
        progress=False,
    )
    perplexity = run.history["val_perplexity"].iloc[-1]
    assert perplexity == pytest.approx(np.exp(run.history["val_loss"].iloc[-1]))
    unigram = text.unigram_perplexity(train.y.compute(), val.y.compute(), len(vocab))
    print(f"validation perplexity {perplexity:.1f}, unigram {unigram:.1f}")
    assert perplexity < 0.6 * unigram


@pytest.mark.integration
def test_words_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    plot = tmp_path / "words.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daskdl",
            "words",
            str(corpus),
            "--top",
            "3",
            "--workers",
            "1",
        ]
        + ["--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.strip().splitlines()[-3:]]
    expected = sorted(_expected(LINES).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(w, int(c)) for w, c in rows] == expected
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
