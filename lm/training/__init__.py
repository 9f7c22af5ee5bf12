"""Training: Lightning module, strategies, checkpoints, signals, loggers and the `lm train` driver."""
