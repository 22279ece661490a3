"""ldm: text-to-image latent diffusion."""
