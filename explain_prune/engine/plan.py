"""What a pruning method tells the engine: at which layers to select, and how.

A `PrunePlan` maps a layer index to a `Selector` (layer 0 = the LLM input).  Before running that
layer the engine shows the selector one sample at a time as a `TokenView` — the tokens still
alive in that sample, the hidden states entering the layer, their positions — and the selector
returns which of the view's visual tokens to keep.  Text tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from explain_prune.core.retention import keep_count
from explain_prune.engine.attention import attention_rows, query_key_states
from explain_prune.models.base import DecoderParts, VisualPrompt


@dataclass
class TokenView:
    """One sample's live tokens entering `layer` (no padding, in sequence order)."""

    layer: int
    hidden: torch.Tensor  # [n, d] residual stream entering `layer`
    position_ids: torch.Tensor  # [n] or [3, n] (original positions, gaps allowed)
    visual_index: torch.Tensor  # [n_v] positions in this view of the live visual tokens
    instruction_index: torch.Tensor  # [n_u] positions in this view of the user-question tokens
    num_visual_input: int  # N_v at the LLM input: retention ratios are relative to it
    prompt: VisualPrompt
    decoder: DecoderParts
    previous_hidden: torch.Tensor | None = None  # [n, d] entering layer-1, if the token set is unchanged

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def last_index(self) -> int:
        return self.length - 1

    def _hidden_for(self, layer: int) -> torch.Tensor:
        if layer == self.layer:
            return self.hidden
        if layer == self.layer - 1 and self.previous_hidden is not None:
            return self.previous_hidden
        raise ValueError(f"a selector at layer {self.layer} can read layer {self.layer} or {self.layer - 1}, not {layer}")

    def attention(self, query_index: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """[H, Q, n] attention of `query_index` rows recomputed with `layer`'s own q/k (default:
        this layer; `self.layer - 1` gives the map that layer actually computed, as FastV uses)."""
        layer = self.layer if layer is None else layer
        return attention_rows(
            self.decoder.layers[layer],
            self.decoder.rotary_emb,
            self._hidden_for(layer),
            self.position_ids,
            query_index.to(self.hidden.device),
        )

    def projections(self, query_index: torch.Tensor, layer: int | None = None, rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [H, Q, hd] of `query_index`, keys [KVH, n, hd]) of `layer` (default: this layer),
        post-RoPE unless rope=False."""
        layer = self.layer if layer is None else layer
        queries, keys = query_key_states(
            self.decoder.layers[layer], self.decoder.rotary_emb, self._hidden_for(layer), self.position_ids,
            query_index.to(self.hidden.device), rope=rope,
        )
        return queries, keys

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """Post-RoPE key states [kv_heads, n, head_dim] of `layer` (default: this layer)."""
        layer = self.layer if layer is None else layer
        _, keys = query_key_states(
            self.decoder.layers[layer], self.decoder.rotary_emb, self._hidden_for(layer), self.position_ids, None
        )
        return keys

    def budget(self, ratio: float, rule: str = "round") -> int:
        """Visual tokens to keep at `ratio` of the input count: `core.retention.keep_count` with the
        method's count rule, capped at what is still alive."""
        return min(keep_count(ratio, self.num_visual_input, rule), int(self.visual_index.numel()))

    def keep_top(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Positions (into the view) of the k highest-scoring live visual tokens, ascending.
        `scores` is [n_v], aligned with `visual_index`; ties go to the earlier token."""
        order = torch.argsort(-scores.float(), stable=True)[:k]
        return self.visual_index[order.to(self.visual_index.device)].sort().values


class Selector(Protocol):
    def __call__(self, view: TokenView) -> torch.Tensor:
        """Positions (into `view`) of the visual tokens to keep; every other visual token is dropped."""


@dataclass
class PrunePlan:
    """{layer index -> selector}; `renumber_positions` compacts positions after a drop (PDrop's
    original behaviour) instead of keeping the original ones (the default, docs/design.md §Positions kept)."""

    selectors: dict[int, Callable[[TokenView], torch.Tensor]] = field(default_factory=dict)
    renumber_positions: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    # drop the pruned tokens from the KV caches of the layers before the selecting one too, so decode
    # steps no longer see them anywhere (PruneVid's stage 2); one selecting layer only
    evict_earlier_caches: bool = False

    def validate(self, num_layers: int) -> None:
        for layer in self.selectors:
            if not 0 <= layer < num_layers:
                raise ValueError(f"prune plan names layer {layer}, the model has layers 0..{num_layers - 1}")
        if self.evict_earlier_caches and len(self.selectors) != 1:
            raise ValueError("evict_earlier_caches needs exactly one selecting layer")
