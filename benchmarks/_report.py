"""Shared by the benchmarks: print a table and append it, with date and machine, to
benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

# DASKDL_BENCH_RESULTS names another file to append to (``daskdl bench`` and the tests use it
# so that small trial runs stay out of the recorded tables).
RESULTS = Path(os.environ.get("DASKDL_BENCH_RESULTS") or Path(__file__).with_name("RESULTS.md"))


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = ""
    if torch.cuda.is_available():
        gpus = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB{gpus}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, description: str, headers: list[str], rows: list[list], summary: str):
    """Print the table and the summary line; append both to RESULTS.md."""
    text = table(headers, rows)
    print(text)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(RESULTS, "a") as f:
        f.write(f"\n## {name}: {stamp}\n\n{description}\n\nMachine: {machine()}\n\n")
        f.write(f"{text}\n\n`{summary}`\n")
    print(summary)
