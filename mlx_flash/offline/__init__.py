"""Offline tools: convert, sources, pull, calibration, training, placement, evaluation."""
