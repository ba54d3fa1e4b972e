"""Qwen2-VL adapter: dynamic-resolution images and videos, 3-D M-RoPE positions.

No `Qwen2VLProcessor` is used: its constructor type-checks a video processor that needs
torchvision.  The prompt text and placeholder expansion are built here exactly as the processor
does (one `<|image_pad|>` / `<|video_pad|>` per merged 2x2 patch), images go through the Pil
image processor, and video frames are resized/normalised with the same processor and patchified
with the temporal patch layout of `Qwen2VLVideoProcessor`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

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
from explain_prune.models.tiny import build_tokenizer, tiny_lm_kwargs
from explain_prune.models.vision_attention import (
    capture_call,
    received_attention,
    vision_block,
)

SYSTEM_PROMPT = "You are a helpful assistant."
ASSISTANT_OPEN = "<|im_end|>\n<|im_start|>assistant\n"  # closes the user turn, opens the answer

VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils: frames below this many pixels are upscaled to it


def tiny_qwen2vl_config(tiny: Mapping[str, Any], tokenizer: Any, attn_implementation: str) -> Qwen2VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    vision = tiny.get("vision", {})
    return Qwen2VLConfig(
        text_config=dict(
            **tiny_lm_kwargs(tiny, tokenizer),
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(tiny["mrope_section"])},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=vision.get("depth", 2),
            embed_dim=vision.get("embed_dim", 32),
            hidden_size=tiny["hidden_size"],
            num_heads=vision.get("num_heads", 4),
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=tiny.get("initializer_range", 0.02),
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        initializer_range=tiny.get("initializer_range", 0.02),
        attn_implementation=attn_implementation,
    )


class Qwen2VL(VLM):
    family = "qwen2vl"
    alpha_background = (255, 255, 255)  # transparency onto white, as transformers and qwen-vl-utils do

    def __init__(
        self,
        name: str,
        model: Qwen2VLForConditionalGeneration,
        tokenizer: Any,
        image_processor: Qwen2VLImageProcessorPil,
        video_max_pixels: int,
        video_min_pixels: int,
        num_frames: int,
        frame_sampling: str,
    ):
        super().__init__(name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_max_pixels = int(video_max_pixels)
        self.video_min_pixels = int(video_min_pixels)
        self.num_frames = int(num_frames)
        self.frame_sampling = frame_sampling
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.patch = int(cfg.vision_config.patch_size)
        self.temporal_patch = int(cfg.vision_config.temporal_patch_size)
        self._suffix_len = len(tokenizer(ASSISTANT_OPEN, add_special_tokens=False)["input_ids"])

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], modality: Mapping[str, Any] | None = None) -> "Qwen2VL":
        dtype = torch_dtype(cfg.get("dtype", "float32"))
        attn = cfg.get("attn_implementation", "sdpa")
        image_cfg, video_cfg = cfg.get("image", {}), cfg.get("video", {})
        if cfg.get("pretrained"):
            path = checkpoint_path(cfg)
            try:
                model = Qwen2VLForConditionalGeneration.from_pretrained(
                    path, dtype=dtype, attn_implementation=attn, trust_remote_code=bool(cfg.get("trust_remote_code", False))
                )
                tokenizer = AutoTokenizer.from_pretrained(path)
            except OSError as err:
                raise InputError(f"model {cfg.get('name')}: cannot load {path!r}: {str(err).splitlines()[0]}") from None
        else:
            tiny = cfg["tiny"]
            tokenizer = build_tokenizer()
            torch.manual_seed(int(tiny.get("seed", 0)))
            model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(tiny, tokenizer, attn)).to(dtype)
            model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=int(image_cfg.get("min_pixels", 56 * 56)),
            max_pixels=int(image_cfg.get("max_pixels", 28 * 28 * 1280)),
        )
        modality = modality or {}
        return cls(
            name=str(cfg.get("name", "qwen2vl")),
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            video_max_pixels=int(video_cfg.get("max_pixels", 384 * 28 * 28)),
            video_min_pixels=int(video_cfg.get("min_pixels", VIDEO_MIN_PIXELS)),
            num_frames=int(modality.get("num_frames") or video_cfg.get("num_frames", 8)),
            frame_sampling=str(modality.get("sampling") or video_cfg.get("sampling", "linspace")),
        )

    # --- prompt and pixels --------------------------------------------------------------------
    @staticmethod
    def prompt_text(question: str, visual_placeholders: str, preamble: str = "") -> str:
        """The chat-template text of one user turn with its visual span, ending at the answer.  A
        preamble stays before the visual span, as VLMEvalKit's Qwen2-VL keeps its message order."""
        return (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            f"{preamble}{visual_placeholders}{question}{ASSISTANT_OPEN}"
        )

    def image_pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values [sum patches, C*tps*14*14], image_grid_thw [n_images, 3]."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def video_pixels(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> pixel_values_videos [gt*gh*gw, C*tps*14*14], video_grid_thw [1, 3].

        Frames are resized/rescaled/normalised by the image processor (same budget rule, with the
        video pixel budget), an odd frame count repeats the last frame, then consecutive frame
        pairs become one temporal patch, as Qwen2VLVideoProcessor lays them out.
        """
        proc = self.image_processor
        factor = self.patch * self.merge
        size = SizeDict(shortest_edge=self.video_min_pixels, longest_edge=max(self.video_max_pixels, self.video_min_pixels))
        arrays = []
        for frame in frames:
            arr = np.asarray(frame.convert("RGB")).transpose(2, 0, 1)
            arr = proc.resize(arr, size=size, resample=proc.resample, factor=factor)
            arr = proc.normalize(proc.rescale(arr, proc.rescale_factor), proc.image_mean, proc.image_std)
            arrays.append(np.asarray(arr, dtype=np.float32))
        if len(arrays) % self.temporal_patch:
            arrays += [arrays[-1]] * (self.temporal_patch - len(arrays) % self.temporal_patch)
        video = np.stack(arrays)  # [T, C, H, W]
        t, c, h, w = video.shape
        gt, gh, gw = t // self.temporal_patch, h // self.patch, w // self.patch
        m, p, tp = self.merge, self.patch, self.temporal_patch
        patches = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * p * p)
        return torch.from_numpy(np.ascontiguousarray(patches)), torch.tensor([[gt, gh, gw]])

    # --- the contract -----------------------------------------------------------------------------
    def preprocess(self, sample: Sample) -> HostInputs:
        with HOST:
            question, images = self._read_sample(sample)
            video = sample.video is not None
            pixels, grid = self.video_pixels(images) if video else self.image_pixels(images)
            pad_id = self.video_token_id if video else self.image_token_id
            pad_token = self.tokenizer.convert_ids_to_tokens(pad_id)
            counts = (grid.prod(-1) // self.merge**2).tolist()
            span = "".join(f"<|vision_start|>{pad_token * n}<|vision_end|>" for n in counts)
            input_ids = self.tokenizer(self.prompt_text(question, span, sample.preamble), return_tensors="pt", add_special_tokens=False)[
                "input_ids"
            ]  # [1, L]
            visual_index = (input_ids[0] == pad_id).nonzero().squeeze(-1)
        t = int(grid[:, 0].sum())
        h, w = int(grid[0, 1]) // self.merge, int(grid[0, 2]) // self.merge
        return HostInputs(
            sample_id=sample.id,
            modality=sample.modality,
            input_ids=input_ids,
            visual_index=visual_index,
            instruction_index=instruction_positions(input_ids, visual_index, self._suffix_len, skip=1),
            visual_grid=(t, h, w),
            pixels={"pixel_values": pixels, "video_grid_thw" if video else "image_grid_thw": grid},
        )

    def encode(self, host: HostInputs) -> VisualPrompt:
        return self.encode_batch([host])[0]

    @torch.no_grad()
    def encode_batch(self, hosts: Sequence[HostInputs]) -> list[VisualPrompt]:
        """One vision-tower call per modality for all `hosts` (its attention is per image / temporal
        patch window, so samples do not mix), then each sample's embeddings and M-RoPE positions."""
        features: dict[int, list[torch.Tensor]] = {}
        for video in (False, True):
            group = [i for i, h in enumerate(hosts) if ("video_grid_thw" in h.pixels) == video]
            if not group:
                continue
            key = "video_grid_thw" if video else "image_grid_thw"
            grid = torch.cat([hosts[i].pixels[key] for i in group]).to(self.device)  # [sum images, 3]
            pixels = torch.cat([hosts[i].pixels["pixel_values"] for i in group]).to(device=self.device, dtype=self.dtype)
            vision = self.model.model.get_video_features if video else self.model.model.get_image_features
            per_image = list(vision(pixels, grid).pooler_output)  # [tokens of image j, d] each
            for i in group:
                n = hosts[i].pixels[key].shape[0]
                features[i], per_image = per_image[:n], per_image[n:]
        return [self._assemble(host, torch.cat(features[i])) for i, host in enumerate(hosts)]

    def _assemble(self, host: HostInputs, feats: torch.Tensor) -> VisualPrompt:
        """The prompt of one sample from its ids and its visual features [N_v, d]."""
        model, device = self.model.model, self.device
        video = "video_grid_thw" in host.pixels
        grid_key, kind = ("video_grid_thw", 2) if video else ("image_grid_thw", 1)
        grid = host.pixels[grid_key].to(device)
        input_ids = host.input_ids.to(device)
        pad_id = self.video_token_id if video else self.image_token_id
        visual_mask = input_ids[0] == pad_id
        mm_token_type_ids = (input_ids == pad_id).int() * kind
        attention_mask = torch.ones_like(input_ids)
        if feats.shape[0] != host.visual_index.numel():
            raise InputError(f"sample {host.sample_id!r}: {feats.shape[0]} visual features for {host.visual_index.numel()} placeholders")
        embeds = self.decoder.embed_tokens(input_ids)
        embeds[0, visual_mask] = feats.to(embeds.dtype)
        position_ids, _ = model.get_rope_index(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=None if video else grid,
            video_grid_thw=grid if video else None,
            attention_mask=attention_mask,
        )
        return VisualPrompt(
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            input_ids=input_ids,
            visual_index=host.visual_index,
            instruction_index=host.instruction_index,
            visual_grid=host.visual_grid,
            sample_id=host.sample_id,
            meta={
                "mm_token_type_ids": mm_token_type_ids,
                "pixel_values": host.pixels["pixel_values"].to(device=device, dtype=self.dtype),
                grid_key: grid,
                "modality": host.modality,
            },
        )

    @property
    def decoder(self) -> DecoderParts:
        return DecoderParts.of(self.model.model.language_model, self.model.lm_head)

    @torch.no_grad()
    def vision_token_scores(self, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's statistics (methods/visionzip.py) at ViT block `layer`: (attention each patch
        receives within its image / temporal patch [N_v], head-mean pre-RoPE keys [N_v, head_dim]),
        each averaged over the spatial_merge_size**2 patches the PatchMerger folds into one LLM token."""
        meta = prompt.meta
        grid = meta.get("image_grid_thw", meta.get("video_grid_thw"))
        pixels = meta.get("pixel_values")
        if grid is None or pixels is None:
            raise InputError(f"sample {prompt.sample_id!r}: the prompt carries no pixel_values / grid_thw")
        visual = self.model.model.visual
        attn = vision_block(visual.blocks, layer).attn
        args, kwargs = capture_call(
            attn, lambda: visual(pixels.to(device=self.device, dtype=visual.get_dtype()), grid_thw=grid.to(self.device))
        )
        x = args[0] if args else kwargs["hidden_states"]  # [seq, C] after norm1
        seq = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [seq, H, hd]
        keys = k.mean(1)  # [seq, hd], before RoPE
        q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
        bounds = kwargs["cu_seqlens"].tolist()  # one attention window per image / temporal patch
        received = torch.cat(
            [received_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), attn.scaling) for a, b in zip(bounds[:-1], bounds[1:])]
        )
        group = self.merge**2  # the merger's patches are consecutive in the ViT sequence
        scores = received.view(-1, group).mean(1)
        return scores.cpu(), keys.to(scores.dtype).view(-1, group, keys.shape[-1]).mean(1).cpu()

    def visual_token_boxes(self, prompt: VisualPrompt, image_sizes: Any = None) -> torch.Tensor:
        """[N_v, 7] (see VLM.visual_token_boxes).  Qwen2-VL patches the whole resized image, so the
        merged (h, w) grid of each image / temporal patch tiles it in raster order; a video token
        reads frames 2t and 2t + 1 (the second may be the copy an odd frame count gets)."""
        video = "video_grid_thw" in prompt.meta
        grids = prompt.meta["video_grid_thw" if video else "image_grid_thw"]
        frames = self.temporal_patch if video else 1  # inputs per temporal patch
        parts, first = [], 0
        for t, h, w in grids.tolist():
            ys = torch.linspace(0, 1, h // self.merge + 1, dtype=torch.float64).unfold(0, 2, 1)  # [h', 2]
            xs = torch.linspace(0, 1, w // self.merge + 1, dtype=torch.float64).unfold(0, 2, 1)  # [w', 2]
            for _ in range(t):
                parts.append(self.grid_token_boxes(first, first + frames, 0, ys, xs))
                first += frames
        return torch.cat(parts)
