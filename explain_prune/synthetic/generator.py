"""Procedural grid visual-QA with known relevant visual tokens.

An image is a `grid` x `grid` board of cells, each `cell_px` pixels square, on a noisy grey
background.  A few cells hold one coloured shape each.  The question selects exactly one object by
one attribute and asks for the other ("what shape is the red object ?" / "what color is the
circle ?"), so the answer is one word from a closed set of four and depends on that object only.

Cells are aligned with Qwen2-VL's visual tokens (14-px patches merged 2x2: one token = 28x28
pixels), so every object lies inside whole tokens of its own cell and the ground truth is a set of
visual-token positions: `meta["gt_tokens"]`, sorted flat indices into the visual token sequence
(raster order t, h, w; for videos t is the temporal token = 2 frames).

Video variant (`frames > 0`): the board is static in layout but each object is present only in
some temporal tokens (pairs of frames); the queried object is absent from at least one, so the
ground truth covers (t, h, w) tokens of the frames where it appears.

Everything is a pure function of (config, seed, index): `make_sample(cfg, seed, i)` always returns
the same pixels, question and answer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from explain_prune.core import DeferredSample, InputError, Sample

TOKEN_PX = 28  # one Qwen2-VL visual token: 14-px patch x spatial merge 2
TEMPORAL_PATCH = 2  # frames per temporal token

# Saturated colours: every object pixel has a channel > 190 (after texture noise), the background
# stays inside [128 - 2*noise, 128 + 2*noise] per channel, so the two never mix up (tests rely on it).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 215, 70),
    "blue": (45, 85, 235),
    "yellow": (235, 220, 45),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("shape", "color")
# Two phrasings per question type; all words are in models.tiny.BASE_WORDS.
TEMPLATES = {
    "shape": ("what shape is the {color} object ?", "which shape is the {color} object ?"),
    "color": ("what color is the {shape} ?", "which color is the {shape} ?"),
}
ANSWERS = {"shape": SHAPES, "color": tuple(COLORS)}
EXTRA_WORDS: tuple[str, ...] = ()  # every question/answer word is already in the base tokenizer


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of one family of samples.  The image is `grid * cell_px` pixels square."""

    grid: int = 4  # cells per side
    cell_px: int = 56  # multiple of TOKEN_PX, so cells align with whole visual tokens
    min_objects: int = 1
    max_objects: int = 4
    frames: int = 0  # 0: a single image; > 0: a video of that many frames (even)
    noise: int = 20  # background grey jitter (uniform +-noise around a per-image level)
    scale: tuple[float, float] = (0.7, 0.9)  # object size / cell size, uniform in this range
    jitter: int = 2  # max offset (pixels) of an object from the centre of its cell (clipped to the cell)
    question_types: tuple[str, ...] = QUESTION_TYPES

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.cell_px < TOKEN_PX or self.cell_px % TOKEN_PX:
            raise ValueError(f"cell_px must be a positive multiple of {TOKEN_PX}, got {self.cell_px}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= grid^2, got {self.min_objects}, {self.max_objects}, {self.grid}"
            )
        if self.frames < 0 or self.frames % TEMPORAL_PATCH or self.frames == TEMPORAL_PATCH:
            raise ValueError(f"frames must be 0 or an even number >= 4 (>= 2 temporal tokens), got {self.frames}")
        if not 0 <= self.noise <= 30:
            raise ValueError(f"noise must be in [0, 30] so objects stay separable, got {self.noise}")
        lo, hi = self.scale
        if not 0.3 <= lo <= hi <= 0.95:
            raise ValueError(f"scale must satisfy 0.3 <= lo <= hi <= 0.95, got {self.scale}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")
        unknown = set(self.question_types) - set(QUESTION_TYPES)
        if not self.question_types or unknown:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {self.question_types}")

    @property
    def image_px(self) -> int:
        return self.grid * self.cell_px

    @property
    def tokens_per_side(self) -> int:
        return self.image_px // TOKEN_PX

    @property
    def temporal_tokens(self) -> int:
        return self.frames // TEMPORAL_PATCH if self.frames else 1

    @property
    def num_visual_tokens(self) -> int:
        return self.temporal_tokens * self.tokens_per_side**2


@dataclass
class SceneObject:
    color: str
    shape: str
    row: int
    col: int
    scale: float  # object size / cell size
    dy: int  # offset of the object's box inside its cell, pixels
    dx: int
    slots: tuple[int, ...] = ()  # video: temporal tokens where the object is present (empty: image)


@dataclass
class Scene:
    config: SyntheticConfig
    objects: list[SceneObject]
    target: int  # index of the queried object
    question_type: str  # "shape" (selected by colour) or "color" (selected by shape)
    question: str
    answer: str
    level: int  # background grey level
    noise_seed: int  # seed of the pixel noise


