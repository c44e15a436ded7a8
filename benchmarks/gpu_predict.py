"""Prediction on one GPU: ``run.predict`` on a dask-cuda worker against the plain PyTorch loop
on the same GPU, in this one process run. ResNet-18 (the 32x32 variant), batch 1024,
synthetic 3x32x32 images held in host memory (the worker's, and this process's), labels
back to the host; fp32, then bf16 autocast.

    python benchmarks/gpu_predict.py [--n N] [--rounds R]   (bash benchmarks/gpu.sh runs it)

Images/s of each, in alternating rounds, after one untimed call each (the worker builds its
model, cuDNN picks its kernels). Without CUDA a small CPU fallback (small_cnn, a one-worker
LocalCluster) keeps the script exercised. Ends with
``gpu-predict ratio=<daskdl / plain, bf16> target=0.95``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from _report import report

import daskdl

BATCH = 1024
TARGET = 0.95


def plain(model, X: np.ndarray, device, precision: str) -> tuple[float, np.ndarray]:
    """The loop a PyTorch user writes: pinned host batches to the device, labels back."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    labels = []
    t = time.perf_counter()
    with torch.inference_mode(), autocast:
        for start in range(0, len(X), BATCH):
            xb = torch.from_numpy(X[start : start + BATCH])
            if device.type == "cuda":
                xb = xb.pin_memory()
            labels.append(model(xb.to(device, non_blocking=True)).argmax(1).cpu().numpy())
    return len(X) / (time.perf_counter() - t), np.concatenate(labels)


def distributed(run, data, device, precision) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    labels = run.predict(data, batch_size=BATCH, device=device.type, precision=precision)
    labels = labels.compute()
    return len(labels) / (time.perf_counter() - t), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    args, _ = parser.parse_known_args()  # gpu.sh passes gpu.py's options too
    cuda = torch.cuda.is_available()
    if cuda:
        device, name, n, cluster = torch.device("cuda"), "resnet18", args.n or 200_000, {"gpus": 1}
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(0)
    else:
        device, name, n = torch.device("cpu"), "small_cnn", args.n or 2048
        cluster = {"n_workers": 1, "threads_per_worker": 1}
        torch.set_num_threads(1)
        where = "CPU fallback (no CUDA)"
    rows, ratios = [], {}
    # The cluster first: dask-cuda wants its workers started before this process uses CUDA.
    with daskdl.local_cluster(**cluster) as client:
        train = daskdl.datasets.synthetic_images(1024, seed=0, chunks=256)
        run = daskdl.fit(client, name, train, epochs=1, batch_size=128, progress=False)
        big = daskdl.datasets.synthetic_images(n, seed=1, chunks=max(1, n // 16))
        data = big.persist(client)
        (X,) = client.compute([big.X], sync=True)
        model = run.model.to(device).eval()
        for precision in ("fp32", "bf16"):
            rates = {"plain": [], "daskdl": []}
            plain(model, X[: 4 * BATCH], device, precision)
            distributed(run, data, device, precision)
            for r in range(args.rounds):
                for who in ("plain", "daskdl") if r % 2 == 0 else ("daskdl", "plain"):
                    if who == "plain":
                        rate, reference = plain(model, X, device, precision)
                    else:
                        rate, labels = distributed(run, data, device, precision)
                    rates[who].append(rate)
            agree = float((labels == reference).mean())
            a, b = statistics.median(rates["plain"]), statistics.median(rates["daskdl"])
            ratios[precision] = b / a
            rows.append([precision, a, b, b / a, TARGET, f"{agree:.4f}"])
    report(
        "gpu-predict",
        f"{name} labels for {n} synthetic 3x32x32 images in host memory, batch {BATCH}; "
        f"median images/s over {args.rounds} alternating rounds. daskdl: run.predict on "
        f"{'a LocalCUDACluster worker' if cuda else 'a 1-worker LocalCluster'}. Device: {where}. "
        "agree: the fraction of labels equal to the plain loop's (bf16 may flip near ties).",
        ["precision", "plain PyTorch img/s", "run.predict img/s", "ratio", "target", "agree"],
        rows,
        f"gpu-predict ratio={ratios['bf16']:.3f} target={TARGET}",
    )


if __name__ == "__main__":
    main()
