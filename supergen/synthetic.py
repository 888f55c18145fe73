"""The synthetic video domain of the embedded model: procedural clips, their captions, and a detector.

Clips are coloured shapes (a circle, a lying bar, a standing pillar) moving in straight lines and
bouncing off the frame edges over a low-saturation gradient, optionally with a light texture.
Everything is drawn from one integer seed, so a clip, its caption and its metadata are reproducible
anywhere.

The domain is built so that a rule-based detector can read it back: shape colours are saturated and
far apart in RGB, backgrounds are nearly grey (their chroma stays below the detector's threshold),
objects in one clip have distinct colours and never touch, and shape classes differ in their elongation
(circle 1, bar 2.5 wide, pillar 2.5 tall), which survives the blur of a small model and its 4x VAE:
classes told apart by corners (square against circle, triangle) did not (see the model card). The
detector is what the quality measures use on generated videos: is the prompted shape visible, how
many objects are there.

This module needs only numpy (scipy's labelling is used when installed); it must not import diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Native clip size of the embedded model: 64x64 pixels (8x8 latent cells) and 4k+1 = 9 frames,
#: because the Wan VAE keeps the first frame and compresses each following 4 frames into one.
SIZE = 64
FRAMES = 9

#: Reference RGB in [0, 1]. Pairwise distances are >= 0.6, and all have chroma (max - min) >= 0.65.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "bar", "pillar")
DIRECTIONS = ("left", "right", "up", "down")
TONES = ("dark", "light")
BACKGROUNDS = ("gradient", "texture")

#: The whole caption vocabulary; the model's tokenizer is a word-level tokenizer over exactly these.
VOCABULARY: tuple[str, ...] = ("a", "and", "on", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *TONES, *BACKGROUNDS)

# Object size s in pixels at 64 px: a circle's radius; a bar is 2*_LONG*s wide and 2*_SHORT*s tall, a
# pillar the same standing up (areas 3.1 s^2 and 3.6 s^2). Speed along the main axis in pixels per
# frame: the object crosses 12-27 px in a clip, clearly visible motion that still leaves it in frame
# (it bounces at the edges).
_HALF_SIZE = (7.0, 11.0)
_LONG, _SHORT = 1.5, 0.6
_SPEED = (1.5, 3.0)
_CROSS_SPEED = 0.35  # at most this fraction of the main speed on the other axis
_BACKGROUND_CHROMA = 0.06  # tint amplitude: keeps backgrounds far below the detector's chroma cut


@dataclass
class ObjectSpec:
    """One moving object: ``positions`` are the (y, x) centres in pixels, one row per frame."""

    colour: str
    shape: str
    direction: str
    half_size: float
    positions: np.ndarray

    @property
    def extent(self) -> tuple[float, float]:
        """Half height and half width in pixels."""
        return half_extent(self.shape, self.half_size)


def half_extent(shape: str, size: float) -> tuple[float, float]:
    """(half height, half width) of ``shape`` drawn at size ``size``."""
    if shape == "circle":
        return size, size
    if shape == "bar":
        return _SHORT * size, _LONG * size
    if shape == "pillar":
        return _LONG * size, _SHORT * size
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass
class Clip:
    """A generated clip. ``video`` is (3, T, H, W) float32 in [-1, 1] (the VAE's input range and
    layout); ``masks`` is (N, T, H, W) in [0, 1], the coverage of each object (used to weight losses)."""

    video: np.ndarray
    caption: str
    objects: list[ObjectSpec]
    tone: str
    background: str
    masks: np.ndarray
    seed: int

    @property
    def metadata(self) -> dict:
        return {
            "seed": self.seed,
            "tone": self.tone,
            "background": self.background,
            "objects": [
                {
                    "colour": o.colour,
                    "shape": o.shape,
                    "direction": o.direction,
                    "half_size": o.half_size,
                    "positions": o.positions.tolist(),
                }
                for o in self.objects
            ],
        }

    def frames(self) -> np.ndarray:
        """The video as (T, H, W, 3) in [0, 1], the layout of a pipeline's ``output_type="np"``."""
        return to_unit_frames(self.video)


def to_unit_frames(video: np.ndarray) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) in [0, 1]."""
    return np.clip((np.moveaxis(np.asarray(video, dtype=np.float32), 0, -1) + 1.0) * 0.5, 0.0, 1.0)


def caption_for(objects: Sequence[ObjectSpec], tone: str, background: str) -> str:
    parts = [f"a {o.colour} {o.shape} moving {o.direction}" for o in objects]
    return " and ".join(parts) + f" on a {tone} {background}"


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption asks for, in order (words outside the vocabulary are ignored)."""
    words = caption.lower().split()
    found = []
    for i, word in enumerate(words[:-1]):
        if word in COLOURS and words[i + 1] in SHAPES:
            found.append((word, words[i + 1]))
    return found


