"""bedside: a point-of-care AI inference server speaking the Open Inference Protocol v2."""

__version__ = "0.1.0"

import os as _os

# ONNX Runtime (1.32) starts a telemetry store at import (~/.cache/Microsoft/DeveloperTools/
# .onnxruntime: a device id and an event database). Nothing about a hospital box leaves it or is
# recorded for a vendor: set before any module imports onnxruntime (the ingest child inherits it).
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
