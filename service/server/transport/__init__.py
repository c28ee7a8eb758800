"""The two thin gRPC skins over the inference core: seqserve.v1 and the Open Inference Protocol."""
