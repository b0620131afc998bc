"""MLX compute of the FFN over cached rows: pure-MLX references and the Metal/CUDA kernels."""
