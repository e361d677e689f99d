"""What runs on every rank: who it is in the job, the training loop, stopping, checkpoints, watchdog, records."""
