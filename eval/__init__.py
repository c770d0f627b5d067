"""SAKE evaluation: the `sake_metric` module (judging and metrics), scoring CLI, reports (no torch needed)."""
