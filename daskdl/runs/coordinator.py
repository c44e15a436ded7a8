"""Following a run's rank tasks from the client: :class:`Coordinator` observes them, asks
:func:`daskdl.runs.policy.decide` what to do, and does it (the state machine is drawn there).

Only :meth:`Coordinator.follow` moves it on, from the thread that waits for the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pandas as pd
from distributed import Client, wait

from daskdl import events
from daskdl.checkpoint import rundir
from daskdl.cluster import workers_info
from daskdl.collectives import comm
from daskdl.runs import policy
from daskdl.runs.policy import ENDED, State

if TYPE_CHECKING:
    from daskdl.runs.launching import Launch
    from daskdl.runs.plan import Layout

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A rank failed; the message names the rank and its worker."""


__all__ = ["ENDED", "Coordinator", "RunError", "State"]


class Coordinator:
    """A run's rank tasks and what became of them: its state, its workers (rank order), the
    workers it lost, and its result (rank 0's) or error."""

    def __init__(self, client: Client, launch: Launch, futures, workers, recorder, out, staging):
        self.client, self.launch = client, launch
        self.run_id = launch.plan.run_id
        self.futures, self.workers = futures, workers
        self.recorder = recorder
        self.out: Path | None = out
        self.staging: Path | None = staging  # a replacing run's folder until its checkpoint
        self.data = launch.all_futures
        self.state = State.RUNNING
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.lost: list[str] = []  # workers lost during the run, in order
        self._join_asked = False
        self._first: dict | None = None  # rank 0's result, once every rank returned
        self._handed_back: tuple[str, ...] = ()  # why ranks returned states at the last look
        # Heartbeats: when each worker's last one changed (the client's clock), and the comm
        # id of the membership an unresponsive worker was dropped from.
        self._heard: dict[str, policy.Heard] = {}
        self._silent: dict[str, str] = {}

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def history(self) -> pd.DataFrame:
        """One row per finished epoch: rank 0's at the end, the events' until then."""
        if self.result is not None:
            return events.history_frame(self.result["history"])
        return self.recorder.history()

    def check_client(self) -> None:
        """A run whose client closed cannot be followed any more: the scheduler released its
        rank tasks (they stop after the same step), so it ends as cancelled, saying why."""
        if self.ended or not self._client_closed():
            return
        self.state = State.CANCELLED
        self.error = RunError(
            f"run {self.run_id} was cancelled: the client that started it closed before it "
            "ended, and the scheduler released its ranks. Keep the client open until "
            "run.wait() returns; resume= continues the run from its last checkpoint."
        )
        self.recorder.close(self.state.value)

    def _client_closed(self) -> bool:
        return self.client.status in ("closing", "closed")

    def follow(self, deadline: float | None, timeout: float | None) -> None:
        """Watch the rank tasks until the run ends (raising its error) or ``deadline``."""
        try:
            while not self.ended:
                self._look()
                if not self.ended and deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.run_id} still running after {timeout}s")
        except KeyboardInterrupt:
            self.fail(RunError(f"run {self.run_id} interrupted"))
        if self.error is not None:
            raise self.error

    def _look(self) -> None:
        """One look at the rank tasks, and the transition it calls for."""
        try:
            wait(self.futures, timeout=1.0)
        except TimeoutError:
            pass
        match policy.decide(self.observe()):
            case policy.Wait():
                pass
            case policy.AskToGrow():
                self._ask_to_grow()
            case policy.Regroup(gone=gone, joined=False):
                self._regroup(list(gone))
            case policy.Regroup(joined=True):
                self._regroup([], sorted(self.live_workers() - set(self.workers)))
            case policy.ConfirmLoss():
                self._confirm_loss()  # a rank saw a peer vanish before the scheduler did
            case policy.Finish(state=state):
                self.result = self._first  # fetched by observe(): rank 0's model
                self.finish(state)
            case policy.Fail(why="client closed"):
                self.check_client()
            case policy.Fail(why=why, state=state, ranks=ranks):
                self.fail(self._failure(why, list(ranks)), state)

    def observe(self) -> policy.Observation:
        """The run as :func:`daskdl.runs.policy.decide` sees it."""
        if self._client_closed():
            return policy.Observation(ranks=len(self.workers), client_closed=True)
        live = self.live_workers()
        all_done = all(f.done() for f in self.futures)
        returned = all(f.status == "finished" for f in self.futures)
        # The ranks' results (rank 0's holds the trained model) cross from the workers once.
        results = [f.result() for f in self.futures if f.status == "finished"] if all_done else []
        states = [r for r in results if isinstance(r, dict) and "elastic" in r]
        self._handed_back = handed_back = tuple(r["elastic"] for r in states)
        self._first = results[0] if returned and not states else None
        plan = self.launch.plan
        return policy.Observation(
            ranks=len(self.workers),
            cancelled=any(f.status == "cancelled" for f in self.futures),
            failed=tuple(i for i, f in enumerate(self.futures) if f.status == "error"),
            gone=tuple(i for i, w in enumerate(self.workers) if w not in live),
            all_done=all_done,
            handed_back=handed_back,
            newcomers=bool(live - set(self.workers)),
            may_grow=plan.grow and plan.elastic and not self._join_asked,
            lost_before=len(self.lost),
            max_failures=plan.max_failures,
            stopped=self._first is not None and self._first["stopped"],
        )

    def _failure(self, why: str, ranks: list[int]) -> BaseException:
        """The error a failed run raises, in the user's terms."""
        names = ", ".join(f"rank {i} ({self.workers[i]})" for i in ranks)
        if why == "cancelled":
            return RunError(
                f"run {self.run_id} was cancelled: its rank tasks were cancelled "
                "(client.cancel, or the scheduler released them)."
            )
        if why == "rank failed":
            return self._rank_error(ranks)
        if why == "too many lost":
            so_far = f"; lost before: {self.lost}" if self.lost else ""
            return RunError(
                f"run {self.run_id}: worker of {names} left the cluster{so_far} "
                f"(max_failures={self.launch.plan.max_failures})."
            )
        return RunError(f"run {self.run_id}: every worker is gone ({names}).")

    def _ask_to_grow(self) -> None:
        """Workers that joined the cluster get ranks from the next epoch on (runs that were
        given all workers, and may regroup)."""
        self.client.run(
            comm.request_regroup, self.launch.comm_id, workers=self.workers, on_error="ignore"
        )
        self._join_asked = True

    def _confirm_loss(self) -> None:
        """Ranks that returned a regroup request while every worker is still there: wait a
        little for the scheduler to notice the loss (the next look regroups); a collective
        that failed with every worker alive is an error."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if set(self.workers) - self.live_workers():
                return
            time.sleep(0.2)
        why = self._handed_back[0]  # as observed: the ranks returned a regroup request
        self.fail(RunError(f"run {self.run_id}: a collective failed ({why})."))

    def _regroup(self, gone: list[int], joined: Sequence[str] = ()) -> None:
        """running -> regrouping -> running: go on without the workers of ranks ``gone``, and
        with the workers that ``joined`` (the policy has checked that it may)."""
        lost = [self.workers[i] for i in gone]
        names = ", ".join(f"rank {i} ({self.workers[i]})" for i in gone)
        survivors = [w for i, w in enumerate(self.workers) if i not in gone]
        self.state = State.REGROUPING
        states = self._states_of(survivors, gone, names)
        if not states:
            # The survivors had finished the run already: nothing to regroup.
            self.workers = survivors
            self.futures = [f for i, f in enumerate(self.futures) if i not in gone]
            self.state = State.RUNNING
            return
        # All replicas agree up to the last step every survivor finished: start there.
        state = self.launch.regroup_state(states)
        for f in self.futures:
            f.release()
        self.lost += lost
        self.launch.generation += 1
        self._join_asked = False
        # Partitions lost with a worker are recomputed first, while every worker thread is
        # free: a new rank that started early would hold its thread waiting for a peer whose
        # data needs that very thread.
        wait(self.launch.all_futures)
        lay = self._next_layout(survivors, list(joined))
        joined = [w for w in lay.ranks if w not in survivors]
        # The epoch goes on from the same fraction of it, in the new shards' batches.
        steps = lay.steps
        if state.get("batches"):  # the loop's own batch size (fit's is the plan's)
            name, batch_size = state["batches"]
            steps = math.ceil(max(lay.shard_sizes[name]) / batch_size)
        start_step = min(steps, round(state["step"] * steps / state["steps_per_epoch"]))
        self.client.log_event(
            events.topic(self.run_id),
            {
                "run": self.run_id,
                "kind": "membership",
                "lost": lost,
                "joined": list(joined),
                "workers": list(lay.ranks),
                "world_size": len(lay.ranks),
                "steps_per_epoch": steps,
                "epoch": state["epoch"] + 1,
                "step_in_epoch": start_step,
                "comm_id": self.launch.comm_id,
            },
        )
        resume = self.launch.resume_from(state)
        self.futures = self.launch.submit(lay, resume, start_step, state["history"])
        self.workers = list(lay.ranks)
        self.state = State.RUNNING

    def _next_layout(self, survivors: list[str], joined: list[str]) -> Layout:
        """The next membership's: the survivors with the workers that joined; without them
        when they are too many (more ranks than partitions, shards below a batch); with idle
        workers when the survivors alone cannot hold a pipeline's stages (a run that may
        grow)."""
        idle = sorted(self.live_workers() - set(self.workers) - set(joined))
        tries = [survivors + joined, survivors]
        if self.launch.plan.grow and idle:
            tries.append(survivors + idle)
        for workers in tries:
            try:
                return self.launch.layout(workers)
            except ValueError as e:
                error = e
        self.fail(RunError(f"run {self.run_id} cannot go on with the workers left: {error}"))

    def _states_of(self, survivors: list[str], gone: list[int], names: str) -> list[dict]:
        """What the surviving ranks hand back: woken at once (they may be waiting on the lost
        peer), each returns its state as of the last step it finished."""
        if gone:
            self.client.run(
                comm.abort,
                self.launch.comm_id,
                f"membership change: lost {names}",
                workers=survivors,
                on_error="ignore",
            )
        states = []
        for i, f in enumerate(self.futures):
            if i in gone:
                continue
            try:
                result = f.result(timeout=self.launch.plan.comm_timeout + 30)
            except Exception as e:  # noqa: BLE001 - any survivor failure ends the run
                self.fail(self._rank_error([i]) if f.status == "error" else RunError(str(e)))
            if isinstance(result, dict) and "elastic" in result:
                states.append(result)
        return states

    def live_workers(self) -> set[str]:
        """Workers that can host a rank: not leaving, and heard from. A retiring worker counts
        as gone at once, so its peers regroup without waiting for it to close; so does one
        whose heartbeats stopped for twice the comm timeout (a stopped process, a frozen
        machine), long before the scheduler's own ``worker-ttl`` removes it."""
        silence = 2 * self.launch.plan.comm_timeout
        live, silent, self._heard = policy.liveness(
            workers_info(self.client), self._heard, time.monotonic(), silence
        )
        for addr in silent:
            self._silent.setdefault(addr, self.launch.comm_id)
        for addr in live & self._silent.keys():
            self._wake(addr)
        return live

    def _wake(self, addr: str) -> None:
        """A worker heard from again after it was dropped as unresponsive: whatever rank it
        still runs belongs to a membership that went on without it, so that is aborted
        before it may rejoin (at an epoch's end, as any worker that joins)."""
        comm_id = self._silent.pop(addr)
        logger.warning("run %s: %s answers again; it may rejoin the run", self.run_id, addr)
        self.client.run(
            comm.abort, comm_id, "this worker was dropped as unresponsive", workers=[addr],
            on_error="ignore",
        )  # fmt: skip

    def _rank_error(self, failed: list[int]) -> BaseException:
        errors = [(i, self.futures[i].exception()) for i in failed]
        # A rank that merely saw its collective aborted is a symptom; report the cause.
        errors.sort(key=lambda e: isinstance(e[1], comm.CollectiveAborted))
        i, exc = errors[0]
        err = RunError(
            f"run {self.run_id}: rank {i} on {self.workers[i]} failed: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return err

    def fail(self, error: BaseException, state: State = State.FAILED) -> NoReturn:
        """-> failed (or cancelled): abort the collectives, cancel the ranks; raises."""
        self.error = error
        self.client.run(
            comm.abort,
            self.launch.comm_id,
            str(error),
            workers=list(self.live_workers() & set(self.workers)),
            on_error="ignore",
        )
        self.client.cancel(self.futures, force=True)
        self.finish(state, error=str(error))
        raise error

    def cancel(self, grace: float) -> None:
        """-> cancelled, wherever the ranks are; a rank still busy after ``grace`` seconds
        holds its worker's thread, which Dask cannot take back: that worker is restarted."""
        reason = f"run {self.run_id} was cancelled (Run.cancel)"
        comm_id = self.launch.comm_id
        self.client.run(comm.abort, comm_id, reason, workers=self.workers, on_error="ignore")
        self.client.cancel(self.futures, force=True)
        keys = [f.key for f in self.futures]
        busy: list[str] = []
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            running = self.client.run(_running_keys, keys, workers=self.workers, on_error="ignore")
            busy = sorted(w for w, found in running.items() if isinstance(found, list) and found)
            if not busy:
                break
            time.sleep(0.2)
        if busy:
            logger.warning(
                "run %s: ranks on %s still ran %.0fs after cancel; restarting those workers",
                self.run_id,
                busy,
                grace,
            )
            self.client.restart_workers(busy, raise_for_error=False)
        self.error = RunError(reason)
        self.finish(State.CANCELLED, error=reason)

    def finish(self, state: State, **fields) -> None:
        """-> an end state: release what the run held, close its recorder, say how it ended,
        and leave its folder as it should be."""
        self.state = state
        # Release the rank tasks and this run's hold on the partitions now, in order with what
        # the client sends next (say an evaluate() on the same data), not whenever the garbage
        # collector gets to the futures. Data the user persisted stays: they hold it too.
        for f in self.futures + self.data:
            f.release()
        self.data = []
        status = state.value
        self.recorder.close(status)
        self.client.log_event(
            events.topic(self.run_id),
            {"run": self.run_id, "kind": "end", "status": status, **fields},
        )
        events.unsubscribe(self.client, events.topic(self.run_id), self.recorder.handle)
        if self.out is None:
            return
        if state is not State.FINISHED:
            rundir.abandon(self.out, self.staging, status)  # a replaced run stays as it was
        if state in (State.FINISHED, State.STOPPED):
            folder = rundir.writing_to(self.out, self.staging)
            folder.mkdir(parents=True, exist_ok=True)
            self.history().to_csv(folder / rundir.METRICS, index=False)


def _running_keys(keys: list[str], dask_worker=None) -> list[str]:
    """Which of ``keys`` still hold a thread of this worker (cancelled or not)."""
    state = dask_worker.state
    return [ts.key for ts in state.executing | state.long_running if ts.key in keys]
