"""Measuring the gradient noise scale: probes (per-example, micro-batch) and the estimator."""
