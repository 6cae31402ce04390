"""k-diffusion 0.1.1.post1, the sampling module only (the reference of gen.sampling.k); see sampling.py."""
