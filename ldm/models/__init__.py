"""Plain nn.Module models: autoencoder, U-Net, text encoders, discriminator."""
