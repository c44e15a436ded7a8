"""The checks every run's inputs pass before anything reaches the cluster's workers, shared by
``fit`` and ``launch`` (``docs/errors.md`` lists them in order): the client, the options, the
run's folder and keys, the workers, and the data's values where the data live."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dask
import psutil
import torch
from distributed import Client

from daskdl import security
from daskdl.checkpoint import rundir
from daskdl.cluster import workers_info
from daskdl.config import options as config_
from daskdl.config.options import TrainConfig
from daskdl.models import preflight
from daskdl.parallel import pipeline, sharding


@dataclass(frozen=True)
class RunFolder:
    """Where a run writes (``out``), what it resumes, and the keys that sign and verify."""

    out: Path | None
    resume: Path | None
    overwrite: bool
    key: security.Key | None
    verify_key: security.Key | None

    def claim(self, run_id: str) -> Path | None:
        """Make ``out`` the run's (see :func:`daskdl.checkpoint.rundir.claim`); its staging
        folder."""
        if self.out is None:
            return None
        return rundir.claim(self.out, self.resume, self.overwrite, run_id)


def check_meta(meta) -> None:
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON-able facts, got {type(meta).__name__}.")
    try:
        json.dumps(meta or {})
    except TypeError as e:
        raise TypeError(f"meta must be JSON-able (str, numbers, lists, dicts): {e}") from None


def check_client(client, what: str) -> None:
    if not isinstance(client, Client):
        raise TypeError(
            f"{what} needs a distributed.Client as its first argument, got "
            f"{type(client).__name__}. HINT: client = daskdl.local_cluster(n_workers=2)."
        )
    if client.status in ("closing", "closed"):
        raise RuntimeError(
            f"{what} was given a closed client. Start a new one: daskdl.local_cluster(...) or "
            "distributed.Client(address)."
        )


def run_folder(out, resume, overwrite, signing_key, verify_key) -> RunFolder:
    """The run's folder and the checkpoint it resumes, checked, with the keys that sign and
    verify: read here, on the client, so that a bad key file fails before any training."""
    out_path, resume = _run_paths(out, resume, overwrite)
    if out_path is not None:
        rundir.check(out_path, resume, overwrite)
    key = security.signing_key(signing_key) if out_path is not None else None
    verify_key = security.verify_key(verify_key) if resume is not None else None
    return RunFolder(out_path, resume, bool(overwrite), key, verify_key)


def _run_paths(out, resume, overwrite) -> tuple[Path | None, Path | None]:
    """``out`` and ``resume`` as paths, in the forms users pass them: ``resume=True``
    continues the run in ``out``."""
    overwrite = config_.flag("overwrite", overwrite)
    for name, value in (("out", out), ("resume", resume)):
        if value is not None and not isinstance(value, (str, os.PathLike, bool)):
            raise TypeError(f"{name} must be a folder path, got {type(value).__name__}.")
    if isinstance(out, bool):
        raise TypeError(f"out must be a folder path, got {out!r}.")
    for name, value in (("out", out), ("resume", resume)):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{name}={value!r} names no folder; give a path such as 'runs/x'.")
    if resume is True:
        if out is None:
            raise ValueError("resume=True continues the run in out=, but out is not given.")
        resume = out
    elif resume is False:
        resume = None
    if overwrite and out is None:
        raise ValueError("overwrite=True replaces the run in out=, but out is not given.")
    if overwrite and resume is not None:
        raise ValueError(
            "overwrite=True replaces the run in out=, and resume= continues one: choose one."
        )
    return (Path(out) if out is not None else None), (Path(resume) if resume else None)


def check_cluster(client: Client, cfg: TrainConfig, key, workers) -> list[str]:
    """The workers that get ranks, after what the cluster itself must allow."""
    if cfg.backend == "torch" and client.scheduler.address.startswith("tls://"):
        raise ValueError(
            "backend='torch' would send gradients over plain TCP (gloo and NCCL do not use "
            "the cluster's TLS), and this cluster encrypts its connections: use "
            "backend='dask' (the default), whose all-reduce runs over the cluster's TLS comms."
        )
    if key is not None:
        security.warn_if_sent_in_clear(client, "The checkpoint signing key")
    ranks = _choose_workers(client, workers)
    if cfg.device == "cuda":
        _check_gpus(client, ranks)
    return ranks


def _choose_workers(client: Client, workers: list[str] | int | None) -> list[str]:
    info = workers_info(client)
    if not info:
        client.wait_for_workers(1, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        info = workers_info(client)
    available = sorted(info)
    if workers is None:
        return available
    if isinstance(workers, str):
        workers = [workers]  # one address, not its characters
    if isinstance(workers, numbers.Number):
        workers = config_.integer("workers", workers, minimum=1)
        if workers > len(available):
            raise ValueError(
                f"workers={workers}, but the cluster has {len(available)} workers. Start more "
                "workers or ask for fewer ranks."
            )
        return available[:workers]
    if not isinstance(workers, (list, tuple, set)) or not all(isinstance(w, str) for w in workers):
        raise TypeError(
            f"workers must be a count or a list of worker addresses, got {workers!r}. "
            f"The cluster's workers are {available}."
        )
    workers = list(workers)
    if not workers:
        raise ValueError(f"workers=[] names no worker; the cluster has {available}.")
    twice = sorted({w for w in workers if workers.count(w) > 1})
    if twice:
        raise ValueError(
            f"workers lists {twice} more than once; a worker runs one rank of a run. List each "
            "once, or start more workers."
        )
    unknown = [w for w in workers if w not in info]
    if unknown:
        raise ValueError(f"Workers {unknown} are not in the cluster; it has {available}.")
    return workers


def _check_gpus(client: Client, ranks: list[str]) -> None:
    counts = client.run(_cuda_device_count, workers=ranks)
    missing = sorted(w for w, n in counts.items() if n == 0)
    if missing:
        raise RuntimeError(
            f"device='cuda', but workers {missing} see no CUDA GPU. Start GPU workers "
            "(daskdl.local_cluster(gpus=True), or `dask cuda worker`), or use device='auto', "
            "which trains on the CPU where there is no GPU."
        )


def _cuda_device_count() -> int:
    return torch.cuda.device_count()


def train_config(config, options: dict) -> TrainConfig:
    """``config`` (a TrainConfig, a dict or None) with ``options`` over it, and the
    client's configured comm timeout in place of ``None``."""
    if config is not None and not isinstance(config, (TrainConfig, Mapping)):
        raise TypeError(
            f"config must be a daskdl.TrainConfig or a dict of its options, got "
            f"{type(config).__name__}."
        )
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict({**values, **options})
    # Settings from the client's dask.config travel with the run: workers may differ.
    cfg.comm_timeout = cfg.timeout
    cfg.validate()  # the configured default too: a NaN or infinite timeout is an endless wait
    return cfg


