"""Generated protobuf and gRPC code for package ``ganglion.v1`` (``make protos``; do not edit)."""
