"""What runs on every rank: its entry (markers, exit codes), the training loop, stopping, checkpoints, watchdog,
records. Who the rank is in its job: launcher/identity.py."""
