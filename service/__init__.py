"""seqserve: serve text classifiers over gRPC with ONNX Runtime, and compare architectures."""
