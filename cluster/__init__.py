"""Ray side of calibration: connecting to a cluster and the per-worker functions."""
