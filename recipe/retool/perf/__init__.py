"""What the launch picks for speed and precision: attention backend, fused kernels, compute dtype."""