def check_memory(client: Client, model: torch.nn.Module, cfg: TrainConfig, ranks: list[str]):
    """The training state of ``model`` (see :func:`daskdl.parallel.sharding.state_bytes_needed`)
    fits each rank's worker below the fraction of its memory limit at which Dask restarts it."""
    need = sharding.state_bytes_needed(model, cfg, len(ranks))
    # The client's setting stands in for the workers' (the default unless configured).
    terminate = dask.config.get("distributed.worker.memory.terminate") or 1.0
    info = workers_info(client)
    limited = [w for w in ranks if info.get(w, {}).get("memory_limit")]
    if not limited:
        return
    # Measured now: a heartbeat's figure may be from before the last run let go.
    in_use = client.run(_rss, workers=limited)
    for worker in limited:
        limit, used = info[worker]["memory_limit"], in_use[worker]
        room = terminate * limit - used
        if need > room:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if cfg.pipeline_stages > 1:
                layout = f"its largest stage of {cfg.pipeline_stages}"
            elif cfg.shard:
                layout = f"shard={cfg.shard!r} over {len(ranks)} rank(s)"
            else:
                layout = f"a whole replica on each of {len(ranks)} rank(s)"
            raise preflight.ModelCheckError(
                f"The model's training state needs {need / 1e9:.2f} GB per rank ({n:,} float32 "
                f"parameters, their gradients and the {cfg.optimizer} optimizer's state, "
                f"{layout}), more than worker {worker} has room for: {room / 1e9:.2f} GB below "
                f"{terminate:.0%} of its {limit / 1e9:.2f} GB memory limit, where Dask restarts "
                f"it ({used / 1e9:.2f} GB in use). Spread the state over more workers with "
                "shard='full' (parameters, gradients and optimizer state 1/P each), "
                "shard='optimizer' or pipeline=daskdl.Pipeline(stages=...), or give the "
                "workers more memory."
            )


def check_pipeline(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """A pipelined run's model can be cut as asked."""
    pipe = cfg.pipeline()
    if pipe is None:
        return
    try:
        pipeline.split_bounds(pipeline.layers_of(model), pipe)
    except (TypeError, pipeline.PipelineError) as e:
        raise preflight.ModelCheckError(f"pipeline_stages={pipe.stages}: {e}") from None


def check_shard(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """``shard="full"`` reduces each module's gradients once backward has reached all of its
    parameters: parameters tied between modules (an embedding and an output layer sharing
    weights) would fail in every rank at its first backward. Found here instead."""
    if cfg.shard != "full":
        return
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        raise preflight.ModelCheckError(
            f"shard='full' gathers and reduces each module's parameters on its own, and this "
            f"model ties parameters between modules ({' = '.join(tied[0])}"
            f"{f' and {len(tied) - 1} more' if len(tied) > 1 else ''}): use shard='optimizer' "
            "(CLI: --shard optimizer), which keeps the whole model on every rank."
        )


def _rss() -> int:
    return psutil.Process().memory_info().rss
