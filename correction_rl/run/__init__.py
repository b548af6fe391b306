"""A run's life: building components from the config, the in-process loop, the lifecycle both drivers share, checkpoints and held-out evaluation."""
