"""A run's folder belongs to one run.

``out=`` holds ``config.json``, ``metrics.csv`` and ``checkpoints/epoch-NNNN``. A second run
written into the same folder would replace some of the first run's files and leave others
beside them, and ``resume=`` would then continue whichever run wrote the newest checkpoint.
So :func:`claim` refuses a folder that holds another run, unless the new run continues it
(``resume=`` its newest checkpoint) or replaces it (``overwrite=True``).

A replacing run writes into a staging folder beside ``out`` until its first checkpoint is
written; then rank 0 swaps it in (:func:`commit`). A run that fails or stops before that
leaves the earlier run as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from daskdl.checkpoint import files as checkpoint

logger = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a daskdl run's files."""
    if not folder.is_dir():
        return False
    return (
        (folder / CONFIG).exists()
        or (folder / METRICS).exists()
        or bool(checkpoint.list_checkpoints(folder / CHECKPOINTS))
    )


def _describe(folder: Path) -> str:
    found = [name for name in (CONFIG, METRICS) if (folder / name).exists()]
    epochs = [p.name for p in checkpoint.list_checkpoints(folder / CHECKPOINTS)]
    if epochs:
        found.append(f"checkpoints {epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else epochs[0])
    return ", ".join(found)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check(out: Path, resume: Path | None, overwrite: bool) -> None:
    """Whether a run may write into ``out``; changes nothing.

    Refuses, naming what is there and the fixes: a path that is a file, a folder that holds
    another run (unless ``resume`` continues its newest checkpoint), and resuming an older
    checkpoint of ``out`` into ``out`` (its newer ones would stay beside the new run's).
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"out={str(out)!r} is a file, not a folder: give a folder for the run's "
            "checkpoints and metrics."
        )
    continuing = resume is not None and _inside(resume, out)
    if resume is not None and continuing and not overwrite:
        newest = checkpoint.checkpoints_at(out)
        if newest and not _inside(newest[-1], resume):
            raise FileExistsError(
                f"resume={str(resume)!r} is not the newest checkpoint of {str(out)!r} "
                f"({newest[-1].name} is): continuing it there would leave the newer "
                "checkpoints beside the new run's. Give another out= for the new branch, or "
                "overwrite=True to replace the folder."
            )
    if holds_run(out) and not continuing and not overwrite:
        raise FileExistsError(
            f"out={str(out)!r} already holds another run ({_describe(out)}). Continue it with "
            f"resume={str(out)!r}, choose another out=, or pass overwrite=True to replace it "
            "once the new run has written its first checkpoint (CLI: --resume, another "
            "--out, --overwrite)."
        )


def claim(out: Path, resume: Path | None, overwrite: bool, run_id: str) -> Path | None:
    """Make ``out`` this run's folder (after :func:`check`, once the run is about to start);
    return the staging folder the run writes into until its first checkpoint replaces
    ``out`` (``overwrite``), else None. A folder that cannot be written is an ``OSError``
    naming it."""
    check(out, resume, overwrite)
    staging = None
    if overwrite and holds_run(out):
        staging = out.parent / f".{out.name}.new-{run_id}"
    folder = staging or out
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".daskdl-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise type(e)(
            f"cannot write the run folder {str(folder)!r} ({e.strerror or e}). Choose a "
            "folder you can write to (out=, --out)."
        ) from None
    return staging


def writing_to(out: str | os.PathLike, staging: str | os.PathLike | None) -> Path:
    """The folder a run writes into now: its staging folder until that replaced ``out``."""
    if staging is not None and Path(staging).exists():
        return Path(staging)
    return Path(out)


def commit(out: str | os.PathLike, staging: str | os.PathLike | None) -> None:
    """Replace ``out`` by the staging folder (rank 0, after the run's first checkpoint);
    nothing to do once it has been."""
    if staging is None or not Path(staging).exists():
        return
    out, staging = Path(out), Path(staging)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("%s now holds the new run (the earlier run's files were removed)", out)


def abandon(out: Path, staging: Path | None, status: str) -> None:
    """A replacing run ended before its first checkpoint: drop its staging folder, leaving
    the earlier run in ``out`` as it was."""
    if staging is None or not staging.exists():
        return
    shutil.rmtree(staging, ignore_errors=True)
    logger.warning(
        "The run %s before writing a checkpoint; %s still holds the earlier run.", status, out
    )


def save_checkpoint(
    out: str,
    staging: str | None,
    epoch: int,
    model: dict,
    optimizer: tuple[dict, list],
    manifest: dict,
    keep: int | None,
    key,
) -> Path:
    """Rank 0 writes the run's checkpoint ``epoch`` (signed with ``key``, atomic, ``keep``
    newest); a replacing run's staging folder becomes ``out`` on its first one. Returns the
    checkpoint's path in ``out``."""
    from daskdl.checkpoint import files as checkpoint

    folder = writing_to(out, staging)
    path = checkpoint.save(folder / CHECKPOINTS, epoch, model, optimizer, manifest, keep, key)
    commit(out, staging)  # a replaced run goes only now
    return writing_to(out, staging) / path.relative_to(folder)
