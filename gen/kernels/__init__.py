"""Triton kernels on the sampling hot path. Import lazily: triton is an optional dependency."""
