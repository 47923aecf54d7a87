"""The bundled backend: registry, HTTP API, sessions, cross-platform strategy."""
