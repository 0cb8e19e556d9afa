"""Training: losses, loss weighting strategies, the trainer and checkpoints."""
