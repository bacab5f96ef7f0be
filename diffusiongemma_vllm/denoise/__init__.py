"""The denoise loop: canvas state and passes, the CUDA-graph ladder, the sampler's decisions
and the seeded draws."""
