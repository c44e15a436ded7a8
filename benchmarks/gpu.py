"""One GPU: ``daskdl.fit`` with one rank on a dask-cuda ``LocalCUDACluster`` against the plain
PyTorch loop, in this one process run. ResNet-18 (the 32x32 variant), batch 512, synthetic
images held on the GPU, SGD with momentum; fp32, then bf16 autocast with channels_last.

    python benchmarks/gpu.py [--n N] [--epochs E]      (or bash benchmarks/gpu.sh)

Throughput is images per second over every epoch after the first. A last row runs daskdl with
``fused=False`` (the host then waits for the GPU every step, to read the non-finite flag).
Without CUDA the script runs a small CPU fallback (small_cnn, batch 64, a one-worker
LocalCluster) so that it stays exercised. Ends with
``gpu ratio=<daskdl / plain, bf16> target=0.95``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from _report import report

import daskdl
from daskdl import models


def plain_loop(X, y, model_name, epochs, batch, precision, channels_last, device):
    """What a PyTorch user writes for data already on the device: no host sync per step."""
    torch.manual_seed(0)
    model = models.build(model_name, tuple(X.shape[1:]), 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    steps = len(X) // batch
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(X), device=device)
        _sync(device)
        t = time.perf_counter()
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            xb, yb = X.index_select(0, idx), y.index_select(0, idx)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        _sync(device)
        rates.append(steps * batch / (time.perf_counter() - t))
    return rates[1:]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def staging(device, n=11_170_000, repeats=20):
    """Milliseconds to bring one 44.7 MB float32 gradient to the host: into fresh pageable
    memory (``tensor.cpu()``) and into the pinned buffer that daskdl's all-reduce keeps."""
    grad = torch.randn(n, device=device)
    pinned = torch.empty(n, pin_memory=True)

    def timed(copy):
        copy()  # the first copy pays for allocation
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            copy()
            _sync(device)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    return timed(lambda: grad.cpu()), timed(lambda: pinned.copy_(grad))


def daskdl_fit(
    client, data, model_name, epochs, batch, precision, channels_last, device, fused=None
):
    run = daskdl.fit(
        client,
        model_name,
        data,
        epochs=epochs,
        batch_size=batch,
        lr=0.05,
        schedule="constant",
        augment=False,
        precision=precision,
        channels_last=channels_last,
        device=device.type,
        fused=fused,
        progress=False,
    )
    return list(run.history["samples_per_s"].iloc[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="3 on CUDA, 2 on the CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        device, model_name, batch, n = torch.device("cuda"), "resnet18", 512, args.n or 20480
        torch.backends.cudnn.benchmark = True
        cluster = dict(gpus=1)
        where = torch.cuda.get_device_name(0)
    else:
        device, model_name, batch, n = torch.device("cpu"), "small_cnn", 64, args.n or 512
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # as daskdl's ranks do
        cluster = dict(n_workers=1, threads_per_worker=1)
        where = "CPU fallback (no CUDA)"
    data = daskdl.datasets.synthetic_images(n, (3, 32, 32), 10, seed=0, chunks=n // 4)
    X, y = (torch.from_numpy(a) for a in data.compute())
    epochs = args.epochs or (3 if cuda else 2)
    cases = [("fp32", False), ("bf16", True)]
    rows, ratios = [], {}
    # The cluster first: dask-cuda wants its workers started before this process uses CUDA.
    with daskdl.local_cluster(**cluster) as client:
        X, y = X.to(device), y.to(device)
        data = data.persist(client)
        for precision, channels_last in cases:
            options = (model_name, epochs, batch, precision, channels_last, device)
            plain = plain_loop(X, y, *options)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()  # leave the GPU's memory to the worker
            fitted = daskdl_fit(client, data, *options)
            a, b = statistics.median(plain), statistics.median(fitted)
            ratios[precision] = b / a
            layout = "channels_last" if channels_last else "default layout"
            rows.append([f"{precision}, {layout}", a, b, b / a, 0.95])
        # What the fused optimizer's on-device skip saves: without it the host reads the
        # non-finite flag, so waits for the GPU, every step (compared with the last plain run).
        waited = statistics.median(daskdl_fit(client, data, *options, fused=False))
        rows.append([f"{precision}, {layout}, fused=False", a, waited, waited / a, ""])
    if cuda:
        pageable, pinned = staging(device)
        report(
            "gpu-staging",
            "One 44.7 MB float32 gradient from the GPU to the host; milliseconds, median of 20.",
            ["into", "ms", "GB/s"],
            [
                ["pageable (tensor.cpu())", pageable, 44.68 / pageable],
                ["pinned (daskdl's all-reduce)", pinned, 44.68 / pinned],
            ],
            f"gpu-staging ratio={pinned / pageable:.3f} target=0.1",
        )
    report(
        "gpu",
        f"{model_name}, batch {batch}, {n} synthetic 3x32x32 images on the device, SGD; images/s "
        f"per epoch after the first ({epochs} epochs). daskdl: 1 rank on "
        f"{'a LocalCUDACluster' if cuda else 'a 1-worker LocalCluster'}. Device: {where}.",
        ["precision", "plain PyTorch img/s", "daskdl.fit img/s", "ratio", "target"],
        rows,
        f"gpu ratio={ratios['bf16']:.3f} target=0.95",
    )


if __name__ == "__main__":
    main()
