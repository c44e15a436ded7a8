"""The order in which a pipeline stage runs its passes in one step.

A model cut into ``stages * chunks`` pieces puts piece ``g`` on stage ``g % stages``: with
one chunk each stage holds one run of consecutive layers; with more, each stage holds
``chunks`` runs spread through the model (stage 0 of 2 holds pieces 0 and 2), and a
microbatch goes round the stages ``chunks`` times. The bubble (the time a stage waits at the
start and the end of a step) shrinks by that factor, at the cost of ``chunks`` times the
messages: Megatron-LM's interleaved 1F1B (Narayanan et al., 2021).

An order is a list of ``(pass, chunk, microbatch)``: ``"F"`` forward or ``"B"`` backward
of the stage's ``chunk``-th piece on that microbatch.
"""

from __future__ import annotations

from daskdl.config.pipeline import check_microbatches

Pass = tuple[str, int, int]


def order(schedule: str, stages: int, stage: int, microbatches: int, chunks: int = 1):
    """The passes of ``stage`` (of ``stages``) in one step of ``microbatches``.

    GPipe runs every forward, then every backward. 1F1B runs a few forwards (warm-up), then
    one forward and one backward in turn, then the backwards left, so that at most
    ``stages`` microbatches' activations are alive on a stage with one chunk (Megatron's
    warm-up of ``2 * (stages - stage - 1) + (chunks - 1) * stages`` with more). With several
    chunks, passes go ``stages`` microbatches at a time through one chunk, then the next,
    which needs ``microbatches`` to be a multiple of ``stages``.
    """
    m, S, v = microbatches, stages, chunks
    check_microbatches(S, m, v)
    total = m * v
    forward = [_nth("F", k, S, v) for k in range(total)]
    backward = [_nth("B", k, S, v) for k in range(total)]
    if schedule == "gpipe":
        return forward + backward
    warm = min(S - stage - 1 if v == 1 else 2 * (S - stage - 1) + (v - 1) * S, total)
    ops = forward[:warm]
    for i in range(total - warm):
        ops += [forward[warm + i], backward[i]]
    return ops + backward[total - warm :]


def _nth(kind: str, k: int, stages: int, chunks: int) -> Pass:
    """A stage's ``k``-th forward or backward pass: ``stages`` microbatches through a chunk,
    then as many through the next (backward: from the last chunk down)."""
    group, within = divmod(k, stages * chunks)
    chunk = within // stages
    if kind == "B":
        chunk = chunks - 1 - chunk
    return kind, chunk, group * stages + within % stages
