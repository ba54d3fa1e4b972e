"""Prefill + greedy decode over the model's own decoder layers, with per-layer token selection.

The engine owns the loop (no monkeypatching): it calls each HF decoder layer with an explicit
additive 4-D mask, the rotary (cos, sin) of the live tokens' original positions, and its own KV
cache.  A batch is left-padded; after a selection every sample is re-packed to its own kept
tokens and left-padded again, so samples keep different numbers of tokens.

Two ways to apply a plan, which must agree (the exactness tests prove it):
  * "remove": dropped tokens leave the sequence and every later layer's KV cache (the fast path);
  * "mask":   the sequence stays whole and dropped tokens are masked out of attention as keys from
              the selecting layer on (the reference semantics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.models.base import VLM, VisualPrompt


@dataclass
class Generation:
    """One sample's greedy answer and the efficiency record of the run that produced it."""

    tokens: list[int]  # new tokens, eos excluded
    text: str
    num_visual: int  # visual tokens at the LLM input
    kept_per_layer: list[int]  # visual tokens attended to in each decoder layer
    prefill_seconds: float  # wall time of the whole batch's prefill (selection included)
    decode_seconds: float
    kv_cache_bytes: int  # this sample's K+V bytes held after prefill (all layers, live tokens only)
    prefill_logits: torch.Tensor | None = None  # [n_live, V] at the live positions (return_logits)
    step_logits: torch.Tensor | None = None  # [steps, V]: logits that chose each generated token
    info: dict[str, Any] = field(default_factory=dict)


