"""Ray Train side: the per-worker loop, checkpoints, and the driver that launches a run."""
