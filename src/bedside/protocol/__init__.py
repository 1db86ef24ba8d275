"""The Open Inference Protocol v2 (KServe / Triton / MLServer): datatypes and wire codecs."""
