"""What a run learns: the task, the loss, how outputs meet targets, and the validation metrics."""
