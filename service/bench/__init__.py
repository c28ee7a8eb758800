"""The benchmark: load generator, in-process ONNX Runtime baseline, child server, texts."""
