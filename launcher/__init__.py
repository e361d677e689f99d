"""launcher: one run description in; DeepSpeed config, Slurm script and training run out."""

__version__ = "0.1.0"
