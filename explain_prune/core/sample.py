"""`Sample`, the one visual question every source and benchmark yields, and the image loader they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from explain_prune.core.errors import InputError, RowError


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed from (seed, sample id) that does not depend on PYTHONHASHSEED: every per-sample
    draw (the random method, a scorer's random fallback) is the same in every run, process and order."""
    digest = hashlib.sha256(f"{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """RGB: transparency composited onto `background` (transformers' convert_to_rgb and qwen-vl-utils
    use white), or dropped when it is None (VILA's own `convert("RGB")`)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if background is None or not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def load_image(image: Image.Image | str | Path, background: tuple[int, int, int] | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (alpha: see `to_rgb`); one-line InputError if unreadable."""
    if isinstance(image, Image.Image):
        return to_rgb(image, background)
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return to_rgb(img, background)
    except Exception as err:  # PIL raises several types for corrupt files
        raise InputError(f"unreadable image {path}: {type(err).__name__}") from None


@dataclass
class Sample:
    """One visual question.

    Exactly one of `images` / `video` carries the visual input; `question` is the user text after it.  `video` is either a path to a
    video file (read by `data.video.read_frames` with the adapter's frame budget) or an
    already decoded list of frames.
    """

    id: str
    question: str
    images: list[Image.Image] = field(default_factory=list)
    video: str | Path | list[Image.Image] | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # A benchmark's pinned prompt, as VLMEvalKit lays out its message: `preamble` is user text that comes
    # before the visual input (each family places it as its VLMEvalKit model does), and `verbatim` keeps
    # the question's leading / trailing whitespace (a data source's free text is stripped).
    preamble: str = ""
    verbatim: bool = False

    @property
    def modality(self) -> str:
        if self.video is not None:
            return "video"
        return "image" if self.images else "text"


def require_question(text: str | None) -> str:
    """`text` unchanged if it holds a non-whitespace character; else RowError ("no question" when
    missing, "empty question" when empty or whitespace only).

    Readers apply it to the source's own question *before* a prompt template wraps it: the template's
    fixed text ("Question: ... Options: ...", "... Please answer yes or no.") would otherwise hide a
    blank question from the model's check of the final prompt, and the model would be asked nothing."""
    if text is None:
        raise RowError("no question")
    if not isinstance(text, str):
        raise RowError(f"question is not text ({type(text).__name__})")
    if not text.strip():
        raise RowError("empty question" + (" (whitespace only)" if text else ""))
    return text


@dataclass(frozen=True)
class DeferredSample:
    """A sample made only when it is used: `id` up front, `read()` builds the Sample.  A stream whose
    reading is real work (the synthetic task renders its images) yields these from `stream()`, so
    each loader worker reads only its own share (data.prefetch)."""

    id: str
    read: Callable[[], Sample]
