"""Small process-level helpers."""
