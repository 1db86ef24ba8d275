"""Security: callers and their credentials, TLS, keys and encryption at rest, the audit log."""
