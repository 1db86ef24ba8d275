"""The OIP v2 gRPC transport: `inference.GRPCInferenceService` over the dataplane."""

from bedside.server.grpc.service import InferenceServicer, start_grpc_server

__all__ = ["InferenceServicer", "start_grpc_server"]
