"""Custom ops of StyleGAN2 / BlendGAN, each a PyTorch reference plus an optional CUDA kernel.

Importing this package compiles nothing: the CUDA extensions are built by `op.build` on first use with a
CUDA tensor (set BLENDGAN_NO_CUDA_OPS=1 to always use the reference).
"""

from op.fused_act import FusedLeakyReLU, fused_leaky_relu
from op.upfirdn2d import upfirdn2d

__all__ = ["FusedLeakyReLU", "fused_leaky_relu", "upfirdn2d"]
