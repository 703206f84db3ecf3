"""ganflow: reproducible, distributed, tracked GAN training."""

__version__ = "0.1.0"
