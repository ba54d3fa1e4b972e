"""The VILA adapter: llama_3 prompt, placeholder expansion and the `VLM` contract; the tiny random model.

From the NVlabs/VILA sources: the prompt is the llama_3 conversation template (llava/conversation.py,
llama_3_chat), one "<image>\n" per image or video frame before the question (llava/eval/run_vila.py;
BasicImageEncoder / BasicVideoEncoder append "\n" after each image / frame), tokenised chunk by
chunk around "<image>" as llava/mm_utils.py tokenizer_image_token does (the checkpoint's tokenizer
decides whether a BOS is added in front of the literal "<|begin_of_text|>"; only the first chunk
keeps it).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from explain_prune.core import InputError, Sample
from explain_prune.models.base import (
    HOST,
    VLM,
    DecoderParts,
    HostInputs,
    VisualPrompt,
    instruction_positions,
    torch_dtype,
)
from explain_prune.models.tiny import (
    build_tokenizer,
    tiny_lm_kwargs,
    tiny_siglip_kwargs,
)
from explain_prune.models.vila.conversion_vila import load_original
from explain_prune.models.vila.image_processing_vila import VilaImageProcessor
from explain_prune.models.vila.modeling_vila import (
    DownSample2x2,
    MlpDownsampleProjector,
    VilaForConditionalGeneration,
)
from explain_prune.models.vision_attention import siglip_token_stats

# llava/conversation.py, llama_3_chat (the system text is VILA's, verbatim).
SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
USER_ROLE = "<|start_header_id|>user<|end_header_id|>\n\n"


@dataclass(frozen=True)
class Conversation:
    """VILA's LLAMA_3 separator style: system + sep, then role + message + sep per turn, the answer's role open."""

    sep: str  # closes every turn, and is the stop string
    assistant_role: str

    def prompt(self, user_message: str) -> str:
        return SYSTEM + self.sep + USER_ROLE + user_message + self.assistant_open

    @property
    def assistant_open(self) -> str:
        """Closes the user turn and opens the answer (what follows the question)."""
        return self.sep + self.assistant_role


# model.conversation: the llama_3_chat template of the NVlabs/VILA branch a checkpoint was trained with
CONVERSATIONS = {
    # main branch: sep <|eot_id|>, an assistant header; Llama-3-VILA1.5-8b-Fix
    "llama_3": Conversation("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # vila1.5 branch: sep <|end_of_text|>, and the answer opened with a *system* header (roles[1]); the
    # original Llama-3-VILA1.5-8B
    "llama_3_vila1.5": Conversation("<|end_of_text|>", "<|start_header_id|>system<|end_header_id|>\n\n"),
}
IMAGE_TOKEN = "<image>"
# Placeholder ids written at visual positions of `input_ids` (their embeddings are replaced).  The
# Llama-3 vocabulary has no "<image>" token; VILA itself uses the out-of-vocabulary id -200 there,
# which would break any decode of the prompt, so a reserved special token stands in.
PLACEHOLDER_CANDIDATES = ("<image>", "<|reserved_special_token_0|>")


def _token_id(tokenizer: Any, token: str) -> int | None:
    return tokenizer.get_vocab().get(token)


def placeholder_token_id(tokenizer: Any) -> int:
    """The id written at visual positions: the first of PLACEHOLDER_CANDIDATES in the vocabulary."""
    for token in PLACEHOLDER_CANDIDATES:
        tid = _token_id(tokenizer, token)
        if tid is not None:
            return int(tid)
    raise InputError(f"tokenizer has none of the placeholder tokens {PLACEHOLDER_CANDIDATES}")


def tiny_tokenizer() -> Any:
    """The project's local word-level tokenizer with Llama-3 bos/eos (<|begin_of_text|>, <|eot_id|>)."""
    tokenizer = build_tokenizer()
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    return tokenizer


