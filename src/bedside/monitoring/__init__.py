"""Operational figures: latency statistics, and later metrics and drift."""
