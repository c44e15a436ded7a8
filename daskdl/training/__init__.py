"""`fit`: the built-in training loop, one `train_fn` of the `RankContext` contract."""
