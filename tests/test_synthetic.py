"""The synthetic domain: reproducible clips and captions, and a detector that reads them back."""

import subprocess
import sys

import numpy as np
import pytest

from supergen import synthetic


def test_clip_is_reproducible_from_its_seed():
    a, b = synthetic.sample_clip(7), synthetic.sample_clip(7)
    assert np.array_equal(a.video, b.video)
    assert a.caption == b.caption
    assert a.metadata == b.metadata
    c = synthetic.sample_clip(8)
    assert not np.array_equal(a.video, c.video)


def test_clip_layout_range_and_caption_words():
    for seed in range(20):
        clip = synthetic.sample_clip(seed)
        assert clip.video.shape == (3, synthetic.FRAMES, synthetic.SIZE, synthetic.SIZE)
        assert clip.video.dtype == np.float32
        assert clip.video.min() >= -1.0 and clip.video.max() <= 1.0
        assert set(clip.caption.split()) <= set(synthetic.VOCABULARY)
        assert synthetic.parse_caption(clip.caption) == [(o.colour, o.shape) for o in clip.objects]
        assert 1 <= len(clip.objects) <= 2
        assert len({o.colour for o in clip.objects}) == len(clip.objects)  # distinct colours per clip
        assert clip.frames().shape == (synthetic.FRAMES, synthetic.SIZE, synthetic.SIZE, 3)


def test_captions_cover_the_vocabulary():
    words = set()
    for seed in range(300):
        words |= set(synthetic.sample_clip(seed).caption.split())
    assert words == set(synthetic.VOCABULARY)


def test_objects_stay_in_frame_and_bounce():
    bounced = 0
    for seed in range(100):
        for obj in synthetic.sample_clip(seed).objects:
            extent = np.asarray(obj.extent)
            assert (obj.positions >= extent).all() and (obj.positions <= synthetic.SIZE - extent).all()
            steps = np.diff(obj.positions, axis=0)
            bounced += bool((np.diff(np.sign(steps), axis=0) != 0).any())
    assert bounced > 5


def _truth(clip):
    return sorted((o.colour, o.shape) for o in clip.objects)


def test_detector_recovers_generated_objects():
    """Count, colour and class of every object, on at least 95 % of 100 clean clips."""
    ok = 0
    for seed in range(100):
        clip = synthetic.sample_clip(seed)
        found = synthetic.detect_objects(clip.frames())
        got = sorted((t.colour, t.shape) for t in found.tracks)
        ok += got == _truth(clip) and found.count == len(clip.objects)
    assert ok >= 95


def test_detector_tracks_follow_the_motion():
    for seed in range(30):
        clip = synthetic.sample_clip(seed)
        found = synthetic.detect_objects(clip.frames())
        for obj in clip.objects:
            (track,) = [t for t in found.tracks if t.colour == obj.colour]
            assert track.present == synthetic.FRAMES
            # Every shape is symmetric about the centre it is drawn from (pixel centres sit at +0.5).
            assert np.abs(track.centroids - (obj.positions - 0.5)).max() < 1.5
            path = np.linalg.norm(track.centroids - track.centroids[0], axis=1)
            assert path.max() > 8.0  # at least 1.5 px/frame: the object clearly moves


def test_shapes_have_their_elongation_and_keep_it_under_blur():
    """The classes differ in elongation (not corners), so a blurred drawing, what a small model and
    its VAE give, keeps its class: every object of 60 clips blurred by a 2-pixel Gaussian."""
    ndimage = pytest.importorskip("scipy.ndimage")
    for seed in range(60):
        clip = synthetic.sample_clip(seed)
        hy, hx = clip.objects[0].extent
        assert {"circle": hy == hx, "bar": hx > 2 * hy, "pillar": hy > 2 * hx}[clip.objects[0].shape]
        blurred = ndimage.gaussian_filter(clip.frames(), sigma=(0, 2, 2, 0))
        found = synthetic.detect_objects(blurred)
        assert sorted((t.colour, t.shape) for t in found.tracks) == _truth(clip), seed


