"""sims: EDM diffusion training with SIMS negative guidance and self-consuming generation loops."""
__version__ = "0.1.0"
