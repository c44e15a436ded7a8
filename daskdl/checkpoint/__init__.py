"""Checkpoints: signed safetensors files with a digest manifest, and the run folder that holds
them."""

from daskdl.checkpoint.files import CheckpointError, UnverifiedCheckpointWarning

__all__ = ["CheckpointError", "UnverifiedCheckpointWarning"]