# --- the oracle -------------------------------------------------------------------------------
def solve(question: str, objects: Sequence[SceneObject]) -> str:
    """Answer a question from the scene's objects alone (independent of how it was generated).

    Raises ValueError unless the question's selector matches exactly one object.
    """
    words = question.replace("?", " ").split()
    if "shape" in words:
        key = next(w for w in words if w in COLORS)
        matches = [o for o in objects if o.color == key]
        attr = "shape"
    elif "color" in words:
        key = next(w for w in words if w in SHAPES)
        matches = [o for o in objects if o.shape == key]
        attr = "color"
    else:
        raise ValueError(f"not a synthetic question: {question!r}")
    if len(matches) != 1:
        raise ValueError(f"{question!r} selects {len(matches)} objects, expected exactly one")
    return getattr(matches[0], attr)


# --- scene sampling ----------------------------------------------------------------------------
def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _place(cfg: SyntheticConfig, rng: np.random.Generator, color: str, shape: str, row: int, col: int,
           slots: tuple[int, ...]) -> SceneObject:
    scale = float(rng.uniform(*cfg.scale))
    size = int(round(scale * cfg.cell_px))
    centre = (cfg.cell_px - size) // 2
    # offsets are clipped so the object always stays inside its own cell (and its own tokens)
    dy = min(max(centre + int(rng.integers(-cfg.jitter, cfg.jitter + 1)), 0), cfg.cell_px - size)
    dx = min(max(centre + int(rng.integers(-cfg.jitter, cfg.jitter + 1)), 0), cfg.cell_px - size)
    return SceneObject(color, shape, row, col, scale, dy, dx, slots)


def _slots(cfg: SyntheticConfig, rng: np.random.Generator, target: bool) -> tuple[int, ...]:
    """Temporal tokens where an object is present: a contiguous run; the target's run never
    covers the whole video (so which frames matter is part of the ground truth)."""
    if not cfg.frames:
        return ()
    n = cfg.temporal_tokens
    length = int(rng.integers(1, n if target else n + 1))  # target: 1..n-1, distractor: 1..n
    start = int(rng.integers(0, n - length + 1))
    return tuple(range(start, start + length))


def make_scene(cfg: SyntheticConfig, seed: int, index: int) -> Scene:
    """The layout, question and answer of sample `index` of stream `seed`."""
    rng = _rng(seed, index)
    qtype = cfg.question_types[int(rng.integers(len(cfg.question_types)))]
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(cfg.grid**2, size=n, replace=False)
    colors, shapes = list(COLORS), list(SHAPES)
    t_color = colors[int(rng.integers(len(colors)))]
    t_shape = shapes[int(rng.integers(len(shapes)))]
    objects = []
    for i, cell in enumerate(cells):
        row, col = divmod(int(cell), cfg.grid)
        if i == 0:
            color, shape = t_color, t_shape
        elif qtype == "shape":  # the selector is the colour: distractors never share it
            color = [c for c in colors if c != t_color][int(rng.integers(len(colors) - 1))]
            shape = shapes[int(rng.integers(len(shapes)))]
        else:  # the selector is the shape
            color = colors[int(rng.integers(len(colors)))]
            shape = [s for s in shapes if s != t_shape][int(rng.integers(len(shapes) - 1))]
        objects.append(_place(cfg, rng, color, shape, row, col, _slots(cfg, rng, target=i == 0)))
    template = TEMPLATES[qtype][int(rng.integers(len(TEMPLATES[qtype])))]
    question = template.format(color=t_color, shape=t_shape)
    answer = t_shape if qtype == "shape" else t_color
    level = int(rng.integers(128 - (30 - cfg.noise), 128 + (30 - cfg.noise) + 1))
    scene = Scene(cfg, objects, 0, qtype, question, answer, level, int(rng.integers(2**31)))
    if solve(question, objects) != answer:  # construction and oracle must agree
        raise AssertionError(f"generator bug: {question!r} -> {answer!r}")
    return scene


