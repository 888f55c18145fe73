"""supergen: training-free 2K/4K video from the diffusion models you already run.

Stage 1 sketches the video at the model's native size; stage 2 upscales it in pixel space,
re-noises it, and refines the full canvas tile by tile, each tile a native-size forward pass.

Importing this package imports neither diffusers nor triton: those load lazily where needed.
"""

from .config import TilingConfig
from .ops import blend_scatter, halo_gather, masked_attention
from .tiling import TileGrid

__version__ = "0.1.0"
__all__ = ["SuperGen", "TileGrid", "TilingConfig", "blend_scatter", "halo_gather", "masked_attention", "__version__"]


def __getattr__(name: str):
    # SuperGen drives diffusers pipelines; import it (and diffusers) only when it is asked for.
    if name == "SuperGen":
        from .pipeline import SuperGen

        return SuperGen
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
