"""The model-family-independent contract between data, adapters, the engine and the methods.

A `VLM` adapter turns a `Sample` (images or a video + a question) into a `VisualPrompt`: the
input embeddings of the language model with the visual tokens already scattered in, their
positions, and where the visual and instruction tokens are.  It does so in two stages, so the CPU
work can run in DataLoader workers ahead of the model (`data.prefetch`): `preprocess` (read,
decode, resize, patchify, tokenize: host tensors, no model) and `encode` (vision tower and
embeddings on the model's device).  Everything downstream (the engine,
relevance, every pruning method) only sees `VisualPrompt` and the decoder parts exposed by
`VLM.decoder`, so a new model family is one new file under `models/`.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from explain_prune.core import InputError, Sample, load_image
from explain_prune.data.video import read_sample_frames

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEVICES = "auto, cpu, cuda or cuda:N"
# Host-side preprocessing (image processors, tokenizers, frame decoding) runs under `with HOST:`, so its
# tensors are made on the CPU whatever torch's default device is; everything the model reads is then
# moved to `vlm.device` explicitly (tests/test_device.py runs with the default device set to meta).
HOST = torch.device("cpu")


def resolve_device(name: Any = "auto") -> torch.device:
    """`model.device`: auto = cuda when available, else cpu; or cpu, cuda, cuda:N.  A device this
    machine does not have is a one-line InputError (checked when the config is read)."""
    name = str(name if name not in (None, "") else "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"model.device: {name!r} is not a device (allowed: {DEVICES})") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"model.device: {name!r} is not supported (allowed: {DEVICES})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"model.device={name}: CUDA is not available here (torch {torch.__version__}, {build}); use device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"model.device={name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return device


def torch_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`model.dtype`: auto = bfloat16 on cuda, float32 on cpu; or an explicit name."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def load_frames(
    sample: Sample, num_frames: int, default_rule: str, background: tuple[int, int, int] | None = None
) -> list[Image.Image]:
    """The RGB frames of a video sample: its list of images / paths as given, or `num_frames` decoded
    from its file by the sample's rule and clip bounds (`data.video.read_sample_frames`)."""
    frames = sample.video
    if not isinstance(frames, list):
        frames = read_sample_frames(frames, num_frames, sample.meta, default_rule)
    if not frames:
        raise InputError(f"sample {sample.id!r}: video has no frames")
    return [load_image(f, background) for f in frames]


def checkpoint_path(cfg: Any) -> str:
    """`cfg.pretrained` as given: a hub id, or a local directory that must exist (one-line error)."""
    path = str(cfg["pretrained"])
    if path.startswith((".", "/")) and not Path(path).is_dir():
        raise InputError(f"model {cfg.get('name')}: checkpoint directory not found: {path}")
    return path


@dataclass
class VisualPrompt:
    """One sample after the vision encoder, ready for the language model (batch dimension 1).

    position_ids is [1, L] for 1-D RoPE models and [3, 1, L] for Qwen2-VL's M-RoPE.
    visual_index lists the positions of the visual tokens (ascending); instruction_index the
    user-text positions after the visual span (the question), used by A_v^0.
    """

    inputs_embeds: torch.Tensor  # [1, L, d]
    position_ids: torch.Tensor  # [1, L] or [3, 1, L]
    attention_mask: torch.Tensor  # [1, L], 1 = real token
    input_ids: torch.Tensor  # [1, L]; visual positions hold the family's placeholder id
    visual_index: torch.Tensor  # [N_v] long, ascending
    instruction_index: torch.Tensor  # [N_u] long, ascending
    visual_grid: tuple[int, int, int]  # (t, h, w) of the visual token grid (t = frames or images)
    sample_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.inputs_embeds.shape[1])

    @property
    def num_visual(self) -> int:
        return int(self.visual_index.numel())

    def next_positions(self, n: int) -> torch.Tensor:
        """Positions of n text tokens appended after the prompt (max position + 1, + 2, ...).

        For M-RoPE all three rows advance together, which is what the model does for text.
        """
        start = int(self.position_ids.max()) + 1
        steps = torch.arange(start, start + n, device=self.position_ids.device)
        if self.position_ids.dim() == 3:
            return steps.view(1, 1, n).expand(self.position_ids.shape[0], 1, n)
        return steps.view(1, n)


@dataclass
class HostInputs:
    """One sample after the CPU stage (`VLM.preprocess`): host tensors and plain values only, so it
    travels cheaply from a DataLoader worker (tensors through shared memory).  `VLM.encode` makes
    the `VisualPrompt` from it on the model's device."""

    sample_id: str
    modality: str  # "image" | "video"
    input_ids: torch.Tensor  # [1, L] long; visual positions hold the family's placeholder id
    visual_index: torch.Tensor  # [N_v] long, ascending
    instruction_index: torch.Tensor  # [N_u] long, ascending
    visual_grid: tuple[int, int, int]
    pixels: dict[str, torch.Tensor]  # the family's vision-tower inputs (kept in VisualPrompt.meta)
    layout: dict[str, Any] = field(default_factory=dict)  # family-specific plain values (LLaVA-OV segments)

    def pin_memory(self) -> "HostInputs":
        """Page-locked copies of the tensors (DataLoader(pin_memory=True) calls this on a cuda run)."""
        return dataclasses.replace(
            self, input_ids=self.input_ids.pin_memory(), pixels={k: v.pin_memory() for k, v in self.pixels.items()}
        )


