"""Generated gRPC/protobuf stubs; regenerate with `python -m genfl_shared.protogen`."""
