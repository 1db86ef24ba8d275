"""Signed over-the-air model updates: the publisher's TUF repository and rollout plan, and the
agent inside `bedside serve` that verifies, installs atomically, checks, watches and rolls back."""
