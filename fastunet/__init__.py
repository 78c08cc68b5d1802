"""fastunet: a drop-in, Triton-accelerated replacement for denoising-diffusion-pytorch's Unet."""

from fastunet.backend import use_backend

__all__ = ["use_backend"]
__version__ = "0.1.0"
