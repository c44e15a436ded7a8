"""daskdl: train PyTorch models data-parallel on Dask clusters, from lazy Dask data."""

from daskdl import config as _config  # noqa: F401  (loads daskdl.yaml defaults into dask.config)
from daskdl import datasets, models
from daskdl.checkpoint import CheckpointError
from daskdl.cluster import local_cluster
from daskdl.comm import CollectiveAborted, PeerTimeoutError
from daskdl.config import TrainConfig
from daskdl.context import RankContext
from daskdl.data import Dataset
from daskdl.launcher import fit
from daskdl.pipeline import Pipeline
from daskdl.prediction import predict
from daskdl.run import Run, RunError
from daskdl.shards import plan_shards
from daskdl.sources import publish
from daskdl.study import Study, tune
from daskdl.userloop import launch
from daskdl.webapp import dashboard

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CollectiveAborted",
    "Dataset",
    "PeerTimeoutError",
    "Pipeline",
    "RankContext",
    "Run",
    "RunError",
    "Study",
    "TrainConfig",
    "dashboard",
    "datasets",
    "fit",
    "launch",
    "local_cluster",
    "models",
    "plan_shards",
    "predict",
    "publish",
    "tune",
]
