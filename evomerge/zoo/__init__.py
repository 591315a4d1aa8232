"""Small models built locally: tiny checkpoints for tests and the demo (no hub access)."""