class KVCache:
    """Per-layer key/value store with the `update` call HF attention modules make.

    Each layer keeps its own length, so layers after a pruning layer hold only kept tokens.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class _Batch:
    """The left-padded batch state entering a layer."""

    hidden: torch.Tensor  # [B, L, d]
    positions: torch.Tensor  # [B, L] or [3, B, L]
    live: torch.Tensor  # [B, L] bool: real tokens not dropped (keys others may attend to)
    visual: torch.Tensor  # [B, L] bool
    instruction: torch.Tensor  # [B, L] bool

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "_Batch":
        """Re-pack rows by `index` [B, L'] (left-padded, `valid` marks real entries)."""
        b = torch.arange(index.shape[0], device=index.device)[:, None]
        pos = self.positions[:, b, index] if self.positions.dim() == 3 else self.positions[b, index]
        return _Batch(
            hidden=self.hidden[b, index] * valid[..., None],
            positions=pos * valid,
            live=valid,
            visual=self.visual[b, index] & valid,
            instruction=self.instruction[b, index] & valid,
        )


def _collate(prompts: Sequence[VisualPrompt]) -> _Batch:
    length = max(p.length for p in prompts)
    first = prompts[0]
    batch, dim = len(prompts), first.inputs_embeds.shape[-1]
    device, dtype = first.inputs_embeds.device, first.inputs_embeds.dtype
    hidden = torch.zeros(batch, length, dim, device=device, dtype=dtype)
    mrope = first.position_ids.dim() == 3
    positions = torch.zeros((3, batch, length) if mrope else (batch, length), dtype=torch.long, device=device)
    live = torch.zeros(batch, length, dtype=torch.bool, device=device)
    visual, instruction = live.clone(), live.clone()
    for b, p in enumerate(prompts):
        if (p.position_ids.dim() == 3) != mrope:
            raise ValueError("a batch mixes M-RoPE and 1-D position ids")
        off = length - p.length
        hidden[b, off:] = p.inputs_embeds[0]
        if mrope:
            positions[:, b, off:] = p.position_ids[:, 0]
        else:
            positions[b, off:] = p.position_ids[0]
        live[b, off:] = p.attention_mask[0].bool()
        visual[b, off + p.visual_index.to(device)] = True
        instruction[b, off + p.instruction_index.to(device)] = True
    return _Batch(hidden, positions, live, visual, instruction)


def _additive_mask(key_live: torch.Tensor, query_count: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, Q, K] float mask for the last Q of K positions: causal, live keys only, and each
    query may always see itself (so padded / dropped query rows never become all -inf)."""
    keys = key_live.shape[1]
    q_pos = torch.arange(keys - query_count, keys, device=key_live.device)
    k_pos = torch.arange(keys, device=key_live.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [Q, K]
    allowed = (causal[None] & key_live[:, None, :]) | (k_pos[None, None, :] == q_pos[None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_live.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _positions_slice(positions: torch.Tensor, b: int, index: torch.Tensor) -> torch.Tensor:
    return positions[:, b, index] if positions.dim() == 3 else positions[b, index]


def _select(
    layer: int,
    state: _Batch,
    plans: Sequence[PrunePlan],
    prompts: Sequence[VisualPrompt],
    vlm: VLM,
    previous_hidden: torch.Tensor | None,
) -> torch.Tensor:
    """Run each sample's selector on its live tokens -> the new live mask [B, L]."""
    keep = state.live & ~state.visual
    decoder = vlm.decoder
    for b, (plan, prompt) in enumerate(zip(plans, prompts)):
        token_index = state.live[b].nonzero().squeeze(-1)
        live_visual = state.visual[b, token_index]
        view = TokenView(
            layer=layer,
            hidden=state.hidden[b, token_index],
            position_ids=_positions_slice(state.positions, b, token_index),
            visual_index=live_visual.nonzero().squeeze(-1),
            instruction_index=state.instruction[b, token_index].nonzero().squeeze(-1),
            num_visual_input=prompt.num_visual,
            prompt=prompt,
            decoder=decoder,
            previous_hidden=None if previous_hidden is None else previous_hidden[b, token_index],
        )
        kept = torch.as_tensor(plan.selectors[layer](view), dtype=torch.long, device=token_index.device).flatten()
        if kept.numel() and (not bool(live_visual[kept].all()) or kept.unique().numel() != kept.numel()):
            raise ValueError(f"selector at layer {layer} returned positions that are not distinct live visual tokens")
        keep[b, token_index[kept]] = True
    return keep


def _left_packed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source columns [B, W] that left-pad each row's kept tokens (in order), and their validity."""
    counts = keep.sum(1)
    width = int(counts.max())
    pad = width - counts  # [B]
    rows, cols = keep.nonzero(as_tuple=True)
    target = pad[rows] + (keep.long().cumsum(1) - 1)[rows, cols]
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    index[rows, target] = cols
    valid = torch.arange(width, device=keep.device)[None, :] >= pad[:, None]
    return index, valid


def _logits(x: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least (bf16 models), float64 kept (exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _renumber(state: _Batch) -> None:
    if state.positions.dim() == 3:
        raise ValueError("renumber_positions is defined for 1-D RoPE models only (PDrop's original)")
    state.positions = torch.where(state.live, state.live.long().cumsum(1) - 1, torch.zeros_like(state.positions))


def _sync(vlm: VLM) -> None:
    """Wait for queued CUDA kernels, so a wall-clock reading covers the work it times."""
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()


def _selector_layers(plans: Sequence[PrunePlan], num_layers: int) -> set[int]:
    """The layers where the batch prunes: one shared set, as samples are re-packed together there."""
    selector_layers = set(plans[0].selectors)
    for plan in plans:
        plan.validate(num_layers)
        if (set(plan.selectors) != selector_layers or plan.renumber_positions != plans[0].renumber_positions
                or plan.evict_earlier_caches != plans[0].evict_earlier_caches):
            raise ValueError("every sample of a batch must prune at the same layers")
    return selector_layers


@dataclass
class _Prefill:
    """The batch after the prompt's pass through every layer: what decoding continues from."""

    state: _Batch  # the last layer's output, live / positions as its input had them
    cache: KVCache  # layer i holds [B, heads, K_i, head_dim]
    key_live: list[torch.Tensor]  # per layer: [B, K_i] bool, the cached keys later queries may attend to
    kept_per_layer: torch.Tensor  # [B, num_layers] long (CPU): live visual tokens entering each layer
    logits: torch.Tensor  # [B, L, V] with return_logits, else [B, 1, V] (the last position only)
    seconds: float


def _prefill(
    vlm: VLM,
    prompts: Sequence[VisualPrompt],
    plans: Sequence[PrunePlan],
    selector_layers: set[int],
    mode: str,
    return_logits: bool,
) -> _Prefill:
    """Run the prompts through the layers, applying each selector before its layer: "remove" re-packs
    the batch to the kept tokens, "mask" only marks the rest dead as keys.  Timed with selection,
    as the methods' selection cost is part of what they are compared on."""
    decoder = vlm.decoder
    start = time.perf_counter()
    state = _collate(prompts)
    cache = KVCache(decoder.num_layers)
    key_live: list[torch.Tensor] = []
    kept_per_layer = torch.zeros(state.hidden.shape[0], decoder.num_layers, dtype=torch.long, device="cpu")
    previous_hidden = None  # [B, L, d]: the previous layer's input (TokenView.previous_hidden)
    for i, layer in enumerate(decoder.layers):
        if i in selector_layers:
            # TokenView.previous_hidden: withheld when the previous layer also selected
            keep = _select(i, state, plans, prompts, vlm, None if (i - 1) in selector_layers else previous_hidden)
            if mode == "remove":
                index, valid = _left_packed(keep)
                state = state.gather(index, valid)
                if plans[0].evict_earlier_caches:
                    _evict(cache, key_live, index, valid)
            else:
                state.live = keep
                if plans[0].evict_earlier_caches:
                    key_live[:] = [live & keep for live in key_live]
            if plans[0].renumber_positions:
                _renumber(state)
        kept_per_layer[:, i] = (state.visual & state.live).sum(1).cpu()
        mask = _additive_mask(state.live, state.hidden.shape[1], state.hidden.dtype)
        cos_sin = decoder.rotary_emb(state.hidden, state.positions)
        previous_hidden = state.hidden
        state.hidden = layer(state.hidden, attention_mask=mask, position_embeddings=cos_sin, use_cache=True, **{decoder.cache_kwarg: cache})
        key_live.append(state.live.clone())
    last_hidden = decoder.norm(state.hidden)
    logits = _logits(decoder.lm_head(last_hidden if return_logits else last_hidden[:, -1:]))
    _sync(vlm)
    return _Prefill(state, cache, key_live, kept_per_layer, logits, time.perf_counter() - start)


def _evict(cache: KVCache, key_live: list[torch.Tensor], index: torch.Tensor, valid: torch.Tensor) -> None:
    """Re-pack the caches of the layers already run ([B, heads, L, hd], laid out as the batch before
    the selection: the plan selects at one layer only) to the kept tokens, as the batch was."""
    b = torch.arange(index.shape[0], device=index.device)[:, None]
    for j, live in enumerate(key_live):
        keys, values = cache.keys[j], cache.values[j]
        cache.keys[j] = keys.transpose(1, 2)[b, index].transpose(1, 2) * valid[:, None, :, None]
        cache.values[j] = values.transpose(1, 2)[b, index].transpose(1, 2) * valid[:, None, :, None]
        key_live[j] = live[b, index] & valid


def _kv_bytes(prefill: _Prefill) -> torch.Tensor:
    """[B] long: each sample's K+V bytes after prefill, counting only its live keys (padding and, in
    "mask" mode, dropped tokens are held but would not be in a per-sample cache)."""
    kv_bytes = torch.zeros(prefill.kept_per_layer.shape[0], dtype=torch.long, device="cpu")
    for keys, live in zip(prefill.cache.keys, prefill.key_live):
        per_token = 2 * keys.shape[1] * keys.shape[-1] * keys.element_size()
        kv_bytes += live.sum(1).cpu() * per_token
    return kv_bytes


def _decode(vlm: VLM, prefill: _Prefill, max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor], float]:
    """Greedy decoding from the prefill: per sample its new tokens (eos excluded), the [B, V] logits of
    each step, and the wall time.  Text positions continue after each sample's largest live position,
    as HF's generate does for the unpruned prompt; prefill.key_live grows by one key per step."""
    decoder, state, key_live = vlm.decoder, prefill.state, prefill.key_live
    batch = state.hidden.shape[0]
    eos = set(vlm.eos_token_ids)
    start = time.perf_counter()
    live_positions = state.positions.masked_fill(~state.live, -1) if state.positions.dim() == 2 else (
        state.positions.masked_fill(~state.live[None], -1).amax(0)
    )
    next_position = live_positions.amax(1) + 1  # [B]: text continues after the largest live position
    next_logits = prefill.logits[:, -1]  # [B, V]
    generated: list[list[int]] = [[] for _ in range(batch)]
    step_logits: list[torch.Tensor] = []
    finished = [False] * batch
    for step in range(max_new_tokens):
        step_logits.append(next_logits)
        token = next_logits.argmax(-1)  # [B], on the device
        for b, value in enumerate(token.tolist()):  # the one host sync per step: the EOS check
            if not finished[b]:
                if value in eos:
                    finished[b] = True
                else:
                    generated[b].append(value)
        if all(finished) or step == max_new_tokens - 1:
            break
        hidden = decoder.embed_tokens(token)[:, None]  # [B, 1, d]
        pos = (next_position + step)[:, None]  # [B, 1]
        if state.positions.dim() == 3:
            pos = pos[None].expand(3, -1, -1)  # [3, B, 1]: M-RoPE's text positions are equal on all axes
        cos_sin = decoder.rotary_emb(hidden, pos)
        for i, layer in enumerate(decoder.layers):
            key_live[i] = torch.cat([key_live[i], torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)], 1)
            mask = _additive_mask(key_live[i], 1, hidden.dtype)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, use_cache=True, **{decoder.cache_kwarg: prefill.cache})
        next_logits = _logits(decoder.lm_head(decoder.norm(hidden))[:, -1])
    _sync(vlm)
    return generated, step_logits, time.perf_counter() - start


