"""Small helpers shared by every layer (no imports of the runtime, exporter or server)."""
