"""The gRPC server: lifecycle, registry, ONNX Runtime sessions, batching, the core, metrics."""
