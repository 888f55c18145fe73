"""Between the stages: upscale the sketch to the canvas and re-noise it to step N−k.

Upscaling happens in pixel space (decode → bicubic per frame → clamp → encode), as the method
prescribes: interpolating latents directly tears (the published port measured ringing 0.244 latent vs
0.130 pixel), so the latent path exists only for comparison.

Re-noising puts the upscaled clean latent ``x0`` on the trajectory of the SAME N-step schedule at
step ``N − k``, with seeded noise, so stage 2 simply continues that schedule:

* flow matching (Wan, HunyuanVideo, LTX): ``x = σ·ε + (1 − σ)·x0`` with ``σ = sigmas[N − k]``;
* DDPM-family (DDIM/DPM, epsilon or v-prediction, e.g. CogVideoX):
  ``x = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε`` with ``t = timesteps[N − k]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPSCALE_MODES = ("pixel", "latent")
SCHEDULER_FAMILIES = ("flow", "ddpm")


def resize_frames(video: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of every frame of a ``(B, C, T, H, W)`` video to ``size_hw`` (fp32 math)."""
    B, C, T, H, W = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W).float()
    frames = F.interpolate(frames, size=tuple(size_hw), mode="bicubic", align_corners=False)
    return frames.reshape(B, T, C, *size_hw).permute(0, 2, 1, 3, 4).to(video.dtype)


def upscale_latents(adapter, latents: torch.Tensor, canvas_hw: tuple[int, int], mode: str = "pixel",
                    encode=None) -> torch.Tensor:  # fmt: skip
    """Sketch latent ``(B, C, T, h, w)`` → clean canvas latent ``(B, C, T, H, W)`` (normalised).

    ``pixel``: decode with the VAE's tiling on, bicubic-resize each frame to the target pixels,
    clamp to the VAE's [-1, 1] range (bicubic overshoots at edges), encode with tiling on
    (``encode(pixels)``, default the adapter's posterior mode; tile parallelism shares it between ranks).
    ``latent``: bicubic on the latent itself (for comparison only; it tears).
    """
    if mode not in UPSCALE_MODES:
        raise ValueError(f"`upscale` must be one of {UPSCALE_MODES} but is {mode!r}.")
    if mode == "latent":
        return resize_frames(latents, canvas_hw)
    scale = adapter.spec.vae_scale[1]
    pixels = adapter.decode(latents)
    pixels = resize_frames(pixels, (canvas_hw[0] * scale, canvas_hw[1] * scale)).clamp_(-1.0, 1.0)
    return (encode(pixels) if encode is not None else adapter.encode(pixels, None)).to(latents.dtype)


def scheduler_family(scheduler) -> str:
    """``flow`` (sigmas interpolate data and noise linearly) or ``ddpm`` (ᾱ schedule), else ValueError."""
    config = scheduler.config
    if (
        "FlowMatch" in type(scheduler).__name__
        or config.get("use_flow_sigmas", False)
        or config.get("prediction_type", None) == "flow_prediction"
    ):
        return "flow"
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "ddpm"
    raise ValueError(
        f"cannot re-noise for scheduler {type(scheduler).__name__}: supported families are flow matching "
        "(FlowMatch*, or `use_flow_sigmas=True`) and DDPM-style schedulers with `alphas_cumprod`."
    )


def renoise(scheduler, x0: torch.Tensor, begin_index: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise the clean canvas ``x0`` to step ``begin_index`` of the scheduler's current schedule.

    Call after ``scheduler.set_timesteps(N)``; the noise is drawn from ``generator`` in fp32 on
    ``x0``'s device (so a seed gives the same canvas on every run), and the result is fp32.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not 0 <= begin_index < len(scheduler.timesteps):
        raise ValueError(f"`begin_index` must be in [0, {len(scheduler.timesteps)}) but is {begin_index}.")
    x0 = x0.float()
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    if scheduler_family(scheduler) == "flow":
        sigma = scheduler.sigmas[begin_index].to(x0.device, torch.float32)
        return sigma * noise + (1.0 - sigma) * x0
    t = int(scheduler.timesteps[begin_index])
    alpha_bar = scheduler.alphas_cumprod[t].to(x0.device, torch.float32)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def clean_estimate(scheduler, prediction: str, latents: torch.Tensor, model_output: torch.Tensor,
                   index: int) -> torch.Tensor:  # fmt: skip
    """The model's estimate of the clean latent at step ``index`` of the scheduler's current schedule,
    from the noisy ``latents`` and the guided ``model_output`` (``prediction``: what the model predicts,
    :attr:`supergen.adapters.base.ModelSpec.prediction`); fp32. The inverse of :func:`renoise` with the
    noise the model sees:

    * ``flow`` (velocity ``ε − x0``): ``x0 = x − σ·v``;
    * ``v``: ``x0 = sqrt(ᾱ_t)·x − sqrt(1 − ᾱ_t)·v``; ``epsilon``: ``x0 = (x − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)``.
    """
    x, out = latents.float(), model_output.float()
    if prediction == "flow":
        sigma = scheduler.sigmas[index].to(x.device, torch.float32)
        return x - sigma * out
    if prediction not in ("v", "epsilon"):
        raise ValueError(f"`prediction` must be 'flow', 'v' or 'epsilon' but is {prediction!r}.")
    alpha_bar = scheduler.alphas_cumprod[int(scheduler.timesteps[index])].to(x.device, torch.float32)
    if prediction == "v":
        return alpha_bar.sqrt() * x - (1.0 - alpha_bar).sqrt() * out
    return (x - (1.0 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()
