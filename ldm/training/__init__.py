"""Lightning systems (autoencoder, latent diffusion), optimisation, callbacks and loggers."""
