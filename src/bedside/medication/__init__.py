"""The bedside medication check: reading the scanned product (more to come with issue 15)."""
