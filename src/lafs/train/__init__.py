"""Training: the shared loop, checkpoints, distributed set-up and logging."""
