"""Model components: CLIP text encoder, VAE, UNet presets and the project's DiT."""
