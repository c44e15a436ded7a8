"""The ``daskdl`` commands that keep runs safe: ``keygen`` (signing keys), ``verify`` (a
checkpoint's signature and digests) and ``audit`` (the security report)."""

from __future__ import annotations

import sys
from contextlib import ExitStack


def add_parsers(sub) -> None:
    _keygen_parser(sub)
    _verify_parser(sub)
    _audit_parser(sub)


def _keygen_parser(sub) -> None:
    p = sub.add_parser(
        "keygen",
        help="make a key for signing checkpoints",
        description="Write an Ed25519 key pair (DIR/daskdl.key, private, mode 0600; "
        "DIR/daskdl.pub, public) or, with --hmac, a random shared secret (DIR/daskdl.secret). "
        "Sign with DASKDL_SIGNING_KEY_FILE=DIR/daskdl.key; verify elsewhere with "
        "DASKDL_VERIFY_KEY_FILE=DIR/daskdl.pub.",
    )
    p.add_argument("directory", help="folder to write the key files to")
    p.add_argument("--hmac", action="store_true", help="an HMAC-SHA256 secret instead")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")


def keygen(args) -> int:
    from daskdl import security

    kind = security.HMAC if args.hmac else security.ED25519
    written = security.keygen(args.directory, kind, force=args.force)
    for path in written:
        print(path)
    key = security.load_key(written[0])  # daskdl.key, or daskdl.secret
    print(f"key id {key.key_id} ({kind})", file=sys.stderr)
    return 0


def _verify_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check checkpoints' signatures and digests",
        description="Verify a checkpoint, or every checkpoint of a run directory: the "
        "signature of its manifest, then the SHA-256 of each file. Exit status 0 when all "
        "verify, 1 when any is refused.",
    )
    p.add_argument("path", help="a checkpoint (epoch-NNNN) or a run directory")
    p.add_argument(
        "--key",
        help="public key or HMAC secret file (default: DASKDL_VERIFY_KEY_FILE, "
        "DASKDL_SIGNING_KEY or DASKDL_SIGNING_KEY_FILE)",
    )


def verify(args) -> int:
    from daskdl import security
    from daskdl.checkpoint import files as checkpoint

    key = security.verify_key(args.key)
    if key is None:
        raise ValueError(
            "no key to verify with: pass --key FILE (the daskdl.pub of `daskdl keygen`, or "
            "an HMAC secret file), or set DASKDL_VERIFY_KEY_FILE or DASKDL_SIGNING_KEY."
        )
    paths = checkpoint.checkpoints_at(args.path)
    if not paths:
        raise FileNotFoundError(f"no checkpoint at {args.path} (nor epoch-NNNN folders under it).")
    refused = 0
    for path in paths:
        try:
            checkpoint.load(path, key)  # with a key it refuses, never warns
            print(f"verified  {path}  ({key.algorithm} key {key.key_id})")
        except checkpoint.CheckpointError as e:
            refused += 1
            print(f"REFUSED   {path}: {e}")
    return 1 if refused else 0


def _audit_parser(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="a security report: TLS, exposure, keys, checkpoints, robustness",
        description="Report where a cluster, its checkpoints and a model stand: TLS on the "
        "scheduler, workers and client; what listens beyond loopback (the Dask dashboard "
        "included); the installed torch; signing keys; each checkpoint's signature; and, with "
        "--robustness, the newest checkpoint's accuracy under FGSM. Exit status 1 when a "
        "finding is at or above --fail-on. Without --scheduler (or --checkpoint alone), "
        "a local cluster as daskdl starts one is checked.",
    )
    from daskdl.cli.arguments import cluster_arguments

    cluster_arguments(p)
    p.add_argument("--checkpoint", help="a checkpoint or run directory to check")
    p.add_argument("--key", help="verify key for the checkpoints (default: the environment's)")
    p.add_argument(
        "--robustness", action="store_true", help="FGSM against the newest checkpoint's model"
    )
    p.add_argument(
        "--epsilons",
        default="0.01,0.05,0.1",
        help="FGSM step sizes, in the units of the standardised features",
    )
    p.add_argument("--dataset", help="validation data for --robustness (default: the run's)")
    p.add_argument(
        "--fail-on",
        choices=["low", "medium", "high"],
        default="high",
        help="exit 1 when a finding is at least this severe",
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")


def audit(args) -> int:
    import json

    from daskdl.cli import audit as audits

    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        raise ValueError(f"--epsilons must be numbers separated by commas, got {args.epsilons!r}.")
    from daskdl.cli.arguments import client_for

    with ExitStack() as stack:
        cluster = args.scheduler or args.secure or args.workers or not args.checkpoint
        client = client_for(args, stack) if cluster else None
        report = audits.audit(
            client,
            checkpoint=args.checkpoint,
            robustness=args.robustness,
            dataset=args.dataset,
            epsilons=epsilons,
            verify_key=args.key,
        )
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    failing = report.at_or_above(args.fail_on)
    if failing:
        print(f"daskdl audit: {len(failing)} at or above {args.fail_on}", file=sys.stderr)
    return 1 if failing else 0
