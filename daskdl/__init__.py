"""daskdl: train PyTorch models data-parallel on Dask clusters, from lazy Dask data."""

from daskdl import config as _config  # noqa: F401  (loads daskdl.yaml defaults into dask.config)
from daskdl import datasets, models
from daskdl.checkpoint.files import CheckpointError
from daskdl.cluster import local_cluster
from daskdl.collectives.comm import CollectiveAborted, PeerTimeoutError
from daskdl.config.options import TrainConfig
from daskdl.config.pipeline import Pipeline
from daskdl.data.dataset import Dataset
from daskdl.data.sources import publish
from daskdl.prediction.partitions import predict
from daskdl.rank.context import RankContext
from daskdl.runs.run import Run, RunError
from daskdl.runs.shards import plan_shards
from daskdl.runs.userloop import launch
from daskdl.training.launcher import fit
from daskdl.tuning.study import Study, tune
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
