"""LLaVA-OneVision adapter: SigLIP + Qwen2, anyres images, 2x2-pooled video frames, 1-D RoPE.

No `LlavaOnevisionProcessor` is used: its constructor type-checks a video processor that needs
torchvision.  Everything it does is done here, following transformers'
`processing_llava_onevision.py` / `modeling_llava_onevision.py`:

* the prompt is the checkpoint's chat template (the llava-hf one, pinned below, when the
  checkpoint has none): "<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n";
* each `<image>` / `<video>` is expanded in the text to one placeholder per visual token, with the
  processor's count (anyres grid, unpadding, `anyres_max_N` downscaling, newline tokens), then the
  text is tokenised;
* images go through `LlavaOnevisionImageProcessorPil` (base thumbnail + anyres crops);
* video frames are resized straight to the vision tower's size and normalised like
  `LlavaOnevisionVideoProcessor` does, but with PIL bicubic resampling (the Pil backend; the
  original LLaVA-OneVision code also resizes frames with the PIL-based SigLIP processor) instead of
  torchvision's, so pixel values can differ from the torchvision video processor in the last bits.

Visual token layout (the order of `visual_index`), recorded per segment in
`prompt.meta["visual_segments"]`:

* one image (anyres): the base thumbnail's p x p patch grid (p = image_size // patch_size, 27 for
  the 7B model), then the high-resolution crop map of `rows` x `cols` tokens (unpadded to the
  image's aspect ratio and bilinearly downscaled under `anyres_max_N`), row-major, with one
  `image_newline` token closing every row (rows x (cols + 1) tokens);
* several images (LLaVA-OneVision's multi-image mode, as the HF model runs it for a multi-image
  prompt): per image its p x p base grid (padded to a square, no crops) and one newline token;
* a video: T frames of ceil(p/2) x ceil(p/2) pooled tokens (14 x 14 for the 7B model), then one
  newline token for the whole video.

`visual_grid` = (t, h, w) is the main spatial grid: (1, rows, cols) of the crop map for one image,
(n_images, p, p) for several images, (T, ceil(p/2), ceil(p/2)) for a video.  Unlike Qwen2-VL,
t*h*w is smaller than the number of visual tokens (the base thumbnail and the newline tokens are
outside the grid); the segments above give the exact position of every visual token.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.utils import cached_file

from explain_prune.core import InputError, Sample
from explain_prune.models.base import (
    HOST,
    VLM,
    DecoderParts,
    HostInputs,
    VisualPrompt,
    checkpoint_path,
    instruction_positions,
    torch_dtype,
)
from explain_prune.models.tiny import (
    build_tokenizer,
    tiny_lm_kwargs,
    tiny_siglip_kwargs,
)
from explain_prune.models.vision_attention import siglip_token_stats

# chat_template.json of llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-{si,ov}-hf (no default system
# turn).  Used for the tiny model and for checkpoints that ship no template.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
EOS_TOKEN = "<|im_end|>"
QUESTION_SENTINEL = "\x00question\x00"  # rendered in place of the question to locate it in the prompt text
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # the llava-hf checkpoints' image_mean / image_std


def tiny_llava_ov_config(tiny: Mapping[str, Any], tokenizer: Any, attn_implementation: str) -> LlavaOnevisionConfig:
    """SigLIP (no head) + Qwen2 at toy sizes; the anyres pinpoints are multiples of the tower size."""
    ids = tokenizer.convert_tokens_to_ids
    vision = tiny.get("vision", {})
    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            **tiny_lm_kwargs(tiny, tokenizer),
            bos_token_id=None,
            eos_token_id=ids(EOS_TOKEN),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(model_type="siglip_vision_model", **tiny_siglip_kwargs(vision, image_size=56)),
        image_token_index=ids(IMAGE_TOKEN),
        video_token_index=ids(VIDEO_TOKEN),
        image_grid_pinpoints=[list(map(int, p)) for p in tiny["image_grid_pinpoints"]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        attn_implementation=attn_implementation,
    )


def anyres_grid(
    image_size: tuple[int, int],
    grid_pinpoints: list[list[int]],
    tile: int,
    patches: int,
    vision_aspect_ratio: str,
) -> tuple[int, int]:
    """(rows, cols) of the high-resolution crop feature map of one (H, W) image, newline excluded.

    The processor's `_get_number_of_features` / `_get_unpadded_features` arithmetic: the best
    pinpoint gives scale_h x scale_w tiles of `patches` x `patches` features, the map is unpadded to
    the image's aspect ratio, and shrunk by `ratio` when it exceeds anyres_max_N tiles by > 10 %.
    """
    orig_h, orig_w = image_size
    best_h, best_w = select_best_resolution([orig_h, orig_w], grid_pinpoints)
    cur_h, cur_w = patches * (best_h // tile), patches * (best_w // tile)
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    max_tiles = int(vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * patches**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return cur_h, cur_w


def checkpoint_chat_template(path: str) -> str | None:
    """The processor's chat template shipped with a checkpoint: chat_template.json (the processor's
    file in the released llava-hf folders), else chat_template.jinja (what transformers 5 saves).
    It comes before the tokenizer's own template, as in transformers' processor: the released
    tokenizer carries Qwen2's text-only ChatML, which cannot render image / video content."""
    kw = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    js = cached_file(path, "chat_template.json", **kw)
    if js:
        template = json.loads(Path(js).read_text()).get("chat_template")
        if template:
            return template
    jinja = cached_file(path, "chat_template.jinja", **kw)
    return Path(jinja).read_text() if jinja else None


