"""`tune`: many trials on one cluster, driven by Optuna."""
