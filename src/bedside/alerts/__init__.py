"""Alerts: the rule-based early-warning scores (NEWS2, qSOFA) that are always computed, and the
alert stream that carries model and rule alerts to clinicians' systems."""
