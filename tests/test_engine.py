"""The engine against independent references, on every tiny model family.

* vanilla engine == transformers' own `generate`, token for token;
* pruning by removal == the full sequence with the dropped tokens masked out of attention
  (an HF forward with a 4-D mask for input-stage pruning; the engine's mask mode for later layers),
  at every kept prompt position and for >= 5 decode steps;
* a left-padded batch with different lengths and keep counts == single runs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import TINY_MODELS, model_cfg, random_image, write_video

from explain_prune.engine import PrunePlan, generate
from explain_prune.models import Sample, build_vlm

QUESTIONS = ["What color is the object ?", "Is there a red circle in the image ?", "How many objects are there ?"]
SIZES = [(112, 140), (84, 84), (112, 112)]


@functools.lru_cache(maxsize=None)
def tiny(name: str, dtype: str = "float32"):
    return build_vlm(model_cfg(name, dtype=dtype))


def image_prompts(vlm):
    """Three prompts of different lengths and visual counts (the second has two images)."""
    return [
        vlm.prepare(Sample(id=f"s{i}", question=q, images=[random_image(i, *hw)] * (2 if i == 1 else 1)))
        for i, (q, hw) in enumerate(zip(QUESTIONS, SIZES))
    ]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=6)


def video_prompt(vlm, path):
    return vlm.prepare(Sample(id="v0", question="What happens in the video ?", video=path))


def keep_every_other(view):
    """A content-independent selector: keeps visual tokens 0, 2, 4, ... up to half the input count."""
    return view.visual_index[::2][: view.budget(0.5)]


def keep_by_last_token_attention(view):
    """Depends on the hidden states: FastV-style ranking by the last token's attention row."""
    row = view.attention(torch.tensor([view.last_index]))[:, 0].mean(0)
    return view.keep_top(row[view.visual_index], view.budget(0.25))


def masked_reference_logits(vlm, prompt, keep, generated):
    """Teacher-forced HF forward over prompt + generated tokens with dropped keys masked (4-D mask)."""
    n_new = len(generated)
    ids = torch.tensor([generated], dtype=torch.long)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(ids).to(prompt.inputs_embeds.dtype)], dim=1)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(n_new)], dim=-1)
    live = torch.cat([keep, torch.ones(n_new, dtype=torch.bool)])
    length = live.numel()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (causal & live[None, :]) | torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(1, 1, length, length, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    with torch.no_grad():
        logits = vlm.model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).logits[0]
    return logits if logits.dtype == torch.float64 else logits.float()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_vanilla_engine_equals_hf_generate(name, video_file):
    vlm = tiny(name)
    for prompt in [*image_prompts(vlm), video_prompt(vlm, video_file)]:
        ours = generate(vlm, prompt, None, max_new_tokens=8)
        reference = vlm.generate_reference(prompt, 8).tolist()
        eos = set(vlm.eos_token_ids)
        reference = reference[: next((i for i, t in enumerate(reference) if t in eos), len(reference))]
        assert ours.tokens == reference
        assert ours.kept_per_layer == [prompt.num_visual] * vlm.decoder.num_layers


