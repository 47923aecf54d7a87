"""The phone backend: HTTP API, phone sessions (gRPC), device enrollment, TLS and tokens,
cross-platform strategy; what it shares with simulations lives in ``xflwb.sessions``."""
