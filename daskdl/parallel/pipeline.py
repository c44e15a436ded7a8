"""Pipeline parallelism: a model cut into contiguous stages, one rank each.

A model given as an ``nn.Sequential`` or a list of modules is cut into ``stages`` runs of
consecutive layers (:func:`cut`): by parameter count, by the time each layer takes on the
workers, or at explicit split points; every layer lands in exactly one stage and none is
empty. Rank ``r`` is stage ``r % stages`` of replica ``r // stages``. A step cuts the batch
into microbatches: activations go forward and their gradients backward between neighbouring
stages over daskdl's worker-to-worker comms (so over TLS on a TLS cluster), microbatch by
microbatch, in the GPipe order (every forward, then every backward) or the 1F1B order (after
a warm-up, one forward and one backward in turn, which keeps at most ``stages`` microbatches'
activations alive). With several replicas each stage's gradients are averaged over its
replicas (2-D parallelism).

The microbatch losses are weighted by their share of the batch, so a step computes the
gradient that one rank training the whole model on the whole batch would (for models
without batch norm, whose statistics are per microbatch).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import safetensors.numpy
import torch
from torch import nn

from daskdl.checkpoint import files as checkpoint
from daskdl.collectives.base import PointToPoint
from daskdl.collectives.comm import PeerTimeoutError
from daskdl.config.pipeline import Pipeline
from daskdl.parallel.averaging import average_tensors
from daskdl.parallel.schedules import order

logger = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A pipeline that cannot run: its message names the stage and what was seen."""


def layers_of(model) -> list[nn.Module]:
    """The layers a pipeline cuts: an ``nn.Sequential``'s children, or a list of modules."""
    if isinstance(model, nn.Sequential):
        return list(model.children())
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return list(model)
    raise TypeError(
        "A pipeline cuts a model into runs of consecutive layers: give an nn.Sequential or a "
        f"list of modules that run one after another, not a {type(model).__name__}."
    )


