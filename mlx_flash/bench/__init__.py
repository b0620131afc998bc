"""The benchmark: harness, contenders and baselines (imported only by the CLI)."""
