"""Baselines against straightforward implementations of their official rules (issue: every baseline
equals its reference).  The references here are written from the official sources' behaviour, stated
as facts with file and commit, and run on the HF modules directly (no engine, no TokenView):

* PyramidDrop (Cooperx521/PyramidDrop @6444f30, llava/model/modeling_llama_pdrop.py): at each stage
  layer b_s the last token's attention row of layer b_s itself (eager weights, head mean) ranks the
  live image tokens; int(N * ratio_list[s]) are kept with ratio_list = [1.0, λ, λ², λ³]
  (L1306-1307, llava/eval/model_vqa_loader.py L94-96), counted from the original N; after a drop the
  positions are arange over the shorter sequence (L1301, L1262-1268).
* DART (xqy1111111/DART @d6a5af6, Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py L401-445):
  TOKEN_TOPK = int(N * (1 - reduction_ratio) / 8); the loop runs over `list(indices_set)`, the set
  of the image pivots' and then the query pivots' absolute positions; each pivot takes the
  `(-cos).topk(TOKEN_TOPK)` of the remaining candidates, the candidate list being `list(set)`.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, model_cfg, random_image

from explain_prune.core import InputError
from explain_prune.core.retention import keep_count
from explain_prune.engine import generate
from explain_prune.methods import build_method
from explain_prune.methods.pdrop import layer_averaged
from explain_prune.models import Sample, build_vlm

QUESTIONS = ["What color is the object ?", "How many objects are there in the picture ?"]
SIZES = [(112, 140), (224, 252)]


@functools.lru_cache(maxsize=None)
def tiny(name: str):
    # Qwen2-VL with a larger pixel budget (252x224 -> 72 tokens), so DART's pivots lie past the first
    # 32 positions, where a CPython set no longer iterates its ints in ascending order
    extra = {"image.max_pixels": 65536} if name == "tiny_qwen2vl" else {}
    return build_vlm(model_cfg(name, dtype="float64", **extra))


@functools.lru_cache(maxsize=None)
def prompts(name: str):
    vlm = tiny(name)
    return tuple(vlm.prepare(Sample(id=f"r{i}", question=q, images=[random_image(20 + i, *hw)]))
                 for i, (q, hw) in enumerate(zip(QUESTIONS, SIZES)))


def engine_kept(vlm, prompt, method):
    plan = method.plan(vlm, prompt)
    out = generate(vlm, prompt, plan, max_new_tokens=1, return_logits=True)
    return {layer: kept.tolist() for layer, kept in plan.info["kept"].items()}, out.prefill_logits[-1]


# --- PyramidDrop --------------------------------------------------------------------------------


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def pdrop_reference(vlm, prompt, layers, lam, renumber):
    """The official rule run layer by layer: {stage layer: kept image ordinals}, last-token logits."""
    decoder = vlm.decoder
    hidden = prompt.inputs_embeds[0]  # [n, d]
    positions = prompt.position_ids  # [1, n] (1-D RoPE) or [3, 1, n] (M-RoPE)
    image = prompt.visual_index.tolist()
    n_image = len(image)
    ordinal = {p: i for i, p in enumerate(image)}
    tokens = list(range(hidden.shape[0]))  # the original index of every live token
    ratios = [1.0] + [lam ** (s + 1) for s in range(len(layers))]
    kept = {}
    with torch.no_grad():
        for index, layer in enumerate(decoder.layers):
            if index in layers:
                stage = layers.index(index) + 1
                normed = layer.input_layernorm(hidden)[None]
                with vlm.attention_implementation("eager"):  # HF's eager path returns the weights
                    _, weights = layer.self_attn(hidden_states=normed, attention_mask=causal_mask(len(tokens), hidden.dtype),
                                                 position_embeddings=decoder.rotary_emb(normed, positions))
                row = weights[0].mean(0)[-1]  # [n] the last token's row, head mean
                live = [i for i, t in enumerate(tokens) if t in ordinal]
                keep = int(n_image * ratios[stage])
                top = sorted(live[j] for j in torch.argsort(-row[live], stable=True)[:keep].tolist())
                survivors = sorted(set(i for i, t in enumerate(tokens) if t not in ordinal) | set(top))
                tokens = [tokens[i] for i in survivors]
                hidden = hidden[survivors]
                positions = positions[..., survivors]
                if renumber:
                    positions = torch.arange(len(tokens))[None]
                kept[index] = [ordinal[t] for t in tokens if t in ordinal]
            # the layer itself with the model's own kernel (eager's float32 softmax would cost 1e-6)
            out = layer(hidden[None], attention_mask=causal_mask(len(tokens), hidden.dtype),
                        position_embeddings=decoder.rotary_emb(hidden[None], positions))
            hidden = (out[0] if isinstance(out, tuple) else out)[0]
        logits = decoder.lm_head(decoder.norm(hidden))[-1]
    return kept, logits


PDROP_SCHEDULES = [([1, 2], 0.5), ([1], 0.3), ([2], 0.7), ([1, 2], 0.8)]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_pdrop_equals_the_official_rule(name):
    vlm = tiny(name)
    num_layers = vlm.decoder.num_layers
    renumber = name != "tiny_qwen2vl"  # auto: the official renumbering on 1-D RoPE, original M-RoPE positions
    for prompt in prompts(name):
        for layers, lam in PDROP_SCHEDULES:
            method = build_method("pdrop", layer_averaged(layers, lam, num_layers), layers=layers, lam=lam)
            kept, logits = engine_kept(vlm, prompt, method)
            ref_kept, ref_logits = pdrop_reference(vlm, prompt, layers, lam, renumber)
            assert kept == ref_kept, (name, layers, lam)
            torch.testing.assert_close(logits, ref_logits, atol=1e-9, rtol=0)
            assert method.plan(vlm, prompt).renumber_positions == renumber


def test_pdrop_counts_and_positions_are_the_official_ones():
    """int, not round: 70 tokens at λ = 0.5 keep 35, 17, 8 (round: 35, 18, 9); renumbering changes the
    answer's logits on a 1-D RoPE model, so positions matter and `auto` picks the official ones."""
    target = layer_averaged([1, 2, 3], 0.5, 8)
    official = build_method("pdrop", target, layers=[1, 2, 3], lam=0.5)
    assert official.schedule(8).counts(70)[1:4] == [35, 17, 8]
    rounded = build_method("pdrop", target, layers=[1, 2, 3], lam=0.5, count_rule="round")
    assert rounded.schedule(8).counts(70)[1:4] == [35, 18, 9]
    vlm = tiny("tiny_llava_ov")
    prompt = prompts("tiny_llava_ov")[0]
    target = layer_averaged([1, 2], 0.5, vlm.decoder.num_layers)
    _, renumbered = engine_kept(vlm, prompt, build_method("pdrop", target, layers=[1, 2], lam=0.5))
    _, original = engine_kept(vlm, prompt, build_method("pdrop", target, layers=[1, 2], lam=0.5, renumber_positions=False))
    assert not torch.allclose(renumbered, original)
    torch.testing.assert_close(original, pdrop_reference(vlm, prompt, [1, 2], 0.5, renumber=False)[1], atol=1e-9, rtol=0)


