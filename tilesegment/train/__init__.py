"""Training: datasets, the weighted-loss loop, checkpoints and evaluation."""
