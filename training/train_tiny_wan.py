"""Train supergen's embedded model, a tiny Wan 2.1, on the synthetic shapes domain (``supergen.synthetic``).

    python training/train_tiny_wan.py --seed 0 --minutes 58 --threads 2 --out supergen/models/tiny-wan
    # or in two sessions: --vae-only --out VAE_DIR, then --vae-from VAE_DIR --out MODEL_DIR

The result is a diffusers-format folder (``WanPipeline.from_pretrained(out, local_files_only=True)``):
the same classes and code path as a real Wan 2.1 checkpoint, only small.

* ``tokenizer/``: a word-level ``PreTrainedTokenizerFast`` over ``supergen.synthetic.VOCABULARY``,
  built in code (nothing to download);
* ``text_encoder/``: a random, frozen ``UMT5EncoderModel`` from a seeded config. Wan's T5 is frozen too;
  a random transformer over a 19-word vocabulary still gives every caption distinct features, and the
  Wan transformer learns to read them through its own text projection and cross-attention;
* ``vae/``: a small ``AutoencoderKLWan`` (4x spatial, 4x temporal, 4 channels; ``--vae-spatial 8
  --latent-channels 16`` gives Wan 2.1's geometry) trained first;
  its config's ``latents_mean``/``latents_std`` are measured on encoded training clips, so the
  pipeline's normalisation makes the latents zero-mean, unit-variance per channel;
* ``transformer/``: a 4-layer ``WanTransformer3DModel`` (patch 1x4x4 on the 4x VAE, so a token covers
  16x16 pixels as in Wan 2.1) trained with flow matching on the VAE latents
  (saved as an exponential moving average of the weights);
* ``scheduler/``: ``UniPCMultistepScheduler`` with flow sigmas and shift 3, Wan 2.1's sampler at 480p;
* ``supergen.json``: native size, frames, text length and sampling defaults; ``training_log.json``:
  the seed, the exact step counts (to replay the run with ``--vae-steps``/``--dit-steps``), timings and
  the loss curves.

Time budget: ``--minutes`` is split between the VAE (``--vae-fraction``), encoding the transformer's
data set, and the transformer. Each phase times its steps 2-20, then fixes its step count so that it
ends within its share (it stops at 1.1x its share if the machine gets slower); the learning-rate
schedule is laid over that count. Given the same step counts, device, torch version and thread count,
the run is reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from supergen import synthetic

# -- the model ---------------------------------------------------------------------------------------

#: Text length the pipeline pads prompts to (``WanPipeline.__call__``'s ``max_sequence_length``).
TEXT_LEN = 512
TEXT_DIM = 64
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad and end-of-sequence conventions
FLOW_SHIFT = 3.0
GUIDANCE_SCALE = 5.0
NUM_INFERENCE_STEPS = 20
# supergen's stage 2 refines the last 20 % of the steps for this model (re-noise to sigma ~0.43, 4 of
# 20 steps): measured on 20 held-out cases at 2x (bench/quality.py's cases), the object count of the
# output matched the sketch's in 70/80/85/75 % of the cases at k = 3/4/5/7, and k = 4 kept the seam
# score at 1.04 (k = 5 ends on the grid it started with and scored 1.27). At the method's default of
# 70 % (sigma ~0.9) every 64x64 tile redraws the prompted objects, which this small model then
# repeats across the canvas.
REFINE_FRACTION = 0.2
# ... and without classifier-free guidance in stage 2: the sketch already holds the prompt's layout, and
# at 5 every tile is pushed towards the whole prompt on its own, which turns faint patches of the sketch
# into extra objects. Measured with bench/quality.py's cases (seeds 0-19, then 20-59 held out to
# confirm): object count = sketch's at 3x in 18/20 and 38/40 cases at guidance 1 against 16/20 and
# 35/40 at 5 (2x: 18/20 and 38/40 against 18/20 and 39/40), seam score unchanged within its error,
# and half the refinement's forwards. The sketch keeps GUIDANCE_SCALE.
REFINE_GUIDANCE_SCALE = 1.0
# Seed offsets: separate, non-overlapping streams of clip seeds for each use (for --seed < 60; the
# evaluation uses 90_000_000 and up).
VAE_DATA, DIT_DATA, CHECK_DATA = 10_000_000, 20_000_000, 30_000_000


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary; appends ``</s>`` as T5 does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *synthetic.VOCABULARY))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=TEXT_LEN
    )


def _seeded(seed: int, make):
    """Build a module under a fixed global seed (diffusers/transformers initialise from it), then restore."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return make()
    finally:
        torch.random.set_rng_state(state)


