"""Data: `Dataset` over lazy Dask arrays, its sources, preprocessing, streaming and checks."""

from daskdl.data.dataset import Dataset

__all__ = ["Dataset"]
