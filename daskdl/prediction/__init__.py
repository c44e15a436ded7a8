"""A trained model applied over partitioned data: weights once per worker, a block per partition."""