def build_tiny(tiny: Mapping[str, Any], tokenizer: Any, dtype: torch.dtype, attn: str) -> VilaForConditionalGeneration:
    """A seeded random-weight VILA: tiny Llama + thin SigLIP (default 384/14 -> 27x27 -> 14x14)."""
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(tiny.get("vision", {}))
    torch.manual_seed(int(tiny.get("seed", 0)))
    llm_cfg = LlamaConfig(
        **tiny_lm_kwargs(tiny, tokenizer),
        max_position_embeddings=int(tiny.get("max_position_embeddings", 8192)),
        tie_word_embeddings=False,
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    llm_cfg._attn_implementation = attn
    llm = LlamaForCausalLM(llm_cfg)
    llm.generation_config.eos_token_id = ids("<|eot_id|>")
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.bos_token_id = ids("<|begin_of_text|>")
    vision_cfg = SiglipVisionConfig(**tiny_siglip_kwargs(vision, image_size=384))
    vision_cfg._attn_implementation = "sdpa"
    tower = SiglipVisionModel(vision_cfg)
    projector = MlpDownsampleProjector(vision_cfg.hidden_size, llm_cfg.hidden_size)
    model = VilaForConditionalGeneration(
        llm,
        tower,
        projector,
        mm_vision_select_layer=int(tiny.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=str(tiny.get("mm_vision_select_feature", "cls_patch")),
    )
    return model.to(dtype).eval()



class Vila(VLM):
    family = "vila"

    def __init__(
        self,
        name: str,
        model: VilaForConditionalGeneration,
        tokenizer: Any,
        image_processor: VilaImageProcessor,
        num_frames: int,
        frame_sampling: str,
        conversation: str = "llama_3",
    ):
        super().__init__(name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_frames = int(num_frames)
        self.frame_sampling = frame_sampling
        if conversation not in CONVERSATIONS:
            raise InputError(f"model.conversation: {conversation!r} is not allowed (allowed: {', '.join(CONVERSATIONS)})")
        self.conversation = CONVERSATIONS[conversation]
        self.placeholder_id = placeholder_token_id(tokenizer)
        self.tokens_per_image = int(model.tokens_per_image)  # read here: preprocess runs without the model
        self._newline_ids = self._encode("\n", first=False)
        self._suffix_len = len(tokenizer(self.conversation.assistant_open, add_special_tokens=False)["input_ids"])

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], modality: Mapping[str, Any] | None = None) -> "Vila":
        dtype = torch_dtype(cfg.get("dtype", "float32"))
        attn = cfg.get("attn_implementation", "sdpa")
        image_cfg, video_cfg = cfg.get("image") or {}, cfg.get("video") or {}
        if cfg.get("trust_remote_code"):
            raise InputError(f"model {cfg.get('name')}: VILA is built in-project; trust_remote_code is not used")
        if cfg.get("pretrained"):
            model, tokenizer, top = load_original(str(cfg["pretrained"]), dtype, attn)
            aspect = image_cfg.get("aspect_ratio") or top.get("image_aspect_ratio") or "resize"
            image_processor = VilaImageProcessor.from_json(
                Path(str(cfg["pretrained"])) / "vision_tower" / "preprocessor_config.json", aspect
            )
            default_frames = top.get("num_video_frames") or 8
        else:
            tiny = cfg.get("tiny")
            if not tiny:
                raise InputError(f"model {cfg.get('name')}: pretrained is null and there is no `tiny` config")
            tokenizer = tiny_tokenizer()
            model = build_tiny(tiny, tokenizer, dtype, attn)
            size = int(model.vision_tower.config.image_size)
            image_processor = VilaImageProcessor(size, size, aspect_ratio=image_cfg.get("aspect_ratio") or "resize")
            default_frames = 8
        modality = modality or {}
        return cls(
            name=str(cfg.get("name", "vila")),
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            num_frames=int(modality.get("num_frames") or video_cfg.get("num_frames") or default_frames),
            frame_sampling=str(modality.get("sampling") or video_cfg.get("sampling", "linspace")),
            conversation=str(cfg.get("conversation") or "llama_3"),
        )

    # --- prompt ---------------------------------------------------------------------------------------
    def prompt_text(self, question: str, num_images: int, preamble: str = "") -> str:
        """The conversation text with one "<image>\\n" per image/frame, ending where the answer starts;
        a preamble stays before the images (VLMEvalKit's VILA concatenates its message in order)."""
        return self.conversation.prompt(preamble + (IMAGE_TOKEN + "\n") * num_images + question)

    def _encode(self, chunk: str, first: bool) -> list[int]:
        """One text chunk as tokenizer_image_token tokenises it: with the tokenizer's special tokens,
        a leading BOS kept only on the first chunk."""
        ids = list(self.tokenizer(chunk)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if not first and ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        return ids

    def tokenize(self, text: str, tokens_per_image: int) -> torch.Tensor:
        """[1, L] ids; every "<image>" becomes `tokens_per_image` placeholder ids."""
        chunks = text.split(IMAGE_TOKEN)
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend([self.placeholder_id] * tokens_per_image)
            ids.extend(self._encode(chunk, first=i == 0))
        return torch.tensor([ids], dtype=torch.long)

    # --- the contract ---------------------------------------------------------------------------------
    def question_text(self, sample: Sample) -> str:
        """VILA removes media tokens typed into the text (llava/utils/media.py, extract_media)."""
        return (sample.question or "").replace(IMAGE_TOKEN, "")

    def preprocess(self, sample: Sample) -> HostInputs:
        """Images and video frames alike: one "<image>" and tokens_per_image tokens each."""
        per_image = self.tokens_per_image
        with HOST:
            question, images = self._read_sample(sample)
            pixels = self.image_processor(images)  # [N, 3, H, W]
            input_ids = self.tokenize(self.prompt_text(question, len(images), sample.preamble.replace(IMAGE_TOKEN, "")), per_image)  # [1, L]
            visual_index = (input_ids[0] == self.placeholder_id).nonzero().squeeze(-1)
        last = int(visual_index.max())
        nl = self._newline_ids
        follows = input_ids[0, last + 1 : last + 1 + len(nl)].tolist() == nl
        side = math.isqrt(per_image)
        return HostInputs(
            sample_id=sample.id,
            modality=sample.modality,
            input_ids=input_ids,
            visual_index=visual_index,
            instruction_index=instruction_positions(input_ids, visual_index, self._suffix_len, skip=len(nl) if follows else 0),
            visual_grid=(len(images), side, side),
            pixels={"pixel_values": pixels},
        )

    def encode(self, host: HostInputs) -> VisualPrompt:
        input_ids = host.input_ids.to(self.device)
        pixels = host.pixels["pixel_values"]
        with torch.no_grad():
            embeds = self.model.embed(input_ids, pixels, self.placeholder_id)
        return VisualPrompt(
            inputs_embeds=embeds,
            position_ids=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),
            attention_mask=torch.ones_like(input_ids),
            input_ids=input_ids,
            visual_index=host.visual_index,
            instruction_index=host.instruction_index,
            visual_grid=host.visual_grid,
            sample_id=host.sample_id,
            meta={
                "pixel_values": pixels,
                "modality": host.modality,
                # token k of an image covers grid rows 2*(k % side) and columns 2*(k // side) (VILA's order)
                "visual_token_order": "column_major",
            },
        )

    @property
    def decoder(self) -> DecoderParts:
        llm = self.model.llm
        return DecoderParts(
            embed_tokens=llm.model.embed_tokens,
            layers=llm.model.layers,
            norm=llm.model.norm,
            lm_head=llm.lm_head,
            rotary_emb=llm.model.rotary_emb,
            config=llm.config,
        )

    @torch.no_grad()
    def vision_token_scores(self, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's statistics (methods/visionzip.py) at SigLIP layer `layer`: (attention each patch
        receives within its image / frame [N_v], head-mean keys [N_v, head_dim]) in `visual_index` order.

        Pooled like the projector pools features: VILA's own DownSample2x2 groups each 2x2
        neighbourhood (column-major token order); a token's statistics are the mean over the real
        patches of its group (the zero-padded row / column of an odd grid does not count).
        """
        pixels = prompt.meta.get("pixel_values")
        if pixels is None:
            raise InputError(f"sample {prompt.sample_id!r}: the prompt carries no pixel_values")
        model = self.model
        received, keys = siglip_token_stats(model.vision_tower, layer, functools.partial(model.vision_features, pixels))
        if model.mm_vision_select_feature == "patch":  # the features (and so the LLM tokens) skip the first token
            received, keys = received[:, 1:], keys[:, 1:]
        real = torch.ones_like(received)[..., None]
        stats = torch.cat([received[..., None], keys, real], -1)  # [images, s*s, 1 + hd + 1]
        groups = DownSample2x2()(stats)  # [images, m*m, 4 * (2 + hd)], VILA's token order
        groups = groups.view(*groups.shape[:2], 4, stats.shape[-1])  # the 4 neighbours of each token
        pooled = groups[..., :-1].sum(2) / groups[..., -1:].sum(2)  # mean over the real patches
        tokens = pooled.flatten(0, 1)
        if tokens.shape[0] != prompt.num_visual:
            raise InputError(f"sample {prompt.sample_id!r}: {tokens.shape[0]} vision statistics for {prompt.num_visual} visual tokens")
        return tokens[:, 0].cpu(), tokens[:, 1:].cpu()

    @property
    def eos_token_ids(self) -> list[int]:
        """The LM's eos ids plus the conversation's separator, VILA's stop string."""
        ids = super().eos_token_ids
        eot = _token_id(self.tokenizer, self.conversation.sep)
        return ids + [int(eot)] if eot is not None and int(eot) not in ids else ids

    def visual_token_boxes(self, prompt: VisualPrompt, image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """[N_v, 7] (see VLM.visual_token_boxes).  Each image / frame becomes the tower's square (stretched
        under "resize"; under "pad" first centred on a square of its longer side, which needs
        `image_sizes`); token k reads the 2x2 patch group at row pair k % m, column pair k // m (VILA's
        column-major order).  The zero row / column padding an odd grid adds no pixels, and s patches of
        `patch_size` px may stop short of the edge (SigLIP 384/14: 378 px), so the last pixels feed no token."""
        vcfg = self.model.vision_tower.config
        s, patch, size = self.model.vision_grid, int(vcfg.patch_size), int(vcfg.image_size)
        pairs = torch.arange((s + 1) // 2, dtype=torch.float64)
        edges = torch.stack([2 * pairs, (2 * pairs + 2).clamp(max=s)], -1) * patch / size  # [m, 2], fractions of the square
        n_images = prompt.num_visual // self.tokens_per_image
        pad = self.image_processor.aspect_ratio == "pad"
        if pad and (image_sizes is None or len(image_sizes) != n_images):
            raise InputError(
                f"model {self.name}: with image_aspect_ratio='pad' the token boxes need image_sizes, (H, W) of each of "
                f"the {n_images} images / frames"
            )
        parts = []
        for i in range(n_images):
            ys = xs = edges
            if pad:
                height, width = image_sizes[i]
                side = max(height, width)
                ys, xs = (edges * side - (side - height) // 2) / height, (edges * side - (side - width) // 2) / width
            parts.append(self.grid_token_boxes(i, i + 1, 0, ys, xs, column_major=True))
        return torch.cat(parts)