# -- drawing ---------------------------------------------------------------------------------------


def _coverage(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (one-pixel ramp across the edge)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        sdf = np.sqrt(dy * dy + dx * dx) - r
    else:  # an axis-aligned rectangle (exact inside and along the sides; corners only need the ramp)
        hy, hx = half_extent(shape, r)
        sdf = np.maximum(np.abs(dy) - hy, np.abs(dx) - hx)
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, tone: str, kind: str, size: int) -> np.ndarray:
    """(H, W, 3) in [0, 1]: a linear gradient between two nearly grey colours, plus a faint texture."""
    level = rng.uniform(0.10, 0.30) if tone == "dark" else rng.uniform(0.55, 0.75)
    c0 = level + rng.uniform(-_BACKGROUND_CHROMA, _BACKGROUND_CHROMA, 3)
    c1 = np.clip(level + rng.uniform(-0.15, 0.15), 0.05, 0.85) + rng.uniform(-_BACKGROUND_CHROMA, _BACKGROUND_CHROMA, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    t = np.clip(0.5 + (xx * math.cos(angle) + yy * math.sin(angle)), 0.0, 1.0)[..., None]
    image = (1 - t) * c0 + t * c1
    if kind == "texture":
        # Two oriented sinusoids, grey (same on all channels) so the texture adds no chroma.
        pattern = np.zeros((size, size), np.float32)
        for _ in range(2):
            freq = rng.uniform(3.0, 8.0)
            theta = rng.uniform(0, math.pi)
            phase = rng.uniform(0, 2 * math.pi)
            pattern += np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        image = image + rng.uniform(0.03, 0.05) * pattern[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _trajectory(rng: np.random.Generator, half: tuple[float, float], size: int, frames: int) -> tuple[np.ndarray, str]:
    """Straight-line motion with elastic bounces at the frame edges, and the caption's direction word
    (the direction of the main axis that most of the frame-to-frame steps go)."""
    axis = int(rng.integers(2))  # 0: vertical main axis, 1: horizontal
    speed = rng.uniform(*_SPEED)
    velocity = np.zeros(2)
    velocity[axis] = speed * rng.choice((-1.0, 1.0))
    velocity[1 - axis] = speed * rng.uniform(-_CROSS_SPEED, _CROSS_SPEED)
    lo = np.asarray(half) + 1.0
    hi = size - 1.0 - np.asarray(half)
    position = rng.uniform(lo, hi)
    positions = [position.copy()]
    for _ in range(frames - 1):
        position = position + velocity
        for k in range(2):  # reflect about the wall, reverse that velocity component
            if position[k] < lo[k]:
                position[k], velocity[k] = 2 * lo[k] - position[k], -velocity[k]
            elif position[k] > hi[k]:
                position[k], velocity[k] = 2 * hi[k] - position[k], -velocity[k]
        positions.append(position.copy())
    positions = np.asarray(positions, dtype=np.float32)
    steps = np.sign(np.diff(positions[:, axis]))
    forward = int((steps > 0).sum()) - int((steps < 0).sum())
    if forward == 0:  # as many steps each way: the first step decides
        forward = int(steps[0])
    words = ("up", "down") if axis == 0 else ("left", "right")
    return positions, words[int(forward > 0)]


def sample_clip(seed: int, *, size: int = SIZE, frames: int = FRAMES, max_objects: int = 2) -> Clip:
    """The clip of ``seed``: 1 to ``max_objects`` shapes of distinct colours that never touch.

    Sizes and speeds scale with ``size`` (given for 64 px), so larger clips show the same scene.
    """
    rng = np.random.default_rng(seed)
    scale = size / SIZE
    tone = str(rng.choice(TONES))
    kind = str(rng.choice(BACKGROUNDS))
    n_objects = 1 if max_objects <= 1 or rng.random() < 0.6 else int(rng.integers(2, max_objects + 1))
    colours = rng.permutation(list(COLOURS))[:n_objects]
    objects: list[ObjectSpec] = []
    for colour in colours:
        for _ in range(50):  # rejection: a new object must keep a gap from every other, in every frame
            shape = str(rng.choice(SHAPES))
            half = rng.uniform(*_HALF_SIZE) * scale
            positions, direction = _trajectory(rng, half_extent(shape, half), size, frames)
            positions = positions.astype(np.float32)
            # Centres farther apart than the two circumscribed circles plus 3 px: never touching.
            radius = math.hypot(*half_extent(shape, half))
            gap = [
                np.linalg.norm(positions - o.positions, axis=1).min() - radius - math.hypot(*o.extent) for o in objects
            ]
            gap_ok = all(g > 3 * scale for g in gap)
            if gap_ok:
                objects.append(ObjectSpec(str(colour), shape, direction, float(half), positions))
                break
    background = _background(rng, tone, kind, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    video = np.repeat(background[None], frames, axis=0)  # (T, H, W, 3)
    masks = np.zeros((len(objects), frames, size, size), np.float32)
    for i, obj in enumerate(objects):
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        for t in range(frames):
            cover = _coverage(obj.shape, yy, xx, *obj.positions[t], obj.half_size)
            masks[i, t] = cover
            video[t] = video[t] * (1 - cover[..., None]) + colour * cover[..., None]
    video = np.moveaxis(video, -1, 0) * 2.0 - 1.0  # (3, T, H, W) in [-1, 1]
    return Clip(
        video=np.ascontiguousarray(video, dtype=np.float32),
        caption=caption_for(objects, tone, kind),
        objects=objects,
        tone=tone,
        background=kind,
        masks=masks,
        seed=seed,
    )


def sample_batch(seeds: Sequence[int], **kwargs) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Stacked videos (B, 3, T, H, W), captions, and object-coverage maps (B, 1, T, H, W) (max over objects)."""
    clips = [sample_clip(int(s), **kwargs) for s in seeds]
    videos = np.stack([c.video for c in clips])
    cover = np.stack([c.masks.max(axis=0, initial=0.0)[None] for c in clips])
    return videos, [c.caption for c in clips], cover


# -- detector --------------------------------------------------------------------------------------

#: A pixel belongs to a colour if it is within this RGB distance of the reference and its chroma is
#: at least ``MIN_CHROMA``. Backgrounds have chroma <= 0.12 by construction; shape colours >= 0.65.
MAX_COLOUR_DISTANCE = 0.38
MIN_CHROMA = 0.30
#: Components smaller than this fraction of the frame are not objects: half the smallest object the
#: domain draws (a circle of radius 7: 154 px of 4096, ~3.8 %). Objects never touch and stay whole
#: in the frame, so anything smaller is a fragment or a colour fringe at another object's edge (a
#: quarter of the smallest object, the first cut, counted the fringes a refinement leaves as objects).
MIN_AREA_FRACTION = 77 / (SIZE * SIZE)
#: Elongation (the ratio of the component's spreads along x and y) above which it is a bar, and below
#: whose inverse it is a pillar: the geometric mean of a circle's 1 and the drawn 2.5, about 1.6.
ELONGATION_CUT = math.sqrt(_LONG / _SHORT)


@dataclass
class Detection:
    """One connected component of one colour in one frame; ``centroid`` is (y, x) in pixels."""

    colour: str
    shape: str
    centroid: tuple[float, float]
    area: int
    fill: float


@dataclass(eq=False)  # identity semantics: tracks hold arrays, and linking removes them from lists
class Track:
    """Detections of one colour linked across frames; ``centroids`` is (T, 2) with NaN where absent."""

    colour: str
    shape: str
    centroids: np.ndarray
    detections: list[Detection | None] = field(repr=False)

    @property
    def present(self) -> int:
        return int(np.isfinite(self.centroids[:, 0]).sum())

    def displacement(self) -> np.ndarray:
        """(dy, dx) from the first to the last frame the track is present in (zeros if present once)."""
        rows = np.flatnonzero(np.isfinite(self.centroids[:, 0]))
        if len(rows) < 2:
            return np.zeros(2)
        return self.centroids[rows[-1]] - self.centroids[rows[0]]


@dataclass
class DetectionResult:
    frames: list[list[Detection]]
    tracks: list[Track]

    @property
    def counts(self) -> list[int]:
        """Number of objects in each frame."""
        return [len(d) for d in self.frames]

    @property
    def count(self) -> int:
        """Objects in the clip: the median per-frame count, robust to a frame where one flickers."""
        return int(np.median(self.counts)) if self.frames else 0

    def visible(self, colour: str, shape: str | None = None, min_fraction: float = 0.5) -> bool:
        """Is an object of ``colour`` (and ``shape``, by majority over its frames) present in at
        least ``min_fraction`` of the frames?"""
        need = max(1, math.ceil(min_fraction * len(self.frames)))
        return any(
            t.colour == colour and (shape is None or t.shape == shape) and t.present >= need for t in self.tracks
        )


def colour_masks(frame: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean (H, W) mask per colour for one (H, W, 3) frame in [0, 1]."""
    rgb = frame.astype(np.float32, copy=False)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    names = list(COLOURS)
    refs = np.asarray([COLOURS[n] for n in names], np.float32)
    dist = np.linalg.norm(rgb[..., None, :] - refs, axis=-1)  # (H, W, colours)
    nearest = dist.argmin(axis=-1)
    ok = (dist.min(axis=-1) <= MAX_COLOUR_DISTANCE) & (chroma >= MIN_CHROMA)
    return {name: ok & (nearest == i) for i, name in enumerate(names)}


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components (scipy's when installed, else a union-find over runs of pixels)."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is present wherever diffusers' deps are
        return _label_numpy(mask)
    labels, n = ndimage.label(mask)
    return labels, int(n)


def _label_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    height, width = mask.shape
    labels = np.zeros(mask.shape, np.int64)
    parent = [0]

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(height):
        row = mask[y]
        x = 0
        while x < width:
            if not row[x]:
                x += 1
                continue
            start = x
            while x < width and row[x]:
                x += 1
            above = {find(int(v)) for v in labels[y - 1, start:x] if v} if y else set()
            if above:
                root = min(above)
                for other in above:
                    parent[other] = root
            else:
                root = len(parent)
                parent.append(root)
            labels[y, start:x] = root
    roots = {}
    flat = labels.ravel()
    for i in np.flatnonzero(flat):
        r = find(int(flat[i]))
        flat[i] = roots.setdefault(r, len(roots) + 1)
    return labels, len(roots)


def classify_shape(component: np.ndarray) -> tuple[str, float]:
    """Class of one component (boolean mask cropped to its bounding box) and its fill ratio.

    The class comes from the elongation, the ratio of the pixels' standard deviations along x and
    along y: 1 for a circle, 2.5 for a bar, 1/2.5 for a pillar. Blur adds the same variance along both
    axes and lowers the ratio a little (a bar blurred by 1.5 px still reads 2.2), and second moments do
    not care about ragged edges, so the cut at 1.6 leaves a wide margin either way. The fill ratio
    (area / bounding box) is reported as well.
    """
    h, w = component.shape
    fill = float(component.sum()) / float(h * w)
    ys, xs = np.nonzero(component)
    elongation = math.sqrt((xs.var() + 1 / 12) / (ys.var() + 1 / 12))  # + a pixel's own spread
    if elongation >= ELONGATION_CUT:
        return "bar", fill
    if elongation <= 1 / ELONGATION_CUT:
        return "pillar", fill
    return "circle", fill


def detect_frame(frame: np.ndarray, min_area: int | None = None) -> list[Detection]:
    """Every coloured object in one (H, W, 3) frame in [0, 1]."""
    height, width = frame.shape[:2]
    if min_area is None:
        min_area = max(4, int(round(MIN_AREA_FRACTION * height * width)))
    found = []
    for colour, mask in colour_masks(frame).items():
        if not mask.any():
            continue
        labels, n = _label(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(ys) < min_area:
                continue
            crop = labels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == k
            shape, fill = classify_shape(crop)
            found.append(Detection(colour, shape, (float(ys.mean()), float(xs.mean())), int(len(ys)), fill))
    return found


def detect_objects(frames: np.ndarray, min_area: int | None = None) -> DetectionResult:
    """Detect and track the shapes in a clip.

    ``frames``: (T, H, W, 3), float in [0, 1] or uint8 (what ``output_type="np"`` or a video file gives).
    Detections of one colour are linked frame to frame greedily by nearest centroid, so a track is
    one object as long as same-coloured objects do not cross.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3) but got {frames.shape}")
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / 255.0
    per_frame = [detect_frame(f, min_area) for f in frames]
    n_frames = len(per_frame)
    tracks: list[Track] = []
    for t, detections in enumerate(per_frame):
        free = list(tracks)
        for det in sorted(detections, key=lambda d: -d.area):
            best, best_dist = None, math.inf
            for tr in free:
                if tr.colour != det.colour:
                    continue
                rows = np.flatnonzero(np.isfinite(tr.centroids[:t, 0]))
                if not len(rows):
                    continue
                d = float(np.hypot(*(tr.centroids[rows[-1]] - np.asarray(det.centroid))))
                if d < best_dist:
                    best, best_dist = tr, d
            if best is None:
                best = Track(det.colour, det.shape, np.full((n_frames, 2), np.nan), [None] * n_frames)
                tracks.append(best)
            else:
                free = [tr for tr in free if tr is not best]
            best.centroids[t] = det.centroid
            best.detections[t] = det
    for tr in tracks:  # class by majority over the frames the object is seen in
        votes = [d.shape for d in tr.detections if d is not None]
        tr.shape = max(SHAPES, key=votes.count)
    return DetectionResult(per_frame, tracks)