# --- DART ---------------------------------------------------------------------------------------


def dart_reference(vlm, prompt, layer, reduction, order="official", p_img=4, p_txt=4):
    """DART's selection over HF hidden states, with the official loop's Python-set iteration."""
    decoder = vlm.decoder
    with torch.no_grad(), vlm.attention_implementation("eager"):
        out = vlm.model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                        attention_mask=prompt.attention_mask, output_hidden_states=True, use_cache=False)
        key_layer = decoder.layers[layer - 1]
        normed = key_layer.input_layernorm(out.hidden_states[layer - 1])
        attn = key_layer.self_attn
        cos, sin = decoder.rotary_emb(normed, prompt.position_ids)
        captured = {}

        def grab(module, args, kwargs, output):
            captured["keys"] = output

        # post-RoPE keys: HF's own k_proj and rotary, taken from the attention forward's key states
        handle = attn.k_proj.register_forward_hook(grab, with_kwargs=True)
        attn(hidden_states=normed, attention_mask=None, position_embeddings=(cos, sin))
        handle.remove()
        raw = captured["keys"][0].view(normed.shape[1], -1, attn.head_dim).transpose(0, 1)[None]  # [1, KVH, n, hd]
        q_dummy = torch.zeros_like(raw)
        rope = vars(__import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"]))
        if "apply_multimodal_rotary_pos_emb" in rope:
            _, keys = rope["apply_multimodal_rotary_pos_emb"](q_dummy, raw, cos, sin, attn.config.rope_parameters["mrope_section"])
        else:
            _, keys = rope["apply_rotary_pos_emb"](q_dummy, raw, cos, sin)
        groups = decoder.config.num_attention_heads // decoder.config.num_key_value_heads
        flat = keys[0].repeat_interleave(groups, dim=0).transpose(0, 1).reshape(normed.shape[1], -1)  # repeat_kv, concat heads
        norms = torch.norm(flat, p=1, dim=-1)
        state = decoder.norm(out.hidden_states[layer][0])
    start, length = int(prompt.visual_index[0]), prompt.num_visual
    topk = int(length * (1 - reduction) / (p_img + p_txt))
    image_indices = (norms[start:start + length].topk(p_img).indices + start).tolist()
    query_indices = (norms[start + length:].topk(p_txt).indices + start + length).tolist()
    chosen = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    visit = list(chosen) if order == "official" else sorted(chosen)
    for item in visit:
        valid_list = list(valid) if order == "official" else sorted(valid)
        similarity = -F.cosine_similarity(state[item][None], state[valid_list], dim=-1)
        picks = [valid_list[i] for i in similarity.topk(min(topk, len(valid_list))).indices.tolist()]
        chosen.update(picks)
        valid.difference_update(picks)
    chosen.difference_update(query_indices)
    return sorted(i - start for i in chosen)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_dart_equals_the_official_rule(name):
    vlm = tiny(name)
    differs = 0
    for prompt in prompts(name):
        for retention, layer in [(0.5, 2), (0.25, 1), (0.1, 2)]:
            reduction = round(1 - retention, 10)
            official, _ = engine_kept(vlm, prompt, build_method("dart", retention, layer=layer))
            assert official[layer] == dart_reference(vlm, prompt, layer, reduction), (name, retention)
            ordered, _ = engine_kept(vlm, prompt, build_method("dart", retention, layer=layer, pivot_order="sorted"))
            assert ordered[layer] == dart_reference(vlm, prompt, layer, reduction, order="sorted"), (name, retention)
            differs += official[layer] != ordered[layer]
    assert differs  # the visiting order changes some kept set: the option is not a no-op


def test_dart_token_topk_uses_the_float_reduction():
    """TOKEN_TOPK = int(N (1 - reduction) / 8) with reduction = 0.9: 1 - 0.9 = 0.09999999999999998, so
    N = 80 gives 0 picks per pivot and DART keeps only its 4 image pivots (r itself would give 1 and 12)."""
    assert 1 - 0.9 != 0.1
    official, exact = build_method("dart", 0.1), build_method("dart", 0.1, topk_from="retention")
    assert (official.token_topk(80), official.expected_keep(80)) == (0, 4)
    assert (exact.token_topk(80), exact.expected_keep(80)) == (1, 12)
    for n in (1302, 1728, 6272):  # the paper's inputs: no difference at 50 / 25 / 10 %
        for r in (0.5, 0.25, 0.1):
            assert build_method("dart", r).token_topk(n) == build_method("dart", r, topk_from="retention").token_topk(n)


def test_count_rules_are_the_references_and_agree_for_ints_and_tensors():
    """lmms-eval's FastV KV variant keeps int(N·r): N = 70, r = 0.25 keeps 17, where the llava-hf port's
    round(N(1−R)) keeps 18; both forms of keep_count agree with Python's int / round on every count."""
    assert build_method("fastv", 0.25, count_rule="int").keep_count(70) == 17
    assert build_method("fastv", 0.25).keep_count(70) == 18  # default: round, as llava-hf
    n = torch.arange(0, 400)
    for rule, python in (("int", int), ("round", round)):
        for r in (0.1, 0.25, 0.5, 0.7, 1 / 3):
            expected = [0 if k == 0 else min(max(1, python(k * r)), k) for k in n.tolist()]
            assert keep_count(r, n, rule).tolist() == expected == [keep_count(r, k, rule) for k in n.tolist()]
    with pytest.raises(InputError, match="count_rule must be one of round, int"):
        keep_count(0.5, 10, "floor")
