"""The backend: ONNX Runtime sessions, execution providers, warm-up."""
