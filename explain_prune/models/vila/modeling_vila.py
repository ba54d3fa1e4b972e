"""VILA's modules: the `mlp_downsample` projector and the tower -> projector -> Llama model.

From the NVlabs/VILA sources:
- features = vision_tower(pixels, output_hidden_states=True).hidden_states[mm_vision_select_layer]
  (-2 = output of the penultimate encoder layer); "cls_patch" keeps every token, "patch" drops the
  first (llava/model/multimodal_encoder/vision_encoder.py, VisionTower.feature_select).
- projector = Sequential(DownSampleBlock, LayerNorm(4C), Linear(4C, D), GELU, Linear(D, D))
  (llava/model/multimodal_projector/base_projector.py).  DownSampleBlock zero-pads the 27x27 grid to
  28x28 (one row and one column at the end) and concatenates each 2x2 neighbourhood into channels in
  the order (r, c), (r, c+1), (r+1, c), (r+1, c+1).  Its view/permute makes the OUTPUT token order
  column-pair-major: token k of an image covers grid rows 2*(k % 14) .. +1 and columns
  2*(k // 14) .. +1.  Prompts therefore carry meta["visual_token_order"] = "column_major".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionModel

from explain_prune.core import InputError


class DownSample2x2(nn.Module):
    """VILA's DownSampleBlock: [B, s*s, C] -> [B, ceil(s/2)^2, 4C].

    Odd grids get one zero row and one zero column appended (27 -> 28).  Channel order inside a
    merged token is (r, c), (r, c+1), (r+1, c), (r+1, c+1); merged tokens are ordered column-pair
    major (index = col_pair * m + row_pair), exactly as VILA's view/permute produces them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"mlp_downsample needs a square token grid, got {n} tokens")
        pad = s % 2
        grid = F.pad(x.reshape(b, s, s, c), (0, 0, 0, pad, 0, pad))  # [b, row, col, c], padded at the end
        m = (s + pad) // 2
        grid = grid.view(b, m, 2, m, 2, c)  # [b, row_pair, dr, col_pair, dc, c]
        return grid.permute(0, 3, 1, 2, 4, 5).reshape(b, m * m, 4 * c)


class MlpDownsampleProjector(nn.Module):
    """`mm_projector_type: mlp_downsample`; parameter names match VILA's MultimodalProjector
    (`layers.1` LayerNorm, `layers.2` / `layers.4` Linear)."""

    projector_type = "mlp_downsample"

    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.mm_hidden_size, self.hidden_size = int(mm_hidden_size), int(hidden_size)
        self.layers = nn.Sequential(
            DownSample2x2(),
            nn.LayerNorm(4 * self.mm_hidden_size),
            nn.Linear(4 * self.mm_hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, self.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, s*s, C] SigLIP features -> [N, ceil(s/2)^2, D] LLM tokens."""
        return self.layers(x)


class VilaForConditionalGeneration(nn.Module):
    """Vision tower -> mm projector -> Llama.  `generate`/`forward` take `inputs_embeds` (built by
    `embed`) and are the Llama's own, so `VLM.generate_reference` works unchanged."""

    def __init__(
        self,
        llm: LlamaForCausalLM,
        vision_tower: SiglipVisionModel,
        mm_projector: MlpDownsampleProjector,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "cls_patch",
    ):
        super().__init__()
        self.llm = llm  # registered first: VLM.dtype / device read the first parameter
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        if mm_vision_select_feature not in ("patch", "cls_patch"):
            raise InputError(f"unknown mm_vision_select_feature {mm_vision_select_feature!r} (known: patch, cls_patch)")
        self.mm_vision_select_layer = int(mm_vision_select_layer)
        self.mm_vision_select_feature = mm_vision_select_feature
        vcfg = vision_tower.config
        n = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 - (1 if mm_vision_select_feature == "patch" else 0)
        if math.isqrt(n) ** 2 != n:
            raise InputError(
                f"mm_vision_select_feature={mm_vision_select_feature!r} leaves {n} SigLIP tokens, not a square grid "
                "(SigLIP has no CLS token; VILA's SigLIP checkpoints use 'cls_patch')"
            )
        n_layers = int(vcfg.num_hidden_layers)
        if not -(n_layers + 1) <= self.mm_vision_select_layer <= n_layers:
            raise InputError(f"mm_vision_select_layer {mm_vision_select_layer} out of range for {n_layers} layers")
        self.vision_grid = math.isqrt(n)  # s: side of the SigLIP feature grid
        self.tokens_per_image = ((self.vision_grid + 1) // 2) ** 2

    # transformers-like surface used by VLM -------------------------------------------------------
    @property
    def config(self) -> LlamaConfig:
        return self.llm.config

    @property
    def generation_config(self):
        return self.llm.generation_config

    def forward(self, **kwargs: Any):
        return self.llm(**kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.llm.generate(**kwargs)

    # vision path ----------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P, C]: hidden_states[mm_vision_select_layer] (index 0 = embeddings)."""
        out = self.vision_tower(
            pixel_values.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype), output_hidden_states=True
        )
        feats = out.hidden_states[self.mm_vision_select_layer]
        return feats[:, 1:] if self.mm_vision_select_feature == "patch" else feats

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, d_llm]."""
        return self.mm_projector(self.vision_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, placeholder_id: int) -> torch.Tensor:
        """Text embeddings with the images' projected features written, in order, at the positions
        holding `placeholder_id` ([1, L] -> [1, L, d])."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        feats = self.encode_images(pixel_values).to(embeds.dtype).reshape(-1, embeds.shape[-1])
        mask = input_ids == placeholder_id
        if int(mask.sum()) != feats.shape[0]:
            raise InputError(f"{feats.shape[0]} visual features for {int(mask.sum())} placeholder positions")
        embeds = embeds.clone()
        embeds[mask] = feats
        return embeds