def cut(costs: Sequence[float], stages: int) -> list[int]:
    """Boundaries ``b`` (piece ``s`` is layers ``b[s]:b[s + 1]``) of ``stages`` consecutive,
    non-empty pieces whose costliest piece costs least."""
    n = len(costs)
    if n < stages:
        raise PipelineError(
            f"A pipeline cut into {stages} pieces (stages x chunks) needs at least {stages} "
            f"layers, and the model has {n}: use fewer stages or chunks, or give the model "
            "as more modules."
        )
    prefix = np.concatenate([[0.0], np.cumsum(costs, dtype=np.float64)])
    best = np.full((stages + 1, n + 1), np.inf)
    start = np.zeros((stages + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            j = np.arange(k - 1, i)
            worst = np.maximum(best[k - 1, j], prefix[i] - prefix[j])
            start[k, i] = j[np.argmin(worst)]
            best[k, i] = worst.min()
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(int(start[k, bounds[-1]]))
    return bounds[::-1]


def parameter_costs(layers: Sequence[nn.Module]) -> list[float]:
    # One more per layer: among cuts of equal parameters, the one with evener layer counts.
    return [sum(p.numel() for p in layer.parameters()) + 1.0 for layer in layers]


def layer_times(layers: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 3):
    """Seconds each layer takes for forward and backward on ``sample`` (the best of
    ``repeats``), run one after another as the stages will."""
    times, x = [], sample
    for layer in layers:
        best = math.inf
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = layer(inp)
            if out.requires_grad:
                out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        times.append(best)
        x = out.detach()
    return times


def _expects(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"(batch, ..., {layer.in_features})"
    if isinstance(layer, nn.modules.conv._ConvNd):
        return f"(batch, {layer.in_channels}, ...)"
    return "what its forward takes"


class Stage:
    """This rank's stage of its replica of the pipeline, and how it runs a step.

    ``layers`` is the whole model's (alike on every rank); the stage keeps its own pieces of
    them (one run of layers each, :attr:`Pipeline.chunks` runs) as ``module`` and lets the
    rest go. The first stage holds the model's first piece and takes the batches; the last
    holds its last piece and computes the loss.
    """

    def __init__(
        self, layers: Sequence[nn.Module], pipe: Pipeline, group: PointToPoint, bounds: list[int]
    ):
        S = pipe.stages
        if group.size % S:
            raise PipelineError(
                f"{group.size} ranks cannot hold whole replicas of a {S}-stage pipeline: use "
                f"a multiple of {S} workers."
            )
        self.pipe, self.group = pipe, group
        self.index, self.replica, self.replicas = group.rank % S, group.rank // S, group.size // S
        self.runs = [(bounds[g], bounds[g + 1]) for g in range(self.index, pipe.pieces, S)]
        self.layer_ids = pipe.layers_of_stage(bounds, self.index)
        self.module = nn.Sequential(*(layers[i] for i in self.layer_ids))
        ends = np.cumsum([b - a for a, b in self.runs]).tolist()
        self.chunks = [self.module[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        first = self.replica * S
        self.prev = first + (self.index - 1) % S if pipe.pieces > 1 else None
        self.next = first + (self.index + 1) % S if pipe.pieces > 1 else None
        self.last = first + S - 1
        self.peers = (
            group.subgroup([r * S + self.index for r in range(self.replicas)], f"s{self.index}")
            if self.replicas > 1
            else None
        )
        self._step = 0
        self._gathers = 0
        self._sending: list = []  # sends in flight
        self.stats: dict = {}
        counts = [len(list(layer.parameters())) for layer in layers]
        starts = np.cumsum([0, *counts]).tolist()
        # This stage's parameters, in its module's order, by their index in the whole model.
        self.param_ids = [starts[i] + k for i in self.layer_ids for k in range(counts[i])]
        self.n_params = sum(counts)
        self.target_dtype: torch.dtype | None = None  # the loss's targets (fit sets it)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.pipe.stages - 1

    def parameters(self):
        return self.module.parameters()

    def describe(self) -> str:
        runs = ", ".join(f"{a}-{b - 1}" for a, b in self.runs)
        return f"stage {self.index} (layers {runs}) of replica {self.replica}"

    def _piece(self, chunk: int) -> int:
        """The index in the whole model's pieces of this stage's ``chunk``-th."""
        return chunk * self.pipe.stages + self.index

    # ------------------------------------------------------------------ messages

    def _send(self, dest: int | None, tag: str, tensor: torch.Tensor) -> None:
        """Start sending ``tensor`` (waited for at the end of the step, in :meth:`_sent`:
        the stage computes meanwhile, and no pass changes a tensor it has sent)."""
        dest = self._neighbour(dest, "send to")
        data = np.ascontiguousarray(tensor.detach().cpu().float().numpy())
        self.stats["bytes_sent"] += data.nbytes
        self._sending.append(self.group.isend(dest, f"{tag}:{self._step}", data))

    def _sent(self) -> None:
        for wait in self._sending:
            wait()
        self._sending = []

    def _neighbour(self, rank: int | None, doing: str) -> int:
        # None: the first stage's previous, the last one's next.
        if rank is None:
            raise PipelineError(f"{self.describe()} has no stage to {doing} there.")
        return rank

    def _recv(self, src: int | None, tag: str, what: str, m: int | None = None) -> torch.Tensor:
        src = self._neighbour(src, "receive from")
        t0 = time.perf_counter()
        try:
            data = self.group.recv(src, f"{tag}:{self._step}")
        except PeerTimeoutError as e:
            where = f"microbatch {m} of step {self._step + 1}" if m is not None else "a step"
            raise PipelineError(
                f"{self.describe()} waited {self.group.timeout:g}s for {what} of {where} from "
                f"rank {src} ({self.group.peers[src]}), the stage "
                f"{'before' if src < self.group.rank else 'after'} it: {e}"
            ) from e
        self.stats["wait"] += time.perf_counter() - t0
        return torch.from_numpy(np.array(data))  # a received message is read-only

    # ------------------------------------------------------------------ a step

    def train_step(self, xb=None, yb=None, loss_fn: Callable | None = None):
        """Forward and backward over the step's microbatches: the first stage takes the batch
        ``xb, yb``, the last computes ``loss_fn(outputs, targets)`` (a batch mean) per
        microbatch; afterwards this stage's parameters hold their gradient of the batch's
        mean loss (averaged over the replicas), ready for the optimizer. Returns the batch's
        loss on the last stage, ``None`` elsewhere."""
        pipe = self.pipe
        M = pipe.microbatches
        self.stats = {"forward": 0.0, "backward": 0.0, "wait": 0.0, "bytes_sent": 0, "alive": 0}
        t_step = time.perf_counter()
        xs, ys, weights = self._inputs(xb, yb, M)
        alive: dict[tuple[int, int], tuple] = {}  # by (chunk, microbatch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for op, c, m in order(pipe.schedule, pipe.stages, self.index, M, pipe.chunks):
            if op == "F":
                alive[c, m] = x, out = self._forward(c, m, xs, ys, weights, loss_fn)
                self.stats["alive"] = max(self.stats["alive"], len(alive))
                if self._piece(c) == pipe.pieces - 1:
                    loss_sum += out.detach().double()
            else:
                self._backward(c, m, *alive.pop((c, m)))
        self._sent()
        if self.peers is not None:
            self._average(self.peers)
        self.stats["step"] = time.perf_counter() - t_step
        self._step += 1
        return loss_sum.float() if self.is_last else None

    def _inputs(self, xb, yb, M: int):
        """The step's microbatches of inputs (first stage), of targets and their weights in the
        batch's mean (last stage)."""
        xs: Sequence[torch.Tensor] | None = None
        ys: Sequence[torch.Tensor] | None = None
        weights: list[float] | None = None
        if self.is_first:
            if xb is None or yb is None:
                raise ValueError(f"{self.describe()} is the first stage: pass it the batch.")
            xs, ys = torch.tensor_split(xb, M), torch.tensor_split(yb, M)
            if any(len(x) == 0 for x in xs):
                raise ValueError(
                    f"A batch of {len(xb)} samples cannot make {M} microbatches: use a batch "
                    f"of at least {M}, or fewer microbatches."
                )
            weights = [len(x) / len(xb) for x in xs]
            if not self.is_last:
                for m, y in enumerate(ys):
                    self._send(self.last, f"y{m}", y)
        elif self.is_last:
            first = self.replica * self.pipe.stages
            ys = [self._targets(self._recv(first, f"y{m}", "the targets", m)) for m in range(M)]
            total = sum(len(y) for y in ys)
            weights = [len(y) / total for y in ys]
        return xs, ys, weights

    def _forward(self, c, m, xs, ys, weights, loss_fn):
        """Chunk ``c``'s forward on microbatch ``m``: its input and its output (on the model's
        last piece, the microbatch's weighted loss)."""
        t0 = time.perf_counter()
        g, chunk = self._piece(c), self.chunks[c]
        if g == 0:
            x = xs[m]
        else:
            x = self._recv(self.prev, f"a{g}.{m}", "the activations", m).requires_grad_(True)
        try:
            out = chunk(x)
        except RuntimeError as e:
            if g == 0 or self._step > 0 or m > 0:
                raise
            raise PipelineError(
                f"{self.describe()} failed on the activations of shape {tuple(x.shape)} it "
                f"received: its layer {self.runs[c][0]}, {chunk[0]}, expects "
                f"{_expects(chunk[0])}. Each stage must take what the one before it gives: {e}"
            ) from e
        if g == self.pipe.pieces - 1:
            y = ys[m]
            if self.target_dtype is None and _is_index(y, out):
                y = y.to(torch.int64)
            out = loss_fn(out, y) * weights[m]
        else:
            self._send(self.next, f"a{g + 1}.{m}", out)
        self.stats["forward"] += time.perf_counter() - t0
        return x, out

    def _backward(self, c, m, x, out) -> None:
        t0 = time.perf_counter()
        g = self._piece(c)
        if g == self.pipe.pieces - 1:
            out.backward()
        else:
            grad = self._recv(self.next, f"g{g}.{m}", "the gradients", m)
            if grad.shape != out.shape:
                raise PipelineError(
                    f"{self.describe()} sent activations of shape {tuple(out.shape)} for "
                    f"microbatch {m} and got gradients of shape {tuple(grad.shape)} back."
                )
            if out.requires_grad:  # not so for a first piece without parameters to train
                out.backward(grad.to(out.dtype))
        if g > 0:
            self._send(self.prev, f"g{g - 1}.{m}", x.grad)
        self.stats["backward"] += time.perf_counter() - t0

    def _average(self, peers: PointToPoint) -> None:
        grads = []
        for p in self.module.parameters():
            if p.requires_grad:
                if p.grad is None:  # reached on other replicas only
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        average_tensors(grads, peers)

    # ------------------------------------------------------------------ scoring

    def evaluate(self, batches, score: Callable) -> None:
        """Forward only, batch by batch: the first stage takes ``batches`` (``(xb, yb)``
        pairs, any number) and tells the others how many; the last calls
        ``score(outputs, targets)`` for each."""
        S, first = self.pipe.stages, self.replica * self.pipe.stages
        if self.is_first:
            batches = list(batches)
            for dest in range(first + 1, first + S):
                self._send(dest, "n", torch.tensor([len(batches)], dtype=torch.float32))
            n = len(batches)
        else:
            n = int(self._recv(first, "n", "the number of batches to score")[0])
        was = self.module.training
        self.module.eval()
        with torch.no_grad():
            # Chunk by chunk, every batch through each: the stages after go on meanwhile.
            for c, chunk in enumerate(self.chunks):
                g = self._piece(c)
                for i in range(n):
                    if g == 0:
                        x, y = batches[i]
                        if not self.is_last:
                            self._send(self.last, f"ey{i}", y)
                    else:
                        x = self._recv(self.prev, f"e{g}.{i}", "the activations to score")
                    out = chunk(x)
                    if g < self.pipe.pieces - 1:
                        self._send(self.next, f"e{g + 1}.{i}", out)
                        continue
                    if not self.is_first:
                        y = self._targets(self._recv(first, f"ey{i}", "the targets to score"))
                    score(out, y)
        self._sent()
        self.module.train(was)
        self._step += 1  # the next messages are another round's

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(self.target_dtype) if self.target_dtype is not None else y

    # ------------------------------------------------------------------ checkpoints

    def stage_state(self, state: dict) -> tuple[dict, dict | None]:
        """This stage's part of a whole model's checkpoint (``model``: numpy arrays by the
        whole model's keys; ``optimizer``: the plain optimizer's state over its parameters),
        as the stage's module and optimizer load it."""
        local = {layer: j for j, layer in enumerate(self.layer_ids)}
        model = {}
        for key, value in state["model"].items():
            index, name = key.split(".", 1)
            if int(index) in local:
                model[f"{local[int(index)]}.{name}"] = torch.from_numpy(np.array(value))
        opt = state.get("optimizer")
        if not opt:
            return model, None
        mine = {p: j for j, p in enumerate(self.param_ids)}
        sliced = {mine[i]: s for i, s in opt["state"].items() if i in mine}
        groups = [{**g, "params": list(range(len(mine)))} for g in opt["param_groups"]]
        return model, {"state": copy.deepcopy(sliced), "param_groups": groups}

    def own_state(self, optimizer, copy: bool = False) -> dict[str, np.ndarray]:
        """This stage's module and ``optimizer`` state under the whole model's names:
        ``m/<layer>.<name>`` and ``o/<parameter>/<slot>`` (numpy views of the live tensors,
        or ``copy``-ies), the pieces :func:`whole_state` puts together."""
        own = checkpoint.copy if copy else (lambda t: t.detach().cpu().numpy())
        mine = {}
        for key, value in self.module.state_dict().items():
            j, name = key.split(".", 1)
            mine[f"m/{self.layer_ids[int(j)]}.{name}"] = own(value)
        for i, slots in (optimizer.state_dict()["state"] if optimizer is not None else {}).items():
            for name, value in slots.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                mine[f"o/{self.param_ids[i]}/{name}"] = own(value)
        return mine

    def handed_back(self, optimizer) -> dict:
        """What this stage hands back when its run regroups: its part of the whole state as
        it is now, with what :func:`whole_state` needs to put the replica's parts together."""
        return {
            "index": self.index,
            "stages": self.pipe.stages,
            "tensors": self.own_state(optimizer),
            "param_groups": optimizer.state_dict()["param_groups"] if optimizer else None,
            "n_params": self.n_params,
        }

    def gather(self, optimizer, keep: bool) -> dict | None:
        """The whole model's state (and ``optimizer``'s over it, in the plain optimizer's
        format) on the first rank, from replica 0's stages; ``None`` elsewhere (where not
        ``keep``: the other replicas hold copies and send nothing)."""
        if self.replica != 0:
            return None
        # Kept on the first stage (copies); the others' are serialised at once (views).
        mine = self.own_state(optimizer, copy=self.is_first)
        groups = optimizer.state_dict()["param_groups"] if optimizer is not None else None
        if not self.is_first:
            payload = np.frombuffer(safetensors.numpy.save(mine), dtype=np.uint8)
            self.group.send(0, f"ck:{self._gathers}", payload)
            self._gathers += 1
            return None
        merged = dict(mine)
        # Counted apart from steps: a checkpoint and the final weights follow the same step.
        tag, self._gathers = f"ck:{self._gathers}", self._gathers + 1
        for src in range(1, self.pipe.stages):  # one stage's message alive at a time
            data = self.group.recv(src, tag)
            merged.update(safetensors.numpy.load(bytes(data)) if keep else {})
            del data
        return whole_state(merged, groups, self.n_params) if keep else None


def whole_state(merged: dict[str, np.ndarray], param_groups, n_params: int) -> dict:
    """The whole model's state (numpy arrays by its keys) and the plain optimizer's over it
    (``None`` without ``param_groups``) from every stage's :meth:`Stage.own_state`."""
    model = {k[2:]: v for k, v in merged.items() if k.startswith("m/")}
    if param_groups is None:
        return {"model": model, "optimizer": None}
    state: dict[int, dict] = {}
    for key, value in merged.items():
        if key.startswith("o/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.asarray(value))
    groups = [{**g, "params": list(range(n_params))} for g in param_groups]
    return {
        "model": model,
        "optimizer": {"state": dict(sorted(state.items())), "param_groups": groups},
    }


def _is_index(y: torch.Tensor, out: torch.Tensor) -> bool:
    """Class ids received as float32 (every message is): back to int64 for the loss."""
    return y.dim() == out.dim() - 1 and y.dtype == torch.float32


def split_bounds(layers: Sequence[nn.Module], pipe: Pipeline) -> list[int]:
    """The boundaries of ``pipe.split``, or of a cut balanced by parameters."""
    if pipe.split is not None:
        if pipe.split[-1] >= len(layers):
            raise PipelineError(
                f"split={pipe.split} cuts past the model's {len(layers)} layers: the last "
                f"stage must start at a layer below {len(layers)}."
            )
        return [0, *pipe.split, len(layers)]
    return cut(parameter_costs(layers), pipe.pieces)


def split_layers(model, pipe: Pipeline, group: PointToPoint, sample: torch.Tensor | None):
    """The stage boundaries every rank agrees on: ``pipe.split``, or balanced by parameters,
    or by the layer times measured on ``sample`` and averaged over the ranks."""
    layers = layers_of(model)
    if pipe.split is not None or pipe.balance == "params":
        bounds = split_bounds(layers, pipe)
    else:
        if sample is None:
            raise ValueError("balance='time' measures the layers on a sample batch: pass one.")
        times = np.asarray(layer_times(layers, sample), dtype=np.float32)
        costs = group.allreduce_mean_(times) if group.size > 1 else times
        bounds = cut(list(costs), pipe.pieces)
    logger.info("pipeline stages start at layers %s", bounds[:-1])
    return layers, bounds
