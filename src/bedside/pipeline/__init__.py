"""The model pipeline: export to ONNX with a numerical check, optimize behind an accuracy gate,
publish into a model repository. Needs the `pipeline` extra (torch, converters); serving does not."""
