"""circuitscope service: the gRPC server and the command-line entry point."""