def build_text_encoder(seed: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: UMT5EncoderModel(config)).eval().requires_grad_(False)


#: Pixels per transformer token along each spatial axis: VAE stride x patch (Wan 2.1: 8 x 2).
TOKEN_PIXELS = 16


def build_vae(seed: int, spatial: int = 4, channels: int = 4):
    """``spatial`` 8: three 2x downsamples, like Wan 2.1 (which has 16 ``channels``). ``spatial`` 4 (the
    default) with 4 channels: two downsamples and the same latent values per token under a (1, 4, 4)
    patch as Wan's 16 channels under (1, 2, 2): at 8x the
    decoder has to invent a shape's corners inside one 8-pixel cell and rounds squares and triangles
    into discs (the detector found the prompted class in 25 % of 8x reconstructions). Both are 4x in
    time. Normalisation statistics are placeholders until measured on encoded data."""
    from diffusers import AutoencoderKLWan

    stages = {4: ([1, 2, 3], [True, True]), 8: ([1, 2, 3, 3], [False, True, True])}
    if spatial not in stages:
        raise ValueError(f"--vae-spatial must be one of {sorted(stages)} but is {spatial}.")
    dim_mult, temporal = stages[spatial]
    return _seeded(
        seed,
        lambda: AutoencoderKLWan(
            base_dim=16,
            z_dim=channels,
            dim_mult=dim_mult,
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=temporal,
            dropout=0.0,
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
            scale_factor_spatial=spatial,
        ),
    )


def build_transformer(seed: int, spatial: int = 4, channels: int = 4):
    from diffusers import WanTransformer3DModel

    patch = TOKEN_PIXELS // spatial
    return _seeded(
        seed,
        lambda: WanTransformer3DModel(
            patch_size=(1, patch, patch),
            num_attention_heads=4,
            attention_head_dim=48,  # 192 wide; rotary split t/h/w = 16/16/16
            in_channels=channels,
            out_channels=channels,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=768,
            num_layers=4,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,  # Wan's value: canvas positions of a 4K tiled canvas still fit
        ),
    )


def build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT)


def build_pipeline(seed: int, spatial: int = 4, channels: int = 4):
    """The untrained pipeline (every part seeded): what training starts from."""
    from diffusers import WanPipeline

    tokenizer = build_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(seed + 1, len(tokenizer)),
        vae=build_vae(seed + 2, spatial, channels),
        transformer=build_transformer(seed + 3, spatial, channels),
        scheduler=build_scheduler(),
    )


def save_pipeline(pipe, out: Path, extra: dict[str, dict]) -> None:
    """Write the folder atomically: a temporary sibling, then one rename, so a reader (or a killed run)
    never sees half a model."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, payload in extra.items():
            (tmp / name).write_text(json.dumps(payload, indent=1) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- text --------------------------------------------------------------------------------------------


class TextBank:
    """Caption -> unpadded text-encoder features, computed once (the encoder is frozen).

    The pipeline pads every prompt's features with zero rows to ``TEXT_LEN``; padded rows all become the
    same key and value in cross-attention, so attending over ``n`` of them equals attending over one or
    more of them with ``log(n / count)`` added to their logits. Training builds each batch that way
    (``batch``), which is exact and skips ~500 identical rows per sample.
    """

    def __init__(self, tokenizer, text_encoder, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, captions: list[str], chunk: int = 256) -> None:
        todo = sorted({c for c in captions if c not in self.cache})
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            # Same call as WanPipeline._get_t5_prompt_embeds, padded to the longest instead of TEXT_LEN:
            # with the attention mask, real tokens' features do not depend on the padding length.
            enc = self.tokenizer(part, padding="longest", truncation=True, max_length=TEXT_LEN, return_tensors="pt")
            mask = enc.attention_mask
            hidden = self.text_encoder(enc.input_ids, mask).last_hidden_state
            for caption, h, m in zip(part, hidden, mask):
                self.cache[caption] = h[: int(m.sum())].float().clone()

    def batch(self, captions: list[str], generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, TEXT_DIM) features with at least one zero row each, and the (B, 1, 1, L) logit bias.

        Each prompt stands for ``TEXT_LEN`` padded rows (the pipeline's default) in half of the samples;
        with a ``generator``, the other half stand for a log-uniform number of padding rows instead, so
        the model also works when a caller passes a shorter ``max_sequence_length``.
        """
        self.add(captions)
        rows = [self.cache[c] for c in captions]
        length = max(len(r) for r in rows) + 1
        feats = torch.zeros(len(rows), length, TEXT_DIM)
        bias = torch.zeros(len(rows), 1, 1, length)
        for i, r in enumerate(rows):
            feats[i, : len(r)] = r
            n_pad = TEXT_LEN - len(r)
            if generator is not None and torch.rand((), generator=generator) < 0.5:
                n_pad = max(1, round(math.exp(torch.rand((), generator=generator).item() * math.log(n_pad))))
            bias[i, ..., len(r) :] = math.log(n_pad / (length - len(r)))
        return feats.to(self.device), bias.to(self.device)