def test_classify_shape_reads_elongation():
    yy, xx = np.mgrid[0:30, 0:30]
    disc = (yy - 15) ** 2 + (xx - 15) ** 2 <= 81
    assert synthetic.classify_shape(disc)[0] == "circle"
    bar = np.ones((8, 22), bool)
    assert synthetic.classify_shape(bar)[0] == "bar"
    assert synthetic.classify_shape(bar.T)[0] == "pillar"
    # A square reads as round: elongation, not corners, separates the classes.
    assert synthetic.classify_shape(np.ones((12, 12), bool))[0] == "circle"
    with pytest.raises(ValueError, match="triangle"):
        synthetic.half_extent("triangle", 5.0)


def test_detector_is_scale_free_and_reads_uint8():
    clip = synthetic.sample_clip(3, size=128)
    found = synthetic.detect_objects((clip.frames() * 255).round().astype(np.uint8))
    assert sorted((t.colour, t.shape) for t in found.tracks) == _truth(clip)


def test_detector_sees_nothing_in_a_background():
    clip = synthetic.sample_clip(5)
    empty = np.repeat(clip.frames()[:1] * 0 + 0.5, 3, axis=0)
    assert synthetic.detect_objects(empty).count == 0
    # The background of a clip (objects masked out) holds no detections either.
    frames = clip.frames().copy()
    frames[clip.masks.max(axis=0) > 0] = 0.5
    assert synthetic.detect_objects(frames).count == 0


def test_visible_needs_colour_class_and_presence():
    clip = synthetic.sample_clip(0)
    found = synthetic.detect_objects(clip.frames())
    obj = clip.objects[0]
    assert found.visible(obj.colour) and found.visible(obj.colour, obj.shape)
    other = next(s for s in synthetic.SHAPES if s != obj.shape)
    assert not found.visible(obj.colour, other)
    frames = clip.frames().copy()
    frames[2:] = 0.5  # the object only in 2 of 9 frames
    assert not synthetic.detect_objects(frames).visible(obj.colour)


def test_numpy_labelling_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((40, 50)) < 0.45
        labels, n = synthetic._label_numpy(mask)
        ref, n_ref = ndimage.label(mask)
        assert n == n_ref
        # Same partition: each of our labels maps to exactly one scipy label and vice versa.
        pairs = {(a, b) for a, b in zip(labels[mask].tolist(), ref[mask].tolist())}
        assert len(pairs) == n


def test_import_does_not_pull_in_diffusers():
    code = "import sys, supergen.synthetic; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_detector_links_several_same_colour_objects():
    """Two objects of one colour (what a model that duplicates draws) give two tracks and a count of 2."""
    seed = next(
        s
        for s in range(1000)
        if len((c := synthetic.sample_clip(s)).objects) == 1
        and (abs(c.objects[0].positions[:, 1] - 32) > c.objects[0].extent[1] + 2).all()
    )
    clip = synthetic.sample_clip(seed)
    frames = clip.frames()
    mirrored = (clip.masks[0] > 0)[..., ::-1, None]  # the object mirrored left-right, far from itself
    frames = np.where(mirrored, frames[:, :, ::-1], frames)
    found = synthetic.detect_objects(frames)
    assert [t.colour for t in found.tracks] == [clip.objects[0].colour] * 2
    assert all(t.present == synthetic.FRAMES for t in found.tracks)
    assert found.count == 2


def test_min_area_is_half_the_smallest_object_and_drops_fringes():
    # The smallest object the domain draws (a circle or a bar of the smallest size) is kept; a blob under
    # half of it, like the colour fringe a refinement leaves at another object's edge, is not an object.
    s = synthetic._HALF_SIZE[0]
    smallest = min(np.pi * s**2, 4 * synthetic._LONG * synthetic._SHORT * s**2)
    assert synthetic.MIN_AREA_FRACTION * synthetic.SIZE**2 == pytest.approx(smallest / 2, abs=0.5)
    frame = np.full((64, 64, 3), 0.5, dtype=np.float32)
    frame[10:24, 10:24] = synthetic.COLOURS["red"]  # 196 px: an object
    frame[40:47, 40:50] = synthetic.COLOURS["blue"]  # 70 px: a fringe
    assert [d.colour for d in synthetic.detect_frame(frame)] == ["red"]
    frame[40:49, 40:49] = synthetic.COLOURS["blue"]  # 81 px: above the cut
    assert sorted(d.colour for d in synthetic.detect_frame(frame)) == ["blue", "red"]
