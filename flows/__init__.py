"""Prefect flows wrapping the calibration pipeline."""
