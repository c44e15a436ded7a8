"""Word frequencies over a few hundred MB of text on 2 workers, against one process counting
with ``collections.Counter``: the same files, the same tokenizer, in this one process run.

    python benchmarks/words.py [--mb 300] [--files 8]

The corpus is Python's own documentation (``pydoc_data.topics``, shipped with Python), its
paragraphs shuffled and repeated until the files hold ``--mb`` MB. Both counts must agree
exactly. Ends with ``words ratio=<single-process time / daskdl time> target=1.6``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from _report import report

import daskdl
from daskdl.data import text


def write_corpus(folder: Path, mb: int, files: int, seed: int = 0) -> list[Path]:
    paragraphs = daskdl.datasets.python_docs(npartitions=1).compute()
    rng = random.Random(seed)
    per_file = mb * 2**20 // files
    paths = []
    for i in range(files):
        path = folder / f"docs-{i:02d}.txt"
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                rng.shuffle(paragraphs)
                chunk = "\n".join(paragraphs) + "\n"
                f.write(chunk)
                written += len(chunk.encode("utf-8"))
        paths.append(path)
    return paths


def single_process(paths: list[Path]) -> Counter:
    counts: Counter = Counter()
    for path in paths:
        counts.update(text.tokenize(path.read_text(encoding="utf-8")))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(Path(tmp), args.mb, args.files)
        size = sum(p.stat().st_size for p in paths) / 2**20
        times: dict[str, list[float]] = {"Counter, 1 process": [], "daskdl, 2 workers": []}
        with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
            for _ in range(2):  # alternate, so that a noisy neighbour hurts both alike
                start = time.perf_counter()
                expected = single_process(paths)
                times["Counter, 1 process"].append(time.perf_counter() - start)
                start = time.perf_counter()
                freqs = text.word_frequencies(f"{tmp}/docs-*.txt", client=client)
                times["daskdl, 2 workers"].append(time.perf_counter() - start)
                assert dict(freqs) == expected, "the two counts differ"
    base = statistics.median(times["Counter, 1 process"])
    rows = [
        [
            name,
            statistics.median(t),
            min(t),
            size / statistics.median(t),
            base / statistics.median(t),
        ]
        for name, t in times.items()
    ]
    speedup = rows[1][-1]
    report(
        "words",
        f"Word frequencies over {size:.0f} MB in {args.files} files (Python's documentation, "
        f"shuffled and repeated; {sum(expected.values()):,} words, {len(expected):,} distinct); "
        "the counts agree exactly. Median of two alternating runs.",
        ["counter", "median s", "min s", "MB/s", "speed-up"],
        rows,
        f"words ratio={speedup:.3f} target=1.6",
    )


if __name__ == "__main__":
    main()
