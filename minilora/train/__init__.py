"""The training loop, its config, optimizers and schedules, and resumable training checkpoints."""
