"""Per-rank training code: data pipeline, model setup and the training loop (heavy imports live here)."""