def _pack(
    vlm: VLM,
    prompts: Sequence[VisualPrompt],
    plans: Sequence[PrunePlan],
    prefill: _Prefill,
    kv_bytes: torch.Tensor,
    decoded: tuple[list[list[int]], list[torch.Tensor], float],
    return_logits: bool,
) -> list[Generation]:
    """Split the batch into one Generation per sample; logits move to the CPU only when asked for,
    and prefill logits keep only the sample's live positions ([n_live, V])."""
    generated, step_logits, decode_seconds = decoded
    live = prefill.state.live
    return [
        Generation(
            tokens=generated[b],
            text=vlm.decode(generated[b]),
            num_visual=prompt.num_visual,
            kept_per_layer=prefill.kept_per_layer[b].tolist(),
            prefill_seconds=prefill.seconds,
            decode_seconds=decode_seconds,
            kv_cache_bytes=int(kv_bytes[b]),
            prefill_logits=prefill.logits[b][live[b]].cpu() if return_logits else None,
            step_logits=torch.stack([s[b] for s in step_logits]).cpu() if return_logits else None,
            info=dict(plans[b].info),  # the method's record: kept tokens and ranking scores per layer
        )
        for b, prompt in enumerate(prompts)
    ]


@torch.no_grad()
def run(
    vlm: VLM,
    prompts: Sequence[VisualPrompt],
    plans: Sequence[PrunePlan],
    max_new_tokens: int,
    mode: str = "remove",
    return_logits: bool = False,
) -> list[Generation]:
    """Prefill with pruning, then greedy decoding, for one left-padded batch (one plan per prompt)."""
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask', not {mode!r}")
    selector_layers = _selector_layers(plans, vlm.decoder.num_layers)
    prefill = _prefill(vlm, prompts, plans, selector_layers, mode, return_logits)
    kv_bytes = _kv_bytes(prefill)  # before decoding appends to key_live
    decoded = _decode(vlm, prefill, max_new_tokens)
    return _pack(vlm, prompts, plans, prefill, kv_bytes, decoded, return_logits)
