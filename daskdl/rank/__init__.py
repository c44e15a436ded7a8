"""What runs in a rank task: `RankContext`, the contract every training loop runs against, and its
loader."""
