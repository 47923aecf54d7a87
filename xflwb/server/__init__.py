"""The bundled backend: registry, HTTP API, sessions, the phones' gRPC transport."""
