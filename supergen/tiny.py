"""The embedded models: the trained tiny Wan (``--model tiny``) and a random one (``--model tiny-random``).

* ``tiny``: ``supergen/models/tiny-wan/``, a small Wan 2.1 trained on supergen's synthetic shapes
  domain (``training/README.md`` is its model card). It is a plain diffusers folder; its sidecar
  ``supergen.json`` gives what a Wan config does not say: the native size, frames, steps, guidance.
* ``tiny-random``: a Wan 2.1-architecture pipeline built in code with random weights from a fixed
  seed. It needs no files and runs anywhere in seconds; its videos are noise-like textures, not
  pictures. Tests use it, and ``tiny`` falls back to it when the trained folder is absent. Text is
  "encoded" by hashing each word into a fixed random table (no tokenizer to download): the same
  prompt always gives the same embeddings, different prompts different ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

#: The trained embedded model (a diffusers folder) and its sidecar of sampling defaults.
TRAINED_DIR = Path(__file__).resolve().parent / "models" / "tiny-wan"
SIDECAR = "supergen.json"

#: Native (stage-1) size in pixels: 8x8 latent cells, 4x4 tokens per frame.
NATIVE_SIZE = (64, 64)
SEED = 0
TEXT_DIM = 32
TEXT_TOKENS = 16
VOCAB = 4096


def _word_table() -> torch.Tensor:
    return torch.randn(VOCAB, TEXT_DIM, generator=torch.Generator().manual_seed(SEED + 1))


def _token_ids(prompt: str) -> list[int]:
    words = prompt.lower().split()[:TEXT_TOKENS]
    return [int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % VOCAB for word in words]


def tiny_wan_components(seed: int = SEED, dtype: torch.dtype = torch.float32, image_to_video: bool = False) -> dict:
    """Transformer, VAE and scheduler of the tiny Wan (deterministic for a given ``seed``).

    The image-to-video transformer takes 16 noisy + 4 mask + 16 first-frame channels and, like Wan 2.2
    I2V, no CLIP image embeddings (``image_dim=None``).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # diffusers initialises weights from the global RNG; restored below
    try:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=36 if image_to_video else 16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    finally:
        torch.random.set_rng_state(state)
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    # Wan 2.1's own scheduler (multistep, flow sigmas): stage 2 must leave its history untouched.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "scheduler": scheduler}


class HashedPromptMixin:
    """Replaces Wan's T5 prompt encoder with a hashed word table (no tokenizer or download needed)."""

    native_size = NATIVE_SIZE  # read by supergen.SuperGen: the sketch size and default tile
    word_table = None

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt=1, max_sequence_length=226, device=None,
                              dtype=None):  # fmt: skip
        if HashedPromptMixin.word_table is None:
            HashedPromptMixin.word_table = _word_table()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = []
        for text in prompts:
            embeds = torch.zeros(TEXT_TOKENS, TEXT_DIM)  # zero padding, as Wan pads T5 outputs
            ids = _token_ids(text)
            if ids:
                embeds[: len(ids)] = HashedPromptMixin.word_table[ids]
            rows.append(embeds)
        embeds = torch.stack(rows).to(device=device or self._execution_device, dtype=dtype or self.transformer.dtype)
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0)


def tiny_wan_pipeline(seed: int = SEED, dtype: torch.dtype = torch.float32, image_to_video: bool = False,
                      boundary_ratio: float | None = None):  # fmt: skip
    """The tiny Wan: a ``WanPipeline`` (or ``WanImageToVideoPipeline``) with hashed-word prompts.

    ``boundary_ratio``: a Wan 2.2 two-expert pipeline instead: a second transformer (``transformer_2``,
    drawn from ``seed + 1``) denoises the timesteps below ``boundary_ratio * num_train_timesteps``."""
    if image_to_video:  # imported only when needed: it pulls in transformers' CLIP processors
        from diffusers import WanImageToVideoPipeline as base
    else:
        from diffusers import WanPipeline as base

    cls = type(f"Tiny{base.__name__}", (HashedPromptMixin, base), {"__doc__": HashedPromptMixin.__doc__})
    components = tiny_wan_components(seed, dtype, image_to_video)
    if boundary_ratio is not None:
        components["transformer_2"] = tiny_wan_components(seed + 1, dtype, image_to_video)["transformer"]
        components["boundary_ratio"] = boundary_ratio
    pipe = cls(tokenizer=None, text_encoder=None, **components)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def trained_model_dir() -> Path | None:
    """The trained tiny Wan's folder, or ``None`` if this installation does not have it."""
    return TRAINED_DIR if (TRAINED_DIR / "model_index.json").is_file() else None


def read_sidecar(folder: str | Path) -> dict:
    """``supergen.json`` of a model folder (native size, frames, steps, guidance), ``{}`` if it has none."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    if "native_size" in info:
        info["native_size"] = tuple(int(v) for v in info["native_size"])
    return info


def load_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """A local diffusers folder, offline, its components in ``dtype`` but the VAE, which stays fp32 (as
    diffusers' Wan examples load it: the decode at the canvas size is where precision shows); a
    ``supergen.json`` sidecar's native size is attached as ``pipe.native_size`` (read by
    :class:`supergen.SuperGen`) and the sidecar as ``pipe.supergen_info``."""
    from diffusers import DiffusionPipeline

    dtypes = {"default": dtype, "vae": torch.float32}
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtypes, **kwargs)
    info = read_sidecar(folder)
    if "native_size" in info:
        pipe.native_size = info["native_size"]
    pipe.supergen_info = info
    pipe.set_progress_bar_config(leave=False)
    return pipe


def load_model(folder: str | Path | None, dtype: torch.dtype = torch.float32, image_to_video: bool = False,
               allow_pickle: bool = False):  # fmt: skip
    """A ``--model`` as ``supergen.cli.resolve_model`` resolves it: the random tiny Wan when ``folder`` is
    ``None``, else the local folder, offline and safetensors only unless ``allow_pickle``."""
    if folder is None:
        return tiny_wan_pipeline(dtype=dtype, image_to_video=image_to_video)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_pretrained(folder, dtype=dtype, use_safetensors=None if allow_pickle else True)
