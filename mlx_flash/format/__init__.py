"""The flash model dir: its manifest, storage helpers and architecture table."""
