"""VLM.visual_token_boxes: where each visual token sits in the input, checked per family on the tiny
models against the models themselves.

The independent check: with the vision tower's attention output projections zeroed, every patch
feature depends on its own pixels only (patch embedding, norms and MLPs are per patch; the merger /
projector / pooling mix only the patches of one token), so painting a rectangle of one image or frame
changes exactly the visual embeddings of the tokens that read those pixels.  Where the processor
resamples the image, a painted pixel also reaches the resampling filter's support around it: the
check then allows a margin of that many source pixels (the `margins` of each case, per view).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_cfg, random_image

from explain_prune.core import InputError
from explain_prune.models import Sample, build_vlm

QUESTION = "what is this ?"


def localise(vlm):
    """Zero the attention output projections of the vision tower (see the module docstring)."""
    towers = {"qwen2vl": lambda m: m.model.visual, "llava_onevision": lambda m: m.model.vision_tower, "vila": lambda m: m.vision_tower}
    zeroed = 0
    for name, module in towers[vlm.family](vlm.model).named_modules():
        if name.endswith(("attn.proj", "self_attn.out_proj")):
            for param in module.parameters():
                param.data.zero_()
            zeroed += 1
    assert zeroed == 2  # both layers of every tiny tower
    return vlm


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name, **overrides):
        key = (name, repr(sorted(overrides.items())))
        if key not in built:
            built[key] = localise(build_vlm(model_cfg(name, **overrides)))
        return built[key]

    return get


def frames(sizes, seed=0):
    return [random_image(seed + i, h, w) for i, (h, w) in enumerate(sizes)]


# 60-px tiles of 4 patches of 14 px: like SigLIP 384/14, the last pixels of every tile feed no token
GAPS = {"tiny.vision.image_size": 60, "tiny.image_grid_pinpoints": [[60, 60], [60, 120], [120, 60], [120, 120]]}
# (model, overrides, images or None, video frames or None, margin per view in source pixels)
CASES = {
    "qwen_square": ("tiny_qwen2vl", {}, [(112, 112)], None, {0: 0}),
    "qwen_wide": ("tiny_qwen2vl", {}, [(84, 140)], None, {0: 0}),  # multiples of 28: not resized
    "qwen_two_images": ("tiny_qwen2vl", {}, [(56, 84), (112, 56)], None, {0: 0}),
    "qwen_video_odd": ("tiny_qwen2vl", {}, None, [(56, 56)] * 3, {0: 0}),  # frame 2 is doubled
    "llava_square": ("tiny_llava_ov", {}, [(112, 112)], None, {0: 5, 1: 0}),  # base: 2x bicubic downscale
    "llava_wide": ("tiny_llava_ov", {}, [(80, 130)], None, {0: 6, 1: 3}),  # unpadded crops
    "llava_shrunk": ("tiny_llava_ov", {"image.vision_aspect_ratio": "anyres_max_1"}, [(112, 112)], None, {0: 5, 1: 0}),
    "llava_two_images": ("tiny_llava_ov", {}, [(56, 56), (40, 56)], None, {0: 0}),  # padded to squares
    "llava_video": ("tiny_llava_ov", {}, None, [(56, 56)] * 3, {0: 0}),  # 2x2 bilinear pooling
    "llava_gaps": ("tiny_llava_ov", GAPS, [(120, 120)], None, {0: 5, 1: 0}),  # 60-px tiles read to 56 px
    "vila_square": ("tiny_vila", {}, [(384, 384)], None, {0: 0}),
    "vila_pad": ("tiny_vila", {"image.aspect_ratio": "pad"}, [(200, 300)], None, {0: 3}),  # x1.28 bicubic
    "vila_video": ("tiny_vila", {}, None, [(384, 384)] * 2, {0: 0}),
}


def case_sample(images, video):
    if video is not None:
        return Sample(id="v", question=QUESTION, video=frames(video)), video
    return Sample(id="i", question=QUESTION, images=frames(images)), images


def boxes_of(vlm, sample, sizes):
    prompt = vlm.prepare(sample)
    boxes = vlm.visual_token_boxes(prompt, image_sizes=sizes)
    assert boxes.shape == (prompt.num_visual, 7) and boxes.dtype == torch.float64
    return prompt, boxes


def painted(sample, index, rect, seed):
    """A copy of `sample` with rectangle rect = (x0, y0, x1, y1) px of image / frame `index` repainted."""
    x0, y0, x1, y1 = rect
    pictures = list(sample.video if sample.video is not None else sample.images)
    picture = pictures[index].copy()
    picture.paste(random_image(seed, y1 - y0, x1 - x0), (x0, y0))
    pictures[index] = picture
    if sample.video is not None:
        return Sample(id=sample.id, question=sample.question, video=pictures)
    return Sample(id=sample.id, question=sample.question, images=pictures)


def meeting(boxes, index, rect, size, grow):
    """Bool [N_v]: tokens that read image / frame `index` and whose box meets `rect` grown by `grow` px
    (a tensor per token: its view's margin; negative shrinks)."""
    h, w = size
    x0, y0, x1, y1 = rect
    first, stop = boxes[:, 0], boxes[:, 1]
    eps = 1e-6
    return (
        (first <= index) & (index < stop)
        & (boxes[:, 3] * w < x1 + grow - eps) & (boxes[:, 5] * w > x0 - grow + eps)
        & (boxes[:, 4] * h < y1 + grow - eps) & (boxes[:, 6] * h > y0 - grow + eps)
    )


def changed(vlm, a, b):
    diff = (a.inputs_embeds[0, a.visual_index] - b.inputs_embeds[0, b.visual_index]).abs().amax(-1)
    return diff > 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_painting_a_region_changes_exactly_the_tokens_whose_box_meets_it(models, case):
    name, overrides, images, video, margins = CASES[case]
    vlm = models(name, **overrides)
    sample, sizes = case_sample(images, video)
    prompt, boxes = boxes_of(vlm, sample, sizes)
    margin = torch.tensor([margins.get(int(v), 0) for v in boxes[:, 2].tolist()], dtype=torch.float64)
    rng = np.random.default_rng(sum(map(ord, case)))
    smallest = 2 * max(margins.values()) + 3  # a probe survives shrinking by the margin
    probes = []
    for _ in range(7):
        index = int(rng.integers(len(sizes)))
        h, w = sizes[index]
        pw, ph = int(rng.integers(smallest, max(smallest + 1, w // 3))), int(rng.integers(smallest, max(smallest + 1, h // 3)))
        x0, y0 = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        probes.append((index, (x0, y0, x0 + pw, y0 + ph)))
    unread = []
    if name == "tiny_vila" and not overrides:  # SigLIP 384/14: the last 6 px columns and rows feed no token
        h, w = sizes[0]
        unread = [(0, (w - 6, 0, w, h)), (0, (0, h - 6, w, h))]
    for k, (index, rect) in enumerate(probes + unread):
        after = vlm.prepare(painted(sample, index, rect, seed=100 + k))
        got = changed(vlm, prompt, after)
        may = meeting(boxes, index, rect, sizes[index], margin)
        must = meeting(boxes, index, rect, sizes[index], -margin)
        assert not (got & ~may).any(), f"{case} probe {rect} of {index}: tokens {(got & ~may).nonzero().flatten().tolist()} changed outside their boxes"
        assert not (must & ~got).any(), f"{case} probe {rect} of {index}: tokens {(must & ~got).nonzero().flatten().tolist()} did not change"
        assert must.any() or (index, rect) in unread  # every probe tests at least one token
        if (index, rect) in unread:
            assert not may.any() and not got.any()


def coverage(boxes, index, view, size):
    """[H, W] counts: how many tokens of (image `index`, `view`) contain each pixel centre."""
    h, w = size
    counts = np.zeros((h, w), dtype=np.int64)
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    for row in boxes[(boxes[:, 0] <= index) & (index < boxes[:, 1]) & (boxes[:, 2] == view)].tolist():
        inside_y = (ys >= row[4]) & (ys < row[6])
        inside_x = (xs >= row[3]) & (xs < row[5])
        counts += inside_y[:, None] & inside_x[None, :]
    return counts


@pytest.mark.parametrize(
    "case, view, read",
    [
        ("qwen_square", 0, 1.0),
        ("qwen_wide", 0, 1.0),
        ("qwen_video_odd", 0, 1.0),
        ("llava_square", 0, 1.0),
        ("llava_square", 1, 1.0),
        ("llava_shrunk", 1, 1.0),
        ("llava_video", 0, 1.0),
        ("llava_gaps", 0, 56 / 60),  # the thumbnail: one 60-px tile
        ("vila_square", 0, 27 * 14 / 384),  # 27 patches of 14 px on a 384-px side
        ("vila_video", 0, 27 * 14 / 384),
    ],
)
def test_boxes_of_one_view_tile_what_the_encoder_reads(models, case, view, read):
    name, overrides, images, video, _ = CASES[case]
    sample, sizes = case_sample(images, video)
    _, boxes = boxes_of(models(name, **overrides), sample, sizes)
    for index, (h, w) in enumerate(sizes):
        counts = coverage(boxes, index, view, (h, w))
        expected = np.zeros((h, w), dtype=np.int64)
        expected[: round(read * h), : round(read * w)] = 1
        assert np.array_equal(counts, expected), f"{case} image {index} view {view}"


def test_crop_tiles_leave_the_unread_pixels_of_each_tile_uncovered(models):
    name, overrides, images, video, _ = CASES["llava_gaps"]
    sample, sizes = case_sample(images, video)
    _, boxes = boxes_of(models(name, **overrides), sample, sizes)
    read = (np.arange(120) % 60) < 56  # pixels 0..55 and 60..115 of the 2 x 2 crop tiles
    assert np.array_equal(coverage(boxes, 0, 1, (120, 120)), (read[:, None] & read[None, :]).astype(np.int64))


def test_unpadded_crops_do_not_overlap_and_cover_a_band_of_the_image(models):
    """80x130 image: the crop canvas is 112x112 with the image resized to 112x69 at rows 21..89;
    unpad_image keeps feature rows 2..5 (int(80 * 8 / 130) = 4 rows), i.e. canvas rows 28..84."""
    name, overrides, images, video, _ = CASES["llava_wide"]
    sample, sizes = case_sample(images, video)
    _, boxes = boxes_of(models(name, **overrides), sample, sizes)
    crops = boxes[boxes[:, 2] == 1]
    assert len(crops) == 4 * 8
    torch.testing.assert_close(crops[:, 4].min().item(), (28 - 21) / 69)
    torch.testing.assert_close(crops[:, 6].max().item(), (84 - 21) / 69)
    assert crops[:, 3].min() == 0 and crops[:, 5].max() == 1
    counts = coverage(boxes, 0, 1, sizes[0])
    assert counts.max() == 1
    rows = counts.any(1).nonzero()[0]
    assert counts[rows.min() : rows.max() + 1].all()  # one full-width band, no holes


@pytest.mark.parametrize("case", ["llava_square", "llava_wide", "llava_two_images", "llava_video"])
def test_newline_tokens_and_only_they_have_no_place(models, case):
    name, overrides, images, video, _ = CASES[case]
    vlm = models(name, **overrides)
    sample, sizes = case_sample(images, video)
    prompt, boxes = boxes_of(vlm, sample, sizes)
    newline = (prompt.inputs_embeds[0, prompt.visual_index] == vlm.model.model.image_newline).all(-1)
    no_place = boxes[:, 0] == -1
    assert newline.any() and torch.equal(no_place, newline)
    assert (boxes[no_place, 1:3] == -1).all() and (boxes[no_place, 3:] == 0).all()


def test_vila_pad_boxes_need_the_image_sizes(models):
    vlm = models("tiny_vila", **{"image.aspect_ratio": "pad"})
    prompt = vlm.prepare(Sample(id="p", question=QUESTION, images=[random_image(0, 200, 300)]))
    with pytest.raises(InputError, match="image_sizes"):
        vlm.visual_token_boxes(prompt)
    boxes = vlm.visual_token_boxes(prompt, image_sizes=[(200, 300)])
    # the 300x300 canvas holds the image at rows 50..250; scaled to 384: patch rows 0..3 (0..56 px,
    # i.e. 0..43.75 canvas px) are padding only, so token row pairs 0 and 1 read no image pixel
    no_place = (boxes[:, 0] == -1).view(14, 14)  # [column pair, row pair] (column-major tokens)
    assert no_place[:, :2].all() and not no_place[:, 2:12].any() and no_place[:, 12:].all()
