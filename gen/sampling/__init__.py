"""Sigma schedules and k-diffusion-style sampler functions over one model wrapper (epsilon, v and flow models), so
every sampler serves every family; names: gen's, A1111's, ComfyUI's (gen.samplers' diffusers schedulers stay where
they are the reference: the model's own schedule)."""
