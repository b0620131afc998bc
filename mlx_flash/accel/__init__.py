"""The fast CPU path: C kernels built from kernels/cpu_kernels.c, fast linears, the FFN over raw
bundles, numpy decoder blocks."""