class PaddedCrossAttnProcessor:
    """Training-only cross-attention of Wan (text, no image) with a per-key logit bias (``TextBank``).

    Mirrors ``WanAttnProcessor`` for the text-only case; used while training, never saved (inference
    uses the stock processor on the fully padded prompt, which computes the same function).
    """

    bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        bias = None if self.bias is None else self.bias.to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# -- helpers -----------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class StepBudget:
    """Fixes a phase's step count: ``steps`` if given, else as many as fit in ``seconds`` (timed over
    steps ``warmup`` to ``probe``, after allocation and first-call costs), at most ``max_steps``.

    A time-fitted phase also stops when ``slack`` times its seconds have passed, e.g. if the machine
    gets busier after the probe. The learning-rate schedule is laid over the planned count, so the log
    reports both: a replay passes the planned count and ``stop``, the steps actually run.
    """

    def __init__(self, seconds: float, steps: int | None, max_steps: int | None, probe: int = 20, warmup: int = 2,
                 stop: int | None = None):  # fmt: skip
        self.seconds, self.total, self.max_steps, self.stop = seconds, steps, max_steps, stop
        self.probe, self.warmup = probe, warmup
        self.fitted = steps is None
        self.started = time.perf_counter()
        self.probe_started = None
        if self.total is None and max_steps is not None and max_steps <= probe:
            self.total, self.fitted = max_steps, False

    def shown(self) -> str:
        return "?" if self.total is None else str(self.total)

    def planned(self, step: int) -> int:
        """The total (provisional until the probe steps are done; then fixed)."""
        if self.total is None and step == self.warmup:
            self.probe_started = time.perf_counter()
        if self.total is None and step == self.probe:
            per_step = (time.perf_counter() - self.probe_started) / (self.probe - self.warmup)
            left = self.seconds - (time.perf_counter() - self.started)
            self.total = max(self.probe + 1, self.probe + int(left / per_step))
            if self.max_steps is not None:
                self.total = min(self.total, self.max_steps)
        return self.total if self.total is not None else 10**9

    def running(self, step: int, slack: float = 1.1) -> bool:
        if self.stop is not None and step >= self.stop:
            return False
        if self.fitted and time.perf_counter() - self.started > slack * self.seconds:
            log(f"time budget spent: stopping at step {step} of {self.shown()}")
            return False
        return step < self.planned(step)


def clip_batch(seeds, device) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    return _to_device(synthetic.sample_batch(seeds), device)


def _to_device(batch, device) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    videos, captions, cover = batch
    return torch.from_numpy(videos).to(device), captions, torch.from_numpy(cover).to(device)


def clip_batches(seed_lists, workers: int, device):
    """:func:`clip_batch` of each list of seeds, in order. With ``workers > 0`` the clips are drawn by that
    many processes, at most ``2 * workers`` batches ahead: on a GPU the small models train faster than
    one core draws clips. The clips depend only on their seeds, so the batches are the same either way."""
    if workers <= 0:
        for seeds in seed_lists:
            yield clip_batch(seeds, device)
        return
    import collections
    import multiprocessing

    seed_lists = iter(seed_lists)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque()
        for seeds in itertools.islice(seed_lists, 2 * workers):
            pending.append(pool.apply_async(synthetic.sample_batch, (list(seeds),)))
        while pending:
            batch = pending.popleft().get()
            seeds = next(seed_lists, None)
            if seeds is not None:
                pending.append(pool.apply_async(synthetic.sample_batch, (list(seeds),)))
            yield _to_device(batch, device)


