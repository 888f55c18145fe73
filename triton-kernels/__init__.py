"""supergen's Triton kernels, importable as ``supergen.kernels`` with only torch and triton.

Each launcher takes its output tensor from the caller and validates only what would make the kernel
read or write out of bounds; argument policy lives in ``supergen.ops``.
"""

from .blend_scatter import blend_scatter
from .halo_gather import halo_gather
from .masked_attention import masked_attention

__all__ = ["blend_scatter", "halo_gather", "masked_attention"]
