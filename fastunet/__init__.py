"""fastunet: a drop-in, Triton-accelerated replacement for denoising-diffusion-pytorch's Unet."""

from fastunet.attention import Attention, LinearAttention
from fastunet.backend import use_backend
from fastunet.layers import Block, ResnetBlock, RMSNorm
from fastunet.unet import Unet

__all__ = ["Attention", "Block", "LinearAttention", "RMSNorm", "ResnetBlock", "Unet", "use_backend"]
__version__ = "0.1.0"