# -- phase 1: VAE ------------------------------------------------------------------------------------


def train_vae(vae, args, seconds: float, device, history: dict, fresh: bool = True) -> int:
    """Reconstruction (L1 + MSE, object pixels weighted up) plus a small KL, on fresh clips every step.

    Shapes cover ~5 % of the pixels; without the weight the VAE spends its short budget on backgrounds
    and blurs the shapes, which are what the detector (and a viewer) looks at. Training runs on random
    ``--vae-crop`` crops (the VAE is convolutional; its one attention block sees the whole, small,
    bottleneck), a quarter of the cost of full frames. Keep all 9 frames: the decoder's temporal
    upsampler takes a different path for each of the first three latent frames (none, zero-padded,
    cached), and a 5-frame clip never trains the third.
    """
    # Start nearly deterministic (posterior std ~0.05 instead of ~1): the encoder's first means are
    # ~0.2 in scale, so unit posterior noise would drown them and the decoder would learn only the
    # mean colour. The small KL term lets the variance grow where it costs no reconstruction.
    if fresh:  # not when continuing a saved VAE (`--vae-init`): its log-variance is learned
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.z_dim :] = -6.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=1e-4)
    budget = StepBudget(seconds, args.vae_steps, args.max_steps, stop=args.vae_stop)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 11)
    first = args.seed * 1_000_003 + VAE_DATA
    seed_lists = (range(first + i * args.vae_batch, first + (i + 1) * args.vae_batch) for i in itertools.count())
    # closing: stops the workers drawing ahead when the loop ends, also when a step fails.
    with contextlib.closing(clip_batches(seed_lists, args.data_workers, device)) as batches:
        step = 0
        while budget.running(step):
            x, _, cover = next(batches)
            top, left = (int(v) for v in torch.randint(0, synthetic.SIZE - args.vae_crop + 1, (2,), generator=gen))
            window = (slice(None), slice(None), slice(0, args.vae_frames), slice(top, top + args.vae_crop))
            x = x[window][..., left : left + args.vae_crop]
            cover = cover[window][..., left : left + args.vae_crop]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, budget.planned(step), args.vae_lr, warmup=20)
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
            z = posterior.mean + posterior.std * eps
            recon = vae.decode(z).sample
            weight = 1.0 + 4.0 * cover
            l1 = (weight * (recon - x).abs()).mean()
            l2 = (weight * (recon - x).square()).mean()
            kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
            loss = l1 + l2 + args.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % args.log_every == 0 or step + 1 == budget.planned(step):
                record = {"step": step, "l1": round(l1.item(), 5), "mse": round(l2.item(), 5),
                          "kl": round(kl.item(), 4)}  # fmt: skip
                history.setdefault("vae", []).append(record)
                log(f"vae {step + 1}/{budget.shown()} {record} lr {opt.param_groups[0]['lr']:.2e}")
            step += 1
    vae.eval()
    return step, budget.total or step


@torch.no_grad()
def check_vae(vae, seeds, device) -> dict:
    """PSNR of reconstructions of held-out clips, and how often the detector finds the clip's objects."""
    psnr, agree = [], 0
    for seed in seeds:
        clip = synthetic.sample_clip(seed)
        x = torch.from_numpy(clip.video)[None].to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].cpu().numpy()
        mse = float(((recon - clip.video) ** 2).mean())
        psnr.append(10 * math.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]
        found = synthetic.detect_objects(synthetic.to_unit_frames(recon))
        got = sorted((t.colour, t.shape) for t in found.tracks if t.present >= 5)
        agree += got == sorted((o.colour, o.shape) for o in clip.objects)
    return {"clips": len(seeds), "psnr_db": round(sum(psnr) / len(psnr), 2), "detector_agrees": agree / len(seeds)}


