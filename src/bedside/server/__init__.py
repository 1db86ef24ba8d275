"""The Open Inference Protocol v2 REST server."""
