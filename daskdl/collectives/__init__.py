"""Collectives between ranks: all-reduce, broadcast and point-to-point over Dask worker comms or
torch.distributed."""