@torch.no_grad()
def encode_clips(vae, seeds, device, batch: int = 16, workers: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Posterior modes (B, 16, 3, 8, 8), unnormalised: what the adapter's ``encode`` uses too."""
    latents, captions = [], []
    chunks = (seeds[i : i + batch] for i in range(0, len(seeds), batch))
    with contextlib.closing(clip_batches(chunks, workers, device)) as batches:
        for x, caps, _ in batches:
            latents.append(vae.encode(x).latent_dist.mode().float().cpu())
            captions += caps
    return torch.cat(latents), captions


# -- phase 2: transformer ----------------------------------------------------------------------------


def train_transformer(transformer, latents, captions, bank, args, seconds: float, device, history: dict):
    """Flow matching in diffusers' convention: ``x_t = (1 - s) x0 + s noise`` and the model predicts the
    velocity ``noise - x0`` (the Euler step ``x + (s_next - s) v`` of ``FlowMatchEulerDiscreteScheduler``
    and UniPC's ``flow_prediction`` both read the output that way); the timestep input is ``1000 s``.

    ``s`` is drawn as the inference schedule spaces it: ``u`` uniform, shifted by ``FLOW_SHIFT`` like
    the scheduler's flow sigmas. Captions are dropped to the empty prompt with probability
    ``--cfg-dropout`` so that classifier-free guidance has an unconditional model to contrast with.
    Returns the EMA copy of the weights (what is saved).
    """
    processor = PaddedCrossAttnProcessor()
    stock = transformer.attn_processors
    transformer.set_attn_processor({name: processor if ".attn2." in name else p for name, p in stock.items()})
    transformer.train()
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    budget = StepBudget(seconds, args.dit_steps, args.max_steps, stop=args.dit_stop)
    gen = torch.Generator().manual_seed(args.seed + 22)
    n = latents.shape[0]
    bank.add(captions + [""])
    step = 0
    recent = []
    while budget.running(step):
        idx = torch.randint(n, (args.dit_batch,), generator=gen)
        x0 = latents[idx].to(device)
        caps = [captions[i] for i in idx.tolist()]
        drop = torch.rand(args.dit_batch, generator=gen) < args.cfg_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        text, processor.bias = bank.batch(caps, gen)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        u = torch.rand(args.dit_batch, generator=gen)
        sigma = (FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, budget.planned(step), args.dit_lr, warmup=100)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (noise - x0).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short warm-up so early steps are not frozen in
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
        recent.append(loss.item())
        if step % args.log_every == 0 or step + 1 == budget.planned(step):
            record = {"step": step, "loss": round(sum(recent) / len(recent), 5)}
            recent = []
            history.setdefault("transformer", []).append(record)
            log(f"dit {step + 1}/{budget.shown()} {record} lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
    processor.bias = None
    transformer.set_attn_processor(stock)
    transformer.load_state_dict(ema)
    transformer.eval()
    return step, budget.total or step


# -- main --------------------------------------------------------------------------------------------


def check_vae_geometry(vae, args) -> None:
    """A saved VAE (``--vae-from``/``--vae-init``) must have the stride and channels the transformer is
    built for."""
    got = (vae.config.scale_factor_spatial, vae.config.z_dim)
    if got != (args.vae_spatial, args.latent_channels):
        raise SystemExit(f"the VAE has stride {got[0]} and {got[1]} channels but --vae-spatial {args.vae_spatial} "
                         f"--latent-channels {args.latent_channels} were given; pass its values.")  # fmt: skip


def previous_vae_log(folder: Path) -> dict:
    """The log of a saved VAE: ``vae_log.json`` of a ``--vae-only`` folder, or, for the ``vae/`` folder
    of a full model (e.g. ``supergen/models/tiny-wan/vae``), the VAE part of its ``training_log.json``."""
    folder = Path(folder)
    if (folder / "vae_log.json").is_file():
        return json.loads((folder / "vae_log.json").read_text())
    full = folder.parent / "training_log.json"
    if full.is_file():
        log = json.loads(full.read_text())
        runs = log["loss"].get("vae_runs") or [{"vae_steps": log["vae_steps"], "seed": log["seed"]}]
        return {"seed": log["seed"], "vae_steps": log["vae_steps"], "runs": runs, "loss": log["loss"]}
    raise FileNotFoundError(f"{folder}: no vae_log.json, and no training_log.json in {folder.parent}")


def _steps(phase: str, run: int, planned: int | None) -> str:
    """``--vae-steps N`` for a phase that ran its plan; ``--vae-steps PLANNED --vae-stop RUN`` for one the
    time limit cut short (its learning-rate schedule was laid over the planned count)."""
    if planned is None or planned == run:
        return f"--{phase}-steps {run}"
    return f"--{phase}-steps {planned} --{phase}-stop {run}"


def replay_commands(vae_runs: list[dict], seed: int, dit_steps: int, threads: int, dit_planned: int | None = None):
    """The commands that rebuild these weights bit for bit (same device, torch version and threads):
    one per VAE run (``--vae-init`` continues the previous one), then the transformer."""
    dit = _steps("dit", dit_steps, dit_planned)
    if len(vae_runs) == 1:
        run = vae_runs[0]
        vae = _steps("vae", run["vae_steps"], run.get("vae_planned"))
        return [f"--seed {seed} {vae} {dit} --threads {threads} --out MODEL"]
    out = []
    for i, run in enumerate(vae_runs):
        init = f" --vae-init VAE_{i}" if i else ""
        lr = f" --vae-lr {run['lr']}" if "lr" in run else ""
        t = f" --threads {run.get('threads', 1)}"
        vae = _steps("vae", run["vae_steps"], run.get("vae_planned"))
        out.append(f"--seed {run['seed']} --vae-only{init}{lr} {vae}{t} --out VAE_{i + 1}")
    out.append(f"--seed {seed} --vae-from VAE_{len(vae_runs)} {dit} --threads {threads} --out MODEL")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=50.0, help="total wall-clock budget of the training phases")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, default=None, help="cap on each phase's steps (smoke tests)")
    p.add_argument("--vae-steps", type=int, default=None, help="exact VAE steps (replays a logged run)")
    p.add_argument("--dit-steps", type=int, default=None, help="exact transformer steps (replays a logged run)")
    p.add_argument(
        "--vae-stop",
        type=int,
        default=None,
        help="stop the VAE after this many of its --vae-steps (replays a run the time limit cut short)",
    )
    p.add_argument("--dit-stop", type=int, default=None,
                   help="stop the transformer after this many of its --dit-steps (as --vae-stop)")  # fmt: skip
    p.add_argument("--vae-only", action="store_true", help="train and save only the VAE (phase 1) into --out")
    p.add_argument("--vae-from", type=Path, default=None, help="a --vae-only folder: skip phase 1")
    p.add_argument(
        "--vae-init",
        type=Path,
        default=None,
        help="a --vae-only folder to continue training (a fresh warm-up/cosine schedule over this run's steps)",
    )
    p.add_argument("--vae-spatial", type=int, default=4, choices=(4, 8), help="VAE stride (pixels per cell)")
    p.add_argument("--latent-channels", type=int, default=4, help="VAE latent channels")
    p.add_argument("--vae-fraction", type=float, default=0.4, help="share of the budget for the VAE")
    p.add_argument("--dit-clips", type=int, default=4000, help="clips encoded for the transformer")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-crop", type=int, default=32, help="square crop (pixels) the VAE trains on")
    p.add_argument("--vae-frames", type=int, default=9, help="frames (4k+1) the VAE trains on")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=5e-4)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--dit-lr", type=float, default=6e-4)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes drawing clips ahead (0: the trainer draws them; a GPU wants ~8)")  # fmt: skip
    args = p.parse_args(argv)
    if args.data_workers < 0:
        p.error(f"--data-workers must be >= 0 but is {args.data_workers}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # Replays should give the same weights: deterministic kernels where CUDA has them (cuBLAS needs
        # its workspace fixed before the first call); ops without one warn instead of failing.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    budget = args.minutes * 60.0
    history: dict[str, list] = {}
    log(f"device {device}, threads {torch.get_num_threads()}, seed {args.seed}, budget {args.minutes} min")

    pipe = build_pipeline(args.seed, args.vae_spatial, args.latent_channels)
    vae, transformer = pipe.vae.to(device), pipe.transformer.to(device)
    pipe.text_encoder.to(device)

    # Phase 1: the VAE (or a VAE trained before, by a `--vae-only` run).
    t0 = time.perf_counter()
    if args.vae_from is not None:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(args.vae_from, local_files_only=True).to(device).eval()
        check_vae_geometry(vae, args)
        pipe.vae = vae
        previous = previous_vae_log(args.vae_from)
        vae_steps, history["vae"] = previous["vae_steps"], previous["loss"]["vae"]
        history["vae_runs"] = previous.get("runs") or [{"vae_steps": vae_steps, "seed": previous["seed"]}]
        log(f"VAE from {args.vae_from} ({vae_steps} steps)")
    else:
        before = []
        if args.vae_init is not None:  # continue a saved VAE; its runs are logged ahead of this one
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(args.vae_init, local_files_only=True).to(device)
            check_vae_geometry(vae, args)
            pipe.vae = vae
            previous = previous_vae_log(args.vae_init)
            before = previous.get("runs", [{"vae_steps": previous["vae_steps"], "seed": previous["seed"]}])
            history["vae_before"] = previous["loss"].get("vae", [])
            log(f"continuing the VAE of {args.vae_init} ({sum(r['vae_steps'] for r in before)} steps)")
        share = (1.0 if args.vae_only else args.vae_fraction) * budget
        steps, planned = train_vae(vae, args, share, device, history, fresh=args.vae_init is None)
        run = {"vae_steps": steps, "seed": args.seed, "lr": args.vae_lr, "threads": torch.get_num_threads()}
        if planned != steps:  # the time limit cut the schedule short: a replay needs both counts
            run["vae_planned"] = planned
        history["vae_runs"] = [*before, run]
        vae_steps = sum(r["vae_steps"] for r in history["vae_runs"])
    vae_seconds = time.perf_counter() - t0
    base = args.seed * 1_000_003
    history["vae_check"] = check_vae(vae, list(range(base + CHECK_DATA, base + CHECK_DATA + 8)), device)
    log(f"vae on held-out clips: {history['vae_check']}")
    if args.vae_only:  # phase 1 alone: the VAE and its log, for a later `--vae-from`
        out = Path(args.out).resolve()
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
        log_ = {"seed": args.seed, "vae_steps": vae_steps, "runs": history.get("vae_runs", []),
                "seconds": round(vae_seconds), "loss": history}  # fmt: skip
        (tmp / "vae_log.json").write_text(json.dumps(log_, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log(f"saved the VAE to {out} after {vae_steps} steps")
        return 0

    # The transformer's data set: a fixed pool of encoded clips (encoding on every step would cost more
    # than the transformer step itself). Its per-channel statistics go into the VAE config, so that the
    # pipeline's (z - latents_mean) / latents_std is zero-mean and unit-variance.
    t0 = time.perf_counter()
    n_clips = args.dit_clips if args.max_steps is None else min(args.dit_clips, 16)
    seeds = list(range(base + DIT_DATA, base + DIT_DATA + n_clips))
    latents, captions = encode_clips(vae, seeds, device, workers=args.data_workers)
    mean = latents.transpose(0, 1).flatten(1).mean(1)
    std = latents.transpose(0, 1).flatten(1).std(1).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()])
    vae.register_to_config(latents_std=[round(v, 5) for v in std.tolist()])
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    encode_seconds = time.perf_counter() - t0
    log(f"encoded {n_clips} clips in {encode_seconds:.0f}s; latent std {[round(v, 3) for v in std.tolist()]}")

    # Phase 2: the transformer, with what is left of the budget.
    bank = TextBank(pipe.tokenizer, pipe.text_encoder, device)
    remaining = max(30.0, budget - (time.perf_counter() - started))
    t0 = time.perf_counter()
    dit_steps, dit_planned = train_transformer(transformer, latents, captions, bank, args, remaining, device, history)
    dit_seconds = time.perf_counter() - t0

    pipe.to("cpu")
    info = {
        "native_size": [synthetic.SIZE, synthetic.SIZE],
        "num_frames": synthetic.FRAMES,
        "max_sequence_length": TEXT_LEN,
        "guidance_scale": GUIDANCE_SCALE,
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "refine_fraction": REFINE_FRACTION,
        "refine_guidance_scale": REFINE_GUIDANCE_SCALE,
        "vocabulary": list(synthetic.VOCABULARY),
        "domain": "supergen.synthetic: coloured circles, bars and pillars moving over grey gradients",
    }
    training = {
        "command": " ".join(["python", "training/train_tiny_wan.py", *(argv if argv is not None else sys.argv[1:])]),
        "replay": replay_commands(history["vae_runs"], args.seed, dit_steps, torch.get_num_threads(), dit_planned),
        "seed": args.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vae_steps": vae_steps,
        "dit_steps": dit_steps,
        "dit_planned": dit_planned,
        "seconds": {
            "vae": round(vae_seconds),
            "encode": round(encode_seconds),
            "transformer": round(dit_seconds),
            "total": round(time.perf_counter() - started),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loss": history,
    }
    save_pipeline(pipe, args.out, {"supergen.json": info, "training_log.json": training})
    log(f"saved {args.out} after {training['seconds']['total']}s ({vae_steps} VAE, {dit_steps} transformer steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
