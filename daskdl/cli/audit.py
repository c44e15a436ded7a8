"""``daskdl audit``: where a cluster, its checkpoints and a model stand, as a list of findings.

Each finding has a severity (info, low, medium, high), the part it is about, what was seen,
and how to fix it. The checks read what the cluster reports about itself (addresses, TLS
settings, the sockets its processes listen on) and never change anything.

>>> report = daskdl.cli.audit.audit(client, checkpoint="runs/digits")   # doctest: +SKIP
>>> print(report.table())                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from packaging.version import Version

from daskdl import security
from daskdl.checkpoint import files as ckpt
from daskdl.cluster import workers_info

SEVERITIES = ("info", "low", "medium", "high")
# torch.load(weights_only=True) could still run code before 2.6 (CVE-2025-32434).
SAFE_TORCH = Version("2.6")


@dataclass
class Finding:
    severity: str
    area: str
    message: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, area: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(severity, area, message, fix))

    def at_or_above(self, severity: str) -> list[Finding]:
        level = SEVERITIES.index(severity)
        return [f for f in self.findings if SEVERITIES.index(f.severity) >= level]

    def to_dict(self) -> dict:
        return {"findings": [asdict(f) for f in self.findings]}

    def table(self) -> str:
        order = sorted(self.findings, key=lambda f: -SEVERITIES.index(f.severity))
        width = max([len("area"), *(len(f.area) for f in order)])
        lines = [f"{'severity':<8}  {'area':<{width}}  finding"]
        for f in order:
            lines.append(f"{f.severity:<8}  {f.area:<{width}}  {f.message}")
            if f.fix:
                lines.append(f"{'':<8}  {'':<{width}}  fix: {f.fix}")
        return "\n".join(lines)


# --- the cluster -------------------------------------------------------------------------------


def _listening() -> list[tuple[str, int]]:
    """(address, port) of every socket this process listens on (run on each Dask process)."""
    import psutil

    found = []
    for conn in psutil.Process().net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            found.append((conn.laddr.ip, conn.laddr.port))
    return sorted(set(found))


def _scheduler_facts(dask_scheduler=None) -> dict:
    return {
        "require_encryption": bool(dask_scheduler.security.require_encryption),
        "http_port": dask_scheduler.http_server.port if dask_scheduler.http_server else None,
        "listening": _listening(),
    }


def _torch_version() -> str:
    return torch.__version__


def check_cluster(client, report: Report) -> None:
    """TLS for the scheduler, workers and this client; what listens beyond loopback."""
    address = client.scheduler.address
    workers = sorted(workers_info(client))
    facts = client.run_on_scheduler(_scheduler_facts)
    # Every process's listening sockets: the comm ports and the HTTP dashboards alike.
    listeners = {"scheduler": facts["listening"]}
    listeners.update(client.run(_listening))
    wide = {
        who: [f"{ip}:{port}" for ip, port in socks if not security.is_loopback(ip)]
        for who, socks in listeners.items()
    }
    exposed = any(wide.values()) or not all(
        security.is_loopback(security.host_of(a)) for a in [address, *workers]
    )
    plain = [a for a in [address, *workers] if not a.startswith("tls://")]
    if plain:
        report.add(
            "high" if exposed else "medium",
            "cluster",
            f"no TLS: {len(plain)} of {len(workers) + 1} endpoints (scheduler and workers) "
            f"take unencrypted connections, e.g. {plain[0]}; anyone who can connect can run "
            "code on the cluster and read the data and gradients on the wire"
            + ("" if exposed else " (all on loopback, so only users of this machine)"),
            "start the cluster with TLS: daskdl.local_cluster(secure=True), or dask "
            "scheduler/worker --tls-ca-file/--tls-cert/--tls-key; attach with daskdl "
            "--tls-* flags",
        )
    else:
        report.add("info", "cluster", f"TLS on the scheduler and all {len(workers)} workers")
    if not facts["require_encryption"] and not plain:
        report.add(
            "medium",
            "cluster",
            "the scheduler does not require encryption: a plain-TCP listener could be added",
            "set distributed.comm.require-encryption: true",
        )
    settings = getattr(client, "security", None)
    if not plain and not (settings and settings.require_encryption):
        report.add(
            "low",
            "client",
            f"this client does not require encryption (connected to {address})",
            "connect with daskdl.security.tls(ca, cert, key) or --tls-* flags",
        )
    http = facts["http_port"]
    for who, socks in sorted(wide.items()):
        if not socks:
            continue
        dashboard = who == "scheduler" and any(s.endswith(f":{http}") for s in socks)
        tls = who == "scheduler" and address.startswith("tls://") or who.startswith("tls://")
        report.add(
            "high" if not tls else "medium",
            "dashboard" if dashboard else "exposure",
            f"{who} listens beyond loopback on {', '.join(socks)}"
            + (" (the Dask dashboard: task graphs, logs and data previews)" if dashboard else "")
            + ("" if tls else " without TLS"),
            "bind to 127.0.0.1 (local_cluster does; dask scheduler/worker --host 127.0.0.1 "
            "--dashboard-address 127.0.0.1:0, which a worker needs even with --no-dashboard) "
            "and reach it through an SSH tunnel",
        )
    if not any(wide.values()):
        report.add(
            "info",
            "exposure",
            f"the scheduler and {len(workers)} workers (their comms and dashboards) listen on "
            "loopback only",
        )
    versions = client.run(_torch_version)
    old = {w: v for w, v in versions.items() if Version(v.split("+")[0]) < SAFE_TORCH}
    if old:
        report.add(
            "high",
            "torch",
            f"workers with torch older than {SAFE_TORCH}: {old}; torch.load(weights_only=True) "
            "can run code from a crafted file there (CVE-2025-32434)",
            "upgrade torch on the workers",
        )


# --- this process ------------------------------------------------------------------------------


def check_local(report: Report, verify_key=None) -> None:
    """The torch installed here, and the signing key this environment sets and the verify key
    it sets (or ``verify_key``)."""
    version = Version(torch.__version__.split("+")[0])
    if version < SAFE_TORCH:
        report.add(
            "high",
            "torch",
            f"torch {torch.__version__} is older than {SAFE_TORCH}: torch.load(weights_only="
            "True) can run code from a crafted file (CVE-2025-32434). daskdl itself never calls "
            "torch.load, but other code in this process may",
            "pip install 'torch>=2.6'",
        )
    else:
        report.add("info", "torch", f"torch {torch.__version__} (>= {SAFE_TORCH})")
    try:
        signer, verifier = security.signing_key(), security.verify_key(verify_key)
    except security.KeyFileError as e:
        report.add("high", "keys", f"the configured key cannot be used: {e}")
        return
    if signer is None:
        report.add(
            "low",
            "keys",
            "no signing key: checkpoints written from here are unsigned",
            f"daskdl keygen DIR, then {security.ENV_KEY_FILE}=DIR/daskdl.key",
        )
    if verifier is None:
        report.add(
            "low",
            "keys",
            "no verify key: loading a checkpoint only warns that its origin was not checked",
            f"{security.ENV_VERIFY_FILE}=DIR/daskdl.pub",
        )
    else:
        report.add("info", "keys", f"checkpoints must verify with {verifier!r}")


# --- checkpoints -------------------------------------------------------------------------------


def check_checkpoints(path: str | os.PathLike, report: Report, key=None) -> list[Path]:
    """The signature status of a checkpoint, or of each checkpoint of a run directory."""
    key = security.verify_key(key)
    paths = ckpt.checkpoints_at(path)
    if not paths:
        report.add("medium", "checkpoint", f"no checkpoint found at {path}")
    for p in paths:
        try:
            if key is not None:
                ckpt.load(p, key)  # the signature, then the digests; refuses, never warns
                status = "verified"
            else:
                status = ckpt.signature_status(p)  # no key: only whether it is signed
        except ckpt.CheckpointError as e:
            report.add(
                "high", "checkpoint", f"{p}: REFUSED: {e}", "do not load it; find its origin"
            )
            continue
        if status == "verified":
            report.add("info", "checkpoint", f"{p}: signature and digests verify")
        else:
            report.add(
                "medium",
                "checkpoint",
                f"{p}: {status}, not verified (no verify key)"
                if status == "signed"
                else f"{p}: unsigned; anyone who could write it could have changed it",
                "set a verify key (daskdl verify --key FILE)"
                if status == "signed"
                else "train with a signing key (daskdl keygen)",
            )
    return paths


# --- robustness --------------------------------------------------------------------------------


def fgsm_accuracy(
    model: torch.nn.Module,
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epsilons=(0.01, 0.05, 0.1),
    batch_size: int = 256,
) -> dict[float, float]:
    """Accuracy on ``(X, y)`` clean (epsilon 0) and under the fast gradient sign method: each
    sample moved by ``epsilon * sign(grad of the loss)`` (Goodfellow et al., 2015), in the
    units of the features as the model sees them."""
    X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    was_training = model.training
    model.eval()
    correct = dict.fromkeys([0.0, *map(float, epsilons)], 0)
    try:
        for start in range(0, len(X), batch_size):
            xb = X[start : start + batch_size].clone().requires_grad_(True)
            yb = y[start : start + batch_size]
            logits = model(xb)
            correct[0.0] += int((logits.argmax(1) == yb).sum())
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, yb), xb)
            with torch.no_grad():
                for eps in epsilons:
                    adv = model(xb + float(eps) * grad.sign())
                    correct[float(eps)] += int((adv.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {eps: n / len(X) for eps, n in correct.items()}


def check_robustness(
    path: str | os.PathLike,
    report: Report,
    dataset: str | None = None,
    epsilons=(0.01, 0.05, 0.1),
    key=None,
) -> dict[float, float] | None:
    """FGSM against the newest checkpoint under ``path`` on its data set's validation split."""
    from daskdl import datasets, models

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.UnverifiedCheckpointWarning)
            where, tensors, _, manifest = ckpt.load_latest(path, key)
    except ckpt.CheckpointError as e:
        report.add("high", "robustness", f"not measured: the checkpoint is refused ({e})")
        return None
    spec = manifest.get("model")
    if spec not in models.REGISTRY:
        raise ValueError(
            f"the checkpoint's model {spec!r} is not a registry name; measure it from Python "
            "with daskdl.cli.audit.fgsm_accuracy(model, X, y)."
        )
    if manifest.get("task", "classification") != "classification":
        report.add("info", "robustness", "not measured: FGSM accuracy is for classifiers")
        return None
    model = models.build(spec, tuple(manifest["input_shape"]), manifest["n_classes"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    meta = manifest.get("meta") or {}
    name = dataset or meta.get("dataset") or "digits"
    seed = manifest.get("config", {}).get("seed", 0)
    _, val = datasets.train_test(name, meta.get("data_path"), seed=seed)
    X, y = val.compute()
    accuracy = fgsm_accuracy(model, X, y, epsilons)
    clean, worst = accuracy[0.0], accuracy[max(accuracy)]
    summary = ", ".join(f"eps {e:g}: {a:.3f}" for e, a in accuracy.items() if e)
    report.add(
        "medium" if worst < clean / 2 else "info",
        "robustness",
        f"{where.name} on {name} ({len(X)} validation samples): clean accuracy {clean:.3f}; "
        f"under FGSM {summary}",
        "adversarial training, or input checks before the model, if inputs can be chosen by "
        "an adversary"
        if worst < clean / 2
        else "",
    )
    return accuracy


def audit(
    client=None,
    checkpoint: str | os.PathLike | None = None,
    robustness: bool = False,
    dataset: str | None = None,
    epsilons=(0.01, 0.05, 0.1),
    verify_key=None,
) -> Report:
    """Every check that applies: this process, the cluster of ``client``, the checkpoints at
    ``checkpoint`` and, with ``robustness``, FGSM against its newest one."""
    report = Report()
    check_local(report, verify_key)
    if client is not None:
        check_cluster(client, report)
    if checkpoint is not None:
        check_checkpoints(checkpoint, report, verify_key)
        if robustness:
            check_robustness(checkpoint, report, dataset, epsilons, verify_key)
    elif robustness:
        raise ValueError("robustness needs a checkpoint to measure (--checkpoint PATH).")
    return report