@dataclass
class DecoderParts:
    """The language model's pieces the engine drives directly (no monkeypatching)."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList  # HF decoder layers: layer(h, attention_mask=, position_embeddings=, **{cache_kwarg: cache})
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module  # rotary_emb(x, position_ids) -> (cos, sin)
    config: Any  # the text config (hidden_size, num_attention_heads, ...)

    @classmethod
    def of(cls, text_model: nn.Module, lm_head: nn.Module) -> "DecoderParts":
        """From a transformers text model (embed_tokens, layers, norm, rotary_emb, config)."""
        return cls(
            embed_tokens=text_model.embed_tokens,
            layers=text_model.layers,
            norm=text_model.norm,
            lm_head=lm_head,
            rotary_emb=text_model.rotary_emb,
            config=text_model.config,
        )

    @functools.cached_property
    def cache_kwarg(self) -> str:
        """The decoder layers' name for the KV cache argument: `cache` from transformers 5.24 on
        (`past_key_values` is deprecated there and removed in 5.40), `past_key_values` before."""
        parameters = inspect.signature(self.layers[0].forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)


class VLM(nn.Module, abc.ABC):
    """A multimodal LLM adapter: one subclass per model family.

    Subclasses set `self.model` (the underlying transformers model), `self.tokenizer`, the video
    frame budget (`num_frames`, `frame_sampling`), and implement `preprocess` (opening with the
    shared `_read_sample`; it must not touch `self.model`, see `host_stage`), `encode` and `decoder`.  `generate_reference` runs the library's own
    `generate` on the same prompt, which the tests use as the ground truth for the engine.
    """

    family: str = "base"
    # what transparent pixels become: composited onto this RGB colour, or dropped when None (core.to_rgb)
    alpha_background: tuple[int, int, int] | None = None
    num_frames: int  # frames decoded from a video file (set by each family)
    frame_sampling: str  # the frame rule when the sample names none (data.video.read_sample_frames)

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    # --- what every family implements -------------------------------------------------
    @abc.abstractmethod
    def preprocess(self, sample: Sample) -> HostInputs:
        """The CPU stage: pixels and prompt ids on the host, no model (runs in loader workers)."""

    @abc.abstractmethod
    def encode(self, host: HostInputs) -> VisualPrompt:
        """The device stage: vision tower, embeddings and positions on `self.device`."""

    def encode_batch(self, hosts: Sequence[HostInputs]) -> list[VisualPrompt]:
        """`encode` of several samples (one by one here; a family may batch its vision tower)."""
        return [self.encode(host) for host in hosts]

    def prepare(self, sample: Sample) -> VisualPrompt:
        """The sample as the family's language model sees it: both stages in this process."""
        return self.encode(self.preprocess(sample))

    def host_stage(self) -> "HostStage":
        """`preprocess` without the model, for loader workers."""
        return HostStage(self)

    def question_text(self, sample: Sample) -> str:
        """The family's reading of `sample.question` before the shared checks (default: as given).
        VILA drops the media tokens typed into the text; LLaVA-OneVision rejects them."""
        return sample.question or ""

    def _read_sample(self, sample: Sample) -> tuple[str, list[Image.Image]]:
        """The one validated prologue of every family's `preprocess`: (the question, stripped unless
        `sample.verbatim`, and the RGB images, or the video's frames when `sample.video` is set).

        One rule for all families, so a bad sample fails the same way whichever model runs it: an
        empty / whitespace-only question, both images and a video (which one was meant is unknown),
        or neither is an InputError of one line naming the sample.
        """
        question = self.question_text(sample)
        if not question.strip():
            raise InputError(f"sample {sample.id!r}: empty question")
        if not sample.verbatim:
            question = question.strip()
        if sample.video is not None and sample.images:
            raise InputError(f"sample {sample.id!r}: both images and a video given (one visual input per sample)")
        if sample.video is not None:
            return question, load_frames(sample, self.num_frames, self.frame_sampling, self.alpha_background)
        if not sample.images:
            raise InputError(f"sample {sample.id!r}: no image or video (family {self.family!r} needs a visual input)")
        return question, [load_image(img, self.alpha_background) for img in sample.images]

    @property
    @abc.abstractmethod
    def decoder(self) -> DecoderParts:
        """The LM parts the engine drives."""

    def generate_reference(self, prompt: VisualPrompt, max_new_tokens: int) -> torch.Tensor:
        """Greedy `model.generate` on the prompt's embeddings and positions: [n_new] token ids."""
        out = self.model.generate(
            inputs_embeds=prompt.inputs_embeds,
            position_ids=prompt.position_ids,
            attention_mask=prompt.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        return out[0, -max_new_tokens:] if out.shape[1] > max_new_tokens else out[0]

    # --- shared behaviour ---------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_ids[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        ids = [int(t) for t in token_ids if int(t) not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[1, n] ids -> [1, n, d] embeddings with the LM's own table."""
        return self.decoder.embed_tokens(token_ids.to(self.device))

    @contextlib.contextmanager
    def attention_implementation(self, name: str) -> Iterator[None]:
        """Temporarily switch the language model's attention kernel (e.g. to "eager" for maps)."""
        configs = [c for c in (self.model.config, self.decoder.config) if c is not None]
        previous = [c._attn_implementation for c in configs]
        try:
            for c in configs:
                c._attn_implementation = name
            yield
        finally:
            for c, p in zip(configs, previous):
                c._attn_implementation = p

    # --- where the visual tokens sit in the input (heat-maps) ------------------------------
    def visual_token_boxes(
        self, prompt: VisualPrompt, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """[N_v, 7] float64, one row per visual token in `visual_index` order:
        (first, stop, view, x0, y0, x1, y1).

        Images / frames first .. stop-1 of the sample feed the token (two frames for a Qwen2-VL
        video token); `view` tells apart the model's views of one image (LLaVA-OneVision: 0 the
        base thumbnail, 1 the anyres crops; 0 elsewhere); (x0, y0, x1, y1) is the region of that
        image / frame the token reads, as fractions of its width and height.  Tokens that read no
        pixel of the input (newline tokens, tokens over padding only) have first = stop = view = -1.
        `image_sizes` ((H, W) per image / frame) is needed only where the prompt does not fix the
        geometry (VILA with image_aspect_ratio="pad").
        """
        raise InputError(f"model family {self.family!r} does not map its visual tokens to image regions")

    NO_PLACE = (-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0)  # a `visual_token_boxes` row of a token with no region

    @staticmethod
    def grid_token_boxes(
        first: int, stop: int, view: int, y_edges: torch.Tensor, x_edges: torch.Tensor, column_major: bool = False
    ) -> torch.Tensor:
        """`visual_token_boxes` rows of an R x C token grid, row-major (or column-major, VILA's order):
        token (r, c) reads y_edges[r] x x_edges[c] ([R, 2] / [C, 2] (start, end), fractions of the
        image, clipped to it); a token whose clipped region is empty reads only padding: NO_PLACE."""
        ys, xs = y_edges.double().clamp(0, 1), x_edges.double().clamp(0, 1)
        y = ys[:, None, :].expand(len(ys), len(xs), 2)
        x = xs[None, :, :].expand(len(ys), len(xs), 2)
        if column_major:
            y, x = y.transpose(0, 1), x.transpose(0, 1)
        y, x = y.reshape(-1, 2), x.reshape(-1, 2)
        place = torch.tensor([first, stop, view], dtype=torch.float64).expand(len(y), 3)
        rows = torch.cat([place, x[:, :1], y[:, :1], x[:, 1:], y[:, 1:]], dim=-1)
        empty = (x[:, 1] <= x[:, 0]) | (y[:, 1] <= y[:, 0])
        rows[empty] = torch.tensor(VLM.NO_PLACE, dtype=torch.float64)
        return rows


class HostStage:
    """`vlm.preprocess` on a copy of the adapter without its `model`: what a DataLoader worker runs.
    It pickles the processors, tokenizer and settings only, never the weights (forkserver / spawn
    workers), and a `preprocess` that reached for the model would fail here, not silently copy it."""

    def __init__(self, vlm: VLM):
        adapter = copy.copy(vlm)  # shallow: shares the processors and tokenizer
        object.__setattr__(adapter, "_modules", {k: m for k, m in vlm._modules.items() if k != "model"})
        self.adapter = adapter

    def __call__(self, sample: Sample) -> HostInputs:
        return self.adapter.preprocess(sample)


def instruction_positions(
    input_ids: torch.Tensor, visual_index: torch.Tensor, suffix_len: int, skip: int = 0
) -> torch.Tensor:
    """User-text positions: after the last visual token (and the `skip` tokens that close the
    visual span, e.g. <|vision_end|>), before the `suffix_len` template tokens that close the user
    turn and open the assistant turn (e.g. "<|im_end|>\\n<|im_start|>assistant\\n")."""
    length = int(input_ids.shape[-1])
    start = (int(visual_index.max()) + 1 if visual_index.numel() else 0) + skip
    end = length - suffix_len
    return torch.arange(start, max(start, end), dtype=torch.long, device="cpu")  # host-side index, like visual_index
