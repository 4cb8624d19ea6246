"""Training engine: the Accelerate loop, checkpoints, schedules, the feature cache, CPU speed settings."""