@pytest.mark.parametrize("name", TINY_MODELS)
# float64 proves the identity (|Δ| <= 1e-9); float32 shows it holds at working precision, where
# summation-order noise grows with the logit magnitude (hence the relative term).
@pytest.mark.parametrize("dtype,atol,rtol", [("float64", 1e-9, 0.0), ("float32", 1e-5, 1e-4)])
def test_input_stage_removal_equals_masking(name, dtype, atol, rtol, video_file):
    vlm = tiny(name, dtype)
    plan = PrunePlan({0: keep_every_other})
    for prompt in [*image_prompts(vlm), video_prompt(vlm, video_file)]:
        removed = generate(vlm, prompt, plan, max_new_tokens=6, return_logits=True)
        keep = torch.ones(prompt.length, dtype=torch.bool)
        keep[prompt.visual_index] = False
        keep[prompt.visual_index[::2][: max(1, round(0.5 * prompt.num_visual))]] = True
        assert removed.kept_per_layer == [int(keep.sum()) - (prompt.length - prompt.num_visual)] * vlm.decoder.num_layers
        # teacher-force the tokens the pruned run chose (all 6 steps, eos included if it came)
        chosen = removed.step_logits.argmax(-1).tolist()
        reference = masked_reference_logits(vlm, prompt, keep, chosen[:-1])
        assert removed.step_logits.shape[0] >= 5 or chosen[-1] in vlm.eos_token_ids
        torch.testing.assert_close(removed.prefill_logits, reference[: prompt.length][keep], atol=atol, rtol=rtol)
        steps = reference[prompt.length - 1 : prompt.length - 1 + len(chosen)]
        torch.testing.assert_close(removed.step_logits, steps, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_mid_layer_removal_equals_masking(name, video_file):
    vlm = tiny(name, "float64")
    plan = PrunePlan({1: keep_by_last_token_attention})
    for prompt in [*image_prompts(vlm), video_prompt(vlm, video_file)]:
        removed = generate(vlm, prompt, plan, max_new_tokens=6, return_logits=True)
        masked = generate(vlm, prompt, plan, max_new_tokens=6, mode="mask", return_logits=True)
        assert removed.tokens == masked.tokens
        assert removed.kept_per_layer == masked.kept_per_layer
        assert removed.kept_per_layer[0] == prompt.num_visual > removed.kept_per_layer[1]
        torch.testing.assert_close(removed.prefill_logits, masked.prefill_logits, atol=1e-9, rtol=0)
        torch.testing.assert_close(removed.step_logits, masked.step_logits, atol=1e-9, rtol=0)
        assert removed.kv_cache_bytes < masked.kv_cache_bytes or removed.kept_per_layer == masked.kept_per_layer


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_equals_single_runs(name):
    vlm = tiny(name)
    prompts = image_prompts(vlm)
    assert len({p.length for p in prompts}) > 1, "the fixture must mix prompt lengths"
    for plan in [None, PrunePlan({0: keep_every_other}), PrunePlan({1: keep_by_last_token_attention})]:
        batched = generate(vlm, prompts, plan, max_new_tokens=6)
        singles = [generate(vlm, p, plan, max_new_tokens=6) for p in prompts]
        assert [g.tokens for g in batched] == [g.tokens for g in singles]
        assert [g.kept_per_layer for g in batched] == [g.kept_per_layer for g in singles]
        assert [g.kv_cache_bytes for g in batched] == [g.kv_cache_bytes for g in singles]
    counts = [g.kept_per_layer[-1] for g in generate(vlm, prompts, PrunePlan({0: keep_every_other}), max_new_tokens=1)]
    assert len(set(counts)) > 1, "samples must keep different numbers of tokens"


def test_selector_must_return_live_visual_tokens():
    vlm = tiny("tiny_qwen2vl")
    prompt = image_prompts(vlm)[0]
    with pytest.raises(ValueError, match="live visual tokens"):
        generate(vlm, prompt, PrunePlan({0: lambda view: torch.tensor([0])}), max_new_tokens=2)
    with pytest.raises(ValueError, match="layers 0"):
        generate(vlm, prompt, PrunePlan({99: keep_every_other}), max_new_tokens=2)


def test_kv_bytes_count_live_tokens():
    vlm = tiny("tiny_qwen2vl")
    prompt = image_prompts(vlm)[0]
    dec = vlm.decoder
    per_token_layer = 2 * dec.num_kv_heads * dec.head_dim * 4  # float32
    vanilla = generate(vlm, prompt, None, max_new_tokens=1)
    assert vanilla.kv_cache_bytes == per_token_layer * dec.num_layers * prompt.length
    pruned = generate(vlm, prompt, PrunePlan({0: keep_every_other}), max_new_tokens=1)
    dropped = prompt.num_visual - pruned.kept_per_layer[0]
    assert pruned.kv_cache_bytes == per_token_layer * dec.num_layers * (prompt.length - dropped)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_sdpa_and_eager_attention_give_the_same_engine_output(name, video_file):
    """model.attn_implementation changes the kernel, not the answer: same tokens and kept counts, and
    logits equal to float32 precision (HF's eager kernel takes its softmax in float32 even for a float64
    model: measured max |Δlogit| 1e-6 to 6e-6), for a pruned batch and a video, with a
    hidden-state-dependent selector."""
    sdpa, eager = (build_vlm(model_cfg(name, dtype="float64", attn_implementation=a)) for a in ("sdpa", "eager"))
    for prompts in (image_prompts(sdpa), [video_prompt(sdpa, video_file)]):
        plan = PrunePlan(selectors={1: keep_by_last_token_attention})
        outs = [generate(vlm, prompts, plan, max_new_tokens=4, return_logits=True) for vlm in (sdpa, eager)]
        for a, b in zip(*outs):
            assert a.tokens == b.tokens and a.kept_per_layer == b.kept_per_layer
            assert torch.allclose(a.step_logits, b.step_logits, rtol=1e-5, atol=3e-5)
            assert torch.allclose(a.prefill_logits, b.prefill_logits, rtol=1e-5, atol=3e-5)
