"""neural-rdm: Neural Residual Diffusion Models in PyTorch."""
__version__ = "0.1.0"
