"""daskdl inside a Dask worker: the extension that owns its state, and the process tuning."""