# --- rendering ---------------------------------------------------------------------------------
def object_mask(cfg: SyntheticConfig, obj: SceneObject) -> np.ndarray:
    """Boolean [H, W] mask of the object's pixels in the full image."""
    side = cfg.image_px
    size = int(round(obj.scale * cfg.cell_px))
    y0 = obj.row * cfg.cell_px + obj.dy
    x0 = obj.col * cfg.cell_px + obj.dx
    canvas = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif obj.shape == "square":
        inset = size // 10
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=1)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + (size - 1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    elif obj.shape == "cross":
        bar = max(2, size // 3)
        lo = (size - bar) // 2
        draw.rectangle([x0 + lo, y0, x0 + lo + bar - 1, y1], fill=1)
        draw.rectangle([x0, y0 + lo, x1, y0 + lo + bar - 1], fill=1)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(canvas, dtype=bool)


def render(scene: Scene) -> list[Image.Image]:
    """The frames of a scene (one for an image): noisy grey background plus textured objects."""
    cfg = scene.config
    rng = np.random.default_rng(scene.noise_seed)
    side = cfg.image_px
    masks = [object_mask(cfg, o) for o in scene.objects]
    frames = []
    for f in range(max(1, cfg.frames)):
        slot = f // TEMPORAL_PATCH
        pix = scene.level + rng.integers(-cfg.noise, cfg.noise + 1, size=(side, side, 3))
        # one texture field per frame, so each object's pixels do not depend on the other objects
        texture = rng.integers(-15, 16, size=(side, side, 3))
        for obj, mask in zip(scene.objects, masks):
            if cfg.frames and slot not in obj.slots:
                continue
            pix[mask] = np.clip(np.array(COLORS[obj.color]) + texture[mask], 0, 255)
        frames.append(Image.fromarray(pix.astype(np.uint8), "RGB"))
    return frames


def token_positions(cfg: SyntheticConfig, obj: SceneObject) -> list[int]:
    """Sorted flat visual-token indices (t, h, w raster order) that contain a pixel of `obj`."""
    n = cfg.tokens_per_side
    ys, xs = np.nonzero(object_mask(cfg, obj))
    spatial = np.unique((ys // TOKEN_PX) * n + xs // TOKEN_PX)
    slots = obj.slots if cfg.frames else (0,)
    return sorted(int(t * n * n + s) for t in slots for s in spatial)


def scene_to_sample(scene: Scene, sample_id: str) -> Sample:
    cfg = scene.config
    frames = render(scene)
    n = cfg.tokens_per_side
    meta = {
        "gt_tokens": token_positions(cfg, scene.objects[scene.target]),
        "visual_grid": (cfg.temporal_tokens, n, n),
        "grid": cfg.grid,
        "cell_px": cfg.cell_px,
        "token_px": TOKEN_PX,
        "question_type": scene.question_type,
        "answers": list(ANSWERS[scene.question_type]),
        "chance": 1.0 / len(ANSWERS[scene.question_type]),
        "objects": [asdict(o) for o in scene.objects],
        "target": scene.target,
        "synthetic": asdict(cfg),
    }
    if cfg.frames:
        return Sample(id=sample_id, question=scene.question, video=frames, answer=scene.answer, meta=meta)
    return Sample(id=sample_id, question=scene.question, images=frames, answer=scene.answer, meta=meta)


def sample_id(cfg: SyntheticConfig, seed: int, index: int) -> str:
    """The id of sample `index` of the stream `seed` (known without rendering it)."""
    kind = "video" if cfg.frames else "image"
    return f"synthetic-{kind}-g{cfg.grid}c{cfg.cell_px}f{cfg.frames}-s{seed}-{index}"


def make_sample(cfg: SyntheticConfig, seed: int, index: int) -> Sample:
    """Sample `index` of the stream `seed` (deterministic)."""
    return scene_to_sample(make_scene(cfg, seed, index), sample_id(cfg, seed, index))


def deferred_samples(cfg: SyntheticConfig, seed: int, count: int) -> Iterator[DeferredSample]:
    """Samples 0 .. count-1 of the stream `seed`, each rendered only when read (data.prefetch)."""
    for index in range(count):
        yield DeferredSample(sample_id(cfg, seed, index), functools.partial(make_sample, cfg, seed, index))


def synthetic_config(overrides: Mapping[str, Any] | None) -> SyntheticConfig:
    """A SyntheticConfig from config overrides (a plain mapping or a DictConfig): the one place that
    turns YAML lists into the dataclass's tuples (`scale`, `question_types`) and names a bad key."""
    if overrides is not None and not isinstance(overrides, dict):
        from omegaconf import OmegaConf

        overrides = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else dict(overrides)
    values = dict(overrides or {})
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"synthetic: unknown generator option(s) {unknown}; known: {sorted(known)}")
    for key in ("question_types", "scale"):
        if key in values:
            values[key] = tuple(values[key])
    try:
        return SyntheticConfig(**values)
    except (TypeError, ValueError) as err:
        raise InputError(f"synthetic: {err}") from None


def generate(cfg: SyntheticConfig, n: int, seed: int, start: int = 0) -> list[Sample]:
    return [make_sample(cfg, seed, i) for i in range(start, start + n)]


def with_objects(scene: Scene, objects: list[SceneObject]) -> Scene:
    """A copy of `scene` with another object list (same question, noise and target index);
    the answer is recomputed by the oracle."""
    return replace(scene, objects=objects, answer=solve(scene.question, objects))
