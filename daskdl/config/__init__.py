"""Options: every option of a run defined once (`TrainConfig`), its sections, the checks of each
value, and the cluster-wide defaults in `daskdl.yaml` (loaded into `dask.config` on import)."""

from daskdl.config.options import TrainConfig
from daskdl.config.pipeline import Pipeline

__all__ = ["Pipeline", "TrainConfig"]