def checkpoint_video_settings(path: str) -> dict[str, Any]:
    """size / mean / std / resample / rescale_factor from the checkpoint's video_preprocessor_config.json."""
    kw = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    js = cached_file(path, "video_preprocessor_config.json", **kw)
    if not js:
        return {}
    raw = json.loads(Path(js).read_text())
    keys = ("size", "image_mean", "image_std", "resample", "rescale_factor")
    return {k: raw[k] for k in keys if k in raw}


@dataclass
class _VisualInput:
    """One sample's visual side before the language model (see LlavaOneVision._visual_input)."""

    # pixel_values [1 or n, patches, C, S, S], image_sizes [n, 2], batch_num_images [1];
    # or pixel_values_videos [1, T, C, S, S]
    pixels: dict[str, torch.Tensor]
    segments: list[dict[str, Any]]  # meta["visual_segments"], in prompt order
    token: str  # IMAGE_TOKEN or VIDEO_TOKEN: the placeholder in the template text
    token_id: int
    spans: list[int]  # visual tokens per placeholder (one per image, one for the video)
    grid: tuple[int, int, int]  # VisualPrompt.visual_grid

    @property
    def video(self) -> bool:
        return self.token == VIDEO_TOKEN


class LlavaOneVision(VLM):
    family = "llava_onevision"
    alpha_background = (255, 255, 255)  # transparency onto white, as its processor (do_convert_rgb) does

    def __init__(
        self,
        name: str,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer: Any,
        image_processor: LlavaOnevisionImageProcessorPil,
        num_frames: int,
        frame_sampling: str,
        chat_template: str,
        video_settings: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
    ):
        super().__init__(name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_frames = int(num_frames)
        self.frame_sampling = frame_sampling
        self.chat_template = chat_template
        self.system_prompt = system_prompt or None
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full":
            raise InputError(
                f"model {name}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not supported "
                "(SigLIP has no CLS token; the llava-hf checkpoints use 'full')"
            )
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.tile = int(cfg.vision_config.image_size)
        self.patch_size = int(cfg.vision_config.patch_size)
        # read here: preprocess runs without the model (HostStage)
        self.vision_aspect_ratio = str(cfg.vision_aspect_ratio)
        self.grid_pinpoints = [[int(v) for v in pair] for pair in cfg.image_grid_pinpoints]
        self.patches = self.tile // self.patch_size  # p: base grid side
        self.pooled = math.ceil(self.patches / 2)  # video grid side after 2x2 bilinear pooling
        proc_size = image_processor.size
        if (proc_size.height, proc_size.width) != (self.tile, self.tile):
            raise InputError(
                f"model {name}: image processor size {proc_size.height}x{proc_size.width} "
                f"!= vision tower size {self.tile}"
            )
        video = dict(video_settings or {})
        size = video.get("size") or {"height": self.tile, "width": self.tile}
        self.video_size = SizeDict(height=int(size["height"]), width=int(size["width"]))
        self.video_mean = tuple(video.get("image_mean", image_processor.image_mean))
        self.video_std = tuple(video.get("image_std", image_processor.image_std))
        self.video_resample = video.get("resample", image_processor.resample)
        self.video_rescale = float(video.get("rescale_factor", image_processor.rescale_factor))

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], modality: Mapping[str, Any] | None = None) -> "LlavaOneVision":
        name = str(cfg.get("name", "llava_onevision"))
        if cfg.get("trust_remote_code"):
            raise InputError(
                f"model {name}: trust_remote_code is not supported (LLaVA-OneVision is native to transformers)"
            )
        dtype = torch_dtype(cfg.get("dtype", "float32"))
        attn = cfg.get("attn_implementation", "sdpa")
        image_cfg, video_cfg = cfg.get("image") or {}, cfg.get("video") or {}
        video_settings: dict[str, Any] = {}
        if cfg.get("pretrained"):
            path = checkpoint_path(cfg)
            try:
                model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                    path, dtype=dtype, attn_implementation=attn
                )
                tokenizer = AutoTokenizer.from_pretrained(path)
                image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
            except OSError as err:
                raise InputError(f"model {name}: cannot load {path!r}: {str(err).splitlines()[0]}") from None
            chat_template = checkpoint_chat_template(path) or tokenizer.chat_template or LLAVA_OV_CHAT_TEMPLATE
            video_settings = checkpoint_video_settings(path)
        else:
            tiny = cfg["tiny"]
            tokenizer = build_tokenizer()
            tokenizer.chat_template = LLAVA_OV_CHAT_TEMPLATE
            torch.manual_seed(int(tiny.get("seed", 0)))
            model = LlavaOnevisionForConditionalGeneration(tiny_llava_ov_config(tiny, tokenizer, attn)).to(dtype)
            tile = int(model.config.vision_config.image_size)
            image_processor = LlavaOnevisionImageProcessorPil(
                size={"height": tile, "width": tile},
                image_grid_pinpoints=model.config.image_grid_pinpoints,
                image_mean=list(SIGLIP_MEAN),
                image_std=list(SIGLIP_STD),
            )
            chat_template = LLAVA_OV_CHAT_TEMPLATE
        if image_cfg.get("vision_aspect_ratio"):
            model.config.vision_aspect_ratio = str(image_cfg["vision_aspect_ratio"])
        # the processor must tile with the model's pinpoints, whatever the preprocessor file said
        image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints
        eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        modality = modality or {}
        return cls(
            name=name,
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            num_frames=int(modality.get("num_frames") or video_cfg.get("num_frames", 8)),
            frame_sampling=str(modality.get("sampling") or video_cfg.get("sampling", "linspace")),
            chat_template=chat_template,
            video_settings=video_settings,
            system_prompt=cfg.get("system_prompt"),
        )

    # --- prompt and pixels --------------------------------------------------------------------
    def prompt_text(self, question: str, num_images: int = 0, video: bool = False) -> str:
        """The chat-template text of one user turn (visual placeholders unexpanded), ending at the answer."""
        content = [{"type": "image"}] * num_images + ([{"type": "video"}] if video else [])
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def image_segments(self, image_sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Visual-token segments of the images (see the module docstring), in prompt order."""
        p, segments, start = self.patches, [], 0
        multi = len(image_sizes) > 1
        for i, size in enumerate(image_sizes):
            if multi:
                segments.append(dict(kind="base", image=i, start=start, t=1, rows=p, cols=p, newline="end"))
                start += p * p + 1
                continue
            rows, cols = anyres_grid(
                size, self.grid_pinpoints, self.tile, p, self.vision_aspect_ratio
            )
            segments.append(dict(kind="base", image=i, start=start, t=1, rows=p, cols=p, newline=None))
            start += p * p
            segments.append(dict(kind="crops", image=i, start=start, t=1, rows=rows, cols=cols, newline="row"))
            start += rows * (cols + 1)
        return segments

    def video_segments(self, num_frames: int) -> list[dict[str, Any]]:
        q = self.pooled
        return [dict(kind="frames", image=None, start=0, t=num_frames, rows=q, cols=q, newline="end")]

    @staticmethod
    def segment_tokens(segment: Mapping[str, Any]) -> int:
        grid = segment["t"] * segment["rows"] * segment["cols"]
        if segment["newline"] == "row":
            return grid + segment["t"] * segment["rows"]
        return grid + (1 if segment["newline"] == "end" else 0)

    def image_pixels(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """pixel_values [1 or n, patches, C, S, S], image_sizes [n, 2] (H, W), batch_num_images [1].

        The images of one sample are passed as one nested list, as the HF processor does for a
        chat-template prompt: one image -> anyres crops, several -> LLaVA-OneVision multi-image mode.
        """
        out = self.image_processor(images=[images], return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}

    def video_pixels(self, frames: list[Image.Image]) -> torch.Tensor:
        """Frames -> pixel_values_videos [1, T, C, H, W]: resize to the tower size, rescale, normalise."""
        proc = self.image_processor
        arrays = []
        for frame in frames:
            arr = np.asarray(frame.convert("RGB")).transpose(2, 0, 1)
            arr = proc.resize(arr, size=self.video_size, resample=self.video_resample)
            arr = proc.normalize(proc.rescale(arr, self.video_rescale), self.video_mean, self.video_std)
            arrays.append(np.asarray(arr, dtype=np.float32))
        return torch.from_numpy(np.stack(arrays))[None]

    # --- the contract -----------------------------------------------------------------------------
    def question_text(self, sample: Sample) -> str:
        """The question as given, after the preamble: VLMEvalKit's LLaVA-OneVision puts all text after
        the visual input (`generate_inner_video`).  A typed <image> / <video> would be expanded as a
        visual span, so it is refused."""
        question = sample.preamble + (sample.question or "")
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):
            if token in question:
                raise InputError(f"sample {sample.id!r}: question contains the reserved placeholder {token}")
        return question

    def preprocess(self, sample: Sample) -> HostInputs:
        """Pixels first (they fix the token counts), then the expanded text and its ids."""
        with HOST:
            question, images = self._read_sample(sample)
            visual = self._visual_input(images, video=sample.video is not None)
            text, question_chars = self._expanded_text(sample.id, question, visual)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            input_ids = torch.tensor([enc["input_ids"]])  # [1, L]
            visual_index = (input_ids[0] == visual.token_id).nonzero().squeeze(-1)  # [N_v]
        return HostInputs(
            sample_id=sample.id,
            modality=sample.modality,
            input_ids=input_ids,
            visual_index=visual_index,
            instruction_index=self._question_index(sample.id, input_ids, visual_index, enc["offset_mapping"], question_chars),
            visual_grid=visual.grid,
            pixels=visual.pixels,
            layout={"visual_segments": visual.segments, "spans": visual.spans},
        )

    def encode(self, host: HostInputs) -> VisualPrompt:
        input_ids = host.input_ids.to(self.device)
        return VisualPrompt(
            inputs_embeds=self._embed(host, input_ids),
            position_ids=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),
            attention_mask=torch.ones_like(input_ids),
            input_ids=input_ids,
            visual_index=host.visual_index,
            instruction_index=host.instruction_index,
            visual_grid=host.visual_grid,
            sample_id=host.sample_id,
            meta={**host.pixels, "visual_segments": host.layout["visual_segments"], "modality": host.modality},
        )

    def _visual_input(self, images: list[Image.Image], video: bool) -> _VisualInput:
        """Pixels and token layout of the images or the video frames, computed before any text so
        the placeholders can be expanded to exactly as many tokens as the model will produce."""
        if video:
            segments = self.video_segments(len(images))
            return _VisualInput(
                pixels={"pixel_values_videos": self.video_pixels(images)},
                segments=segments,
                token=VIDEO_TOKEN,
                token_id=self.video_token_id,
                spans=[sum(self.segment_tokens(s) for s in segments)],
                grid=(len(images), self.pooled, self.pooled),
            )
        pixels = self.image_pixels(images)
        sizes = [tuple(int(v) for v in hw) for hw in pixels["image_sizes"].tolist()]
        segments = self.image_segments(sizes)
        crops = [s for s in segments if s["kind"] == "crops"]
        return _VisualInput(
            pixels=pixels,
            segments=segments,
            token=IMAGE_TOKEN,
            token_id=self.image_token_id,
            spans=[sum(self.segment_tokens(s) for s in segments if s["image"] == i) for i in range(len(images))],
            grid=(1, crops[0]["rows"], crops[0]["cols"]) if crops else (len(images), self.patches, self.patches),
        )

    def _expanded_text(self, sample_id: str, question: str, visual: _VisualInput) -> tuple[str, tuple[int, int]]:
        """The prompt text with every placeholder expanded to its span, as the processor's
        get_text_with_replacements does, and the question's (start, end) characters in it.  The
        template is rendered around a sentinel so the question is found wherever the template puts it."""
        num_images = 0 if visual.video else len(visual.spans)
        template = self.prompt_text(QUESTION_SENTINEL, num_images=num_images, video=visual.video)
        pieces = template.split(visual.token)
        if len(pieces) != len(visual.spans) + 1:
            raise InputError(
                f"sample {sample_id!r}: chat template produced {len(pieces) - 1} {visual.token} "
                f"for {len(visual.spans)} inputs"
            )
        expanded = pieces[0] + "".join(visual.token * n + rest for n, rest in zip(visual.spans, pieces[1:]))
        start = expanded.index(QUESTION_SENTINEL)
        return expanded.replace(QUESTION_SENTINEL, question), (start, start + len(question))

    @torch.no_grad()
    def _embed(self, host: HostInputs, input_ids: torch.Tensor) -> torch.Tensor:
        """[1, L, d]: the LM's token embeddings with the projected visual features scattered at the
        placeholders.  The model's feature counts are checked against the expanded spans, so a
        processor / model disagreement is a one-line error rather than shifted features."""
        model, device = self.model.model, self.device
        embeds = self.decoder.embed_tokens(input_ids)
        pixels, spans = host.pixels, host.layout["spans"]
        if "pixel_values_videos" in pixels:
            out = model.get_video_features(pixels["pixel_values_videos"].to(device=device, dtype=self.dtype))
            feats = out.pooler_output.flatten(0, 1)  # [T * q * q + 1, d]
            feature_lens = [int(feats.shape[0])]
        else:
            out = model.get_image_features(
                pixels["pixel_values"].to(device=device, dtype=self.dtype),
                pixels["image_sizes"].to(device),
                batch_num_images=pixels["batch_num_images"].to(device),
            )
            feature_lens = [int(f.shape[0]) for f in out.pooler_output]
            feats = torch.cat(out.pooler_output)  # [N_v, d]
        if feature_lens != spans or host.visual_index.numel() != sum(spans):
            raise InputError(
                f"sample {host.sample_id!r}: visual features {feature_lens} do not match placeholders {spans} "
                f"(image sizes {pixels.get('image_sizes', torch.empty(0)).tolist()})"
            )
        visual_mask = torch.zeros(input_ids.shape[1], dtype=torch.bool, device=device)
        visual_mask[host.visual_index.to(device)] = True
        mask = visual_mask.view(1, -1, 1).expand_as(embeds)
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    @staticmethod
    def _question_index(
        sample_id: str,
        input_ids: torch.Tensor,
        visual_index: torch.Tensor,
        offsets: list[tuple[int, int]],
        question_chars: tuple[int, int],
    ) -> torch.Tensor:
        """[N_u] positions of the question's tokens, from character offsets: the template tokens
        between the visual span and the question (the "\\n" after <image>) depend on the tokenizer,
        so they are measured, not assumed; the assistant-opening suffix is excluded."""
        q_start, q_end = question_chars
        in_question = [i for i, (a, b) in enumerate(offsets) if b > a and a >= q_start and b <= q_end]
        if not in_question:
            raise InputError(f"sample {sample_id!r}: question produced no tokens")
        skip = in_question[0] - (int(visual_index.max()) + 1)
        suffix_len = input_ids.shape[1] - (in_question[-1] + 1)
        return instruction_positions(input_ids, visual_index, suffix_len, skip=skip)

    @property
    def decoder(self) -> DecoderParts:
        return DecoderParts.of(self.model.model.language_model, self.model.lm_head)

    @torch.no_grad()
    def vision_token_scores(self, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's statistics (methods/visionzip.py) at SigLIP layer `layer`: (attention each patch
        receives within its tile / frame [N_v], head-mean keys [N_v, head_dim]) in `visual_index` order.

        The per-patch statistics go through the model's own placement of the projected features —
        `pack_image_features` (base grid, anyres crops, unpadding, bilinear anyres_max downscaling) or
        `apply_pooling` (bilinear 2x2 video pooling) — so every LLM token gets the statistics of the
        patches its feature was made from.  Newline tokens are not patches: score +inf (VisionZip keeps
        them among the dominant tokens, as it keeps [CLS]) and zero keys.
        """
        model, meta, device = self.model.model, prompt.meta, self.device
        if "pixel_values_videos" in meta:
            pixels = meta["pixel_values_videos"].to(device=device, dtype=self.dtype)
            run = functools.partial(model.get_video_features, pixels)
        elif "pixel_values" in meta:
            sizes = meta["image_sizes"].to(device)
            pixels = meta["pixel_values"].to(device=device, dtype=self.dtype)
            run = functools.partial(model.get_image_features, pixels, sizes, batch_num_images=meta["batch_num_images"].to(device))
        else:
            raise InputError(f"sample {prompt.sample_id!r}: the prompt carries no pixel values")
        received, keys = siglip_token_stats(model.vision_tower, layer, run)  # [tiles, p*p], [tiles, p*p, hd]
        stats = torch.cat([received[..., None], keys], -1)  # [tiles, p*p, 1 + hd]
        newline = torch.zeros(stats.shape[-1], dtype=stats.dtype, device=stats.device)
        newline[0] = math.inf
        if "pixel_values_videos" in meta:
            tokens = torch.cat([model.apply_pooling(stats).flatten(0, 1), newline[None]])
        else:
            n_images = len(sizes)
            per_image = [stats.shape[0]] if n_images == 1 else [1] * n_images  # anyres tiles / multi-image bases
            packed, _ = model.pack_image_features(
                torch.split(stats, per_image), sizes, image_newline=newline, vision_aspect_ratio=self.vision_aspect_ratio
            )
            tokens = torch.cat(packed)
        if tokens.shape[0] != prompt.num_visual:
            raise InputError(f"sample {prompt.sample_id!r}: {tokens.shape[0]} vision statistics for {prompt.num_visual} visual tokens")
        return tokens[:, 0].cpu(), tokens[:, 1:].cpu()

    def visual_token_boxes(self, prompt: VisualPrompt, image_sizes: Any = None) -> torch.Tensor:
        """[N_v, 7] (see VLM.visual_token_boxes), segment by segment (`meta["visual_segments"]`):

        * one image's base grid (view 0): the image stretched to the square tile;
        * a multi-image base grid (view 0): the image padded to a centred square, then stretched;
        * anyres crops (view 1): the processor resizes the image into the best pinpoint canvas
          (centred, zero-padded) cut into tiles; the crop map is unpadded as `unpad_image` does and,
          when shrunk under anyres_max_N, each token stands for its share of the unpadded map;
        * video frames: each frame stretched to the tile, p x p patches pooled to ceil(p/2)^2 tokens.
        p patches of `patch_size` px may stop short of the tile edge (SigLIP 384/14: 378 px), so the
        last pixels of each tile feed no token.  Newline tokens: NO_PLACE.
        """
        from transformers.image_processing_utils import get_patch_output_size
        from transformers.image_utils import ChannelDimension
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            unpad_image,
        )

        p, tile = self.patches, self.tile
        patch = self.patch_size

        def shares(n: int, m: int) -> torch.Tensor:
            """[m, 2] (start, end) of m equal shares of n feature cells, in feature units."""
            return (torch.arange(m + 1, dtype=torch.float64) * n / m).unfold(0, 2, 1)

        def pixels(f: torch.Tensor) -> torch.Tensor:
            """Feature-unit (start, end) [m, 2] -> pixels of a canvas of tiles, p patches per tile."""
            lo = torch.floor(f[:, 0] / p)  # tile of each start
            hi = torch.ceil(f[:, 1] / p) - 1  # tile of each (exclusive) end
            return torch.stack([lo * tile + (f[:, 0] - lo * p) * patch, hi * tile + (f[:, 1] - hi * p) * patch], -1)

        newline = torch.tensor([self.NO_PLACE], dtype=torch.float64)
        sizes = prompt.meta["image_sizes"].tolist() if "image_sizes" in prompt.meta else []
        parts = []
        for seg in prompt.meta["visual_segments"]:
            rows, cols = int(seg["rows"]), int(seg["cols"])
            if seg["kind"] == "frames":
                ys, xs = pixels(shares(p, rows)) / tile, pixels(shares(p, cols)) / tile
                parts += [self.grid_token_boxes(t, t + 1, 0, ys, xs) for t in range(int(seg["t"]))]
            elif seg["kind"] == "base":
                i = int(seg["image"])
                height, width = sizes[i]
                side = max(height, width) if seg["newline"] == "end" else None  # multi-image: padded square
                ys, xs = pixels(shares(p, rows)) / tile, pixels(shares(p, cols)) / tile
                if side is not None:  # pad_to_square centres the image on its longer side
                    ys = (ys * side - (side - height) // 2) / height
                    xs = (xs * side - (side - width) // 2) / width
                parts.append(self.grid_token_boxes(i, i + 1, 0, ys, xs))
            else:  # anyres crops
                i = int(seg["image"])
                height, width = sizes[i]
                best_h, best_w = select_best_resolution([height, width], self.grid_pinpoints)
                # the resized image's size inside the canvas, as the processor computes it (no pixels needed)
                new_h, new_w = get_patch_output_size(np.empty((0, height, width)), (best_h, best_w), ChannelDimension.FIRST)
                full_h, full_w = p * (best_h // tile), p * (best_w // tile)
                kept_h, kept_w = unpad_image(torch.empty(0, full_h, full_w), [height, width]).shape[1:]
                fy = shares(kept_h, rows) + (full_h - kept_h) // 2
                fx = shares(kept_w, cols) + (full_w - kept_w) // 2
                ys = (pixels(fy) - (best_h - new_h) // 2) / new_h
                xs = (pixels(fx) - (best_w - new_w) // 2) / new_w
                grid = self.grid_token_boxes(i, i + 1, 1, ys, xs).view(rows, cols, 7)
                parts.append(torch.cat([grid, newline.expand(rows, 1, 7)], 1).flatten(0, 1))  # a newline per row
            if seg["newline"] == "end":
                parts.append(newline)
        return torch.cat(parts)
