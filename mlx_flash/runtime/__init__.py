"""What runs per token: the FlashFFN, its cache, store, planner, selectors, and the loader that wires them into an mlx_lm model."""
