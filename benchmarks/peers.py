"""daskdl against its peers on one data-parallel workload: Ray Train's ``TorchTrainer``, plain
PyTorch DDP started with ``torch.multiprocessing``, and ``dask-pytorch-ddp``.

    python benchmarks/peers.py [--n 4096] [--epochs 4] [--rounds 2]

The workload: ``small_cnn`` on synthetic 3x32x32 images, batch 64 per worker, 2 workers, one
torch thread each, SGD (lr 0.05, momentum 0.9), each trainer as its users run it, with
denormal floats flushed in every trainer's ranks (daskdl's do it by themselves). Each trainer
runs in a fresh process, in interleaved rounds. For each: steady throughput (global samples/s
over the epochs after the first), the wall time of the training call, the wall time including
starting its runtime (a Dask cluster, Ray, the processes), and the peak memory of its process
tree (every process it started, summed). Peers that are not installed are skipped with a note
(``pip install -c constraints.txt "ray[train]" dask-pytorch-ddp`` to include them).
Ends with ``peers ratio=<daskdl throughput / Ray Train throughput> target=1.0`` (``nan``
without Ray Train).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import psutil
import torch
import torch.distributed as dist

BATCH, LR = 64, 0.05
TRAINERS = {  # name: the module it needs
    "daskdl": "daskdl",
    "Ray Train": "ray.train",
    "DDP": "torch",
    "dask-pytorch-ddp": "dask_pytorch_ddp",
}


def _data(n: int):
    from _workload import synthetic

    return synthetic(n).compute()


def _rank_loop(rank: int, n: int, epochs: int, model) -> list[float]:
    """One rank's share of the plain loop; the global samples/s per epoch after the first.
    Denormal floats flushed, as daskdl's ranks do: once the CNN fits these images, denormal
    gradients make a step several times slower (a CPU quirk, not the trainer's)."""
    from _workload import plain_epochs

    torch.set_flush_denormal(True)

    X, y = _data(n)
    rates = plain_epochs(model, X[rank::2], y[rank::2], epochs, BATCH, LR, seed=[rank],
                         before_epoch=dist.barrier)  # fmt: skip
    return [2 * r for r in rates]


def _small_cnn():
    from daskdl import models

    torch.manual_seed(0)
    return models.small_cnn((3, 32, 32), 10)


# --------------------------------------------------------------------------- the trainers


def run_daskdl(n: int, epochs: int) -> tuple[list[float], float]:
    from _workload import fit_throughput, synthetic

    import daskdl

    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        t = time.perf_counter()
        rates = fit_throughput(client, synthetic(n), epochs, BATCH)
        return rates, time.perf_counter() - t


def _ddp_rank(rank, port, n, epochs, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_small_cnn())
        out[rank] = _rank_loop(rank, n, epochs, model)
    finally:
        dist.destroy_process_group()


def run_ddp(n: int, epochs: int) -> tuple[list[float], float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    t = time.perf_counter()
    mp.spawn(_ddp_rank, args=(port, n, epochs, out), nprocs=2)
    return out[0], time.perf_counter() - t


def _ray_loop(config) -> list[float]:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    sys.path.insert(0, config["here"])
    rank = ray.train.get_context().get_world_rank()
    model = ray.train.torch.prepare_model(_small_cnn())  # DistributedDataParallel, gloo
    return _rank_loop(rank, config["n"], config["epochs"], model)


def run_ray(n: int, epochs: int) -> tuple[list[float], float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Logical CPUs: the 2 workers' and the trainer's own; each worker trains on 1 thread.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"n": n, "epochs": epochs, "here": os.path.dirname(__file__)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=os.path.abspath("ray_results"), name="peers"),
        )
        t = time.perf_counter()
        result = trainer.fit()
        # Ray Train 2.5x keeps metrics with checkpoints only: rank 0's return value instead.
        return result.return_value, time.perf_counter() - t
    finally:
        ray.shutdown()


def _dask_ddp_rank(n: int, epochs: int, here: str) -> list[float]:
    # dask-pytorch-ddp has set up the process group (gloo) before calling this.
    torch.set_num_threads(1)
    sys.path.insert(0, here)
    model = torch.nn.parallel.DistributedDataParallel(_small_cnn())
    return _rank_loop(dist.get_rank(), n, epochs, model)


def run_dask_pytorch_ddp(n: int, epochs: int) -> tuple[list[float], float]:
    from dask_pytorch_ddp import dispatch
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1") as cluster:
        with Client(cluster) as client:
            t = time.perf_counter()
            # Keywords only: dispatch.run passes positional arguments where they collide.
            futures = dispatch.run(client, _dask_ddp_rank, backend="gloo", n=n, epochs=epochs,
                                   here=os.path.dirname(__file__))  # fmt: skip
            rates = client.gather(futures)[0]
            return rates, time.perf_counter() - t


RUNS = {"daskdl": run_daskdl, "Ray Train": run_ray, "DDP": run_ddp,
        "dask-pytorch-ddp": run_dask_pytorch_ddp}  # fmt: skip


# --------------------------------------------------------------------------- the harness


def child(name: str, n: int, epochs: int) -> None:
    """In a fresh process: train with ``name`` and print one JSON line of figures."""
    t = time.perf_counter()
    rates, call = RUNS[name](n, epochs)
    total = time.perf_counter() - t
    print(json.dumps({"rate": statistics.median(rates), "call_s": call, "total_s": total}))


def measure(name: str, n: int, epochs: int) -> dict:
    """Run ``name`` in a fresh process; its figures and the peak RSS of its process tree."""
    command = [sys.executable, __file__, "--child", name, "--n", str(n), "--epochs", str(epochs)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak / 2**20}


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        return child(args.child, args.n, args.epochs)
    present = [t for t, module in TRAINERS.items() if _installed(module)]
    missing = [t for t in TRAINERS if t not in present]
    for t in missing:
        print(f"peers: {t} is not installed: skipped (pip install -c constraints.txt "
              '"ray[train]" dask-pytorch-ddp to include it)')  # fmt: skip
    runs: dict[str, list[dict]] = {t: [] for t in present}
    for r in range(args.rounds):
        for t in present:
            runs[t].append(measure(t, args.n, args.epochs))
            print(f"round {r + 1}: {t}: {runs[t][-1]}", flush=True)
    med = {t: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for t, rs in runs.items()}
    rows = []
    for t, m in med.items():
        to_ddp = m["rate"] / med["DDP"]["rate"]
        to_ray = m["rate"] / med["Ray Train"]["rate"] if "Ray Train" in med else float("nan")
        rows.append([t, m["rate"], m["call_s"], m["total_s"], m["peak_mb"], to_ddp, to_ray])
    ratio = rows[0][-1]
    from _report import report

    report(
        "peers",
        f"small_cnn on {args.n:,} synthetic 3x32x32 images, 2 workers, batch {BATCH} per "
        f"worker, one torch thread each, {args.epochs} epochs; each trainer in fresh processes, "
        f"{args.rounds} interleaved rounds (medians). Throughput: global samples/s over the "
        "epochs after the first. Peak memory: the trainer's whole process tree. Denormals "
        "flushed in every trainer's ranks."
        + (f" Not installed, skipped: {', '.join(missing)}." if missing else ""),
        ["trainer", "samples/s", "call s", "with start-up s", "peak MB", "to DDP", "to Ray"],
        rows,
        f"peers ratio={ratio:.3f} target=1.0",
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    main()
