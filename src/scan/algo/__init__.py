"""Algorithms as functions of tensors and arrays: losses, metrics, nearest neighbours, label
propagation, baselines, self-checks and the trust (out-of-distribution) scores."""
