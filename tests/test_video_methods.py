"""FastVID and PruneVid on every tiny family's video layout, in float64.

* exactness: FastVID's engine output (prefill logits and 6 decode steps) equals a forward over the
  unpruned prompt with the merged embeddings written at the kept slots and every other visual token
  masked from layer 0 on; PruneVid's removal (stage-2 drop + eviction from the earlier layers' KV
  caches) equals its masking;
* the kept tokens and merged embeddings equal straightforward re-implementations of the official
  rules written here from their sources (loops over frames, segments and tokens, explicit distances),
  and a few stated facts of those sources;
* the counts the engine records (the paper's Table 10 FLOPs: tests/test_experiments.py).

Sources: LunarShen/FastVID @a40a109 `fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/
modeling_qwen2.py` L900-1075; Visual-AI/PruneVid @b12600c `models/pllava/modeling_pllava.py`
L111-314, L764-827 and `models/pllava/elastic_cache.py` L108-190, `models/pllava/llama.py` L405-470.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, model_cfg
from PIL import Image
from test_methods import _hf_eager

from explain_prune.core import InputError
from explain_prune.engine import PrunePlan, generate
from explain_prune.methods import build_method
from explain_prune.methods.base import video_frames
from explain_prune.methods.fastvid import anchor_counts, segment_sizes
from explain_prune.methods.prunevid import refine_clusters, runs
from explain_prune.methods.visionzip import vision_token_scores
from explain_prune.models import Sample, build_vlm

# larger frames than the tiny defaults, so a frame holds 16 tokens (VILA: 196)
FRAME_CFG = {
    "tiny_qwen2vl": {"video.max_pixels": 12544},
    "tiny_llava_ov": {"tiny.vision.image_size": 112},
    "tiny_vila": {},
}


@functools.lru_cache(maxsize=None)
def tiny_video_model(name: str):
    return build_vlm(model_cfg(name, dtype="float64", **FRAME_CFG[name]))


def video(seed: int, frames: int = 8, size: int = 112) -> list[Image.Image]:
    """Frames whose left half is one fixed picture (static tokens) and right half new noise each frame."""
    rng = np.random.default_rng(seed)
    still = rng.integers(0, 255, (size, size // 2, 3), dtype=np.uint8)
    return [Image.fromarray(np.concatenate([still, rng.integers(0, 255, (size, size - size // 2, 3), dtype=np.uint8)], 1))
            for _ in range(frames)]


@functools.lru_cache(maxsize=None)
def prompt_of(name: str):
    frames = 8 if name == "tiny_qwen2vl" else 4  # T = 4 frames of tokens in every family (Qwen2-VL: 2 per token)
    return tiny_video_model(name).prepare(Sample(id="vid", question="What moves in the video ?", video=video(5, frames)))


FASTVID_CASES = {
    "official": {},
    "segments": {"dyseg_c": 2, "dyseg_tau": -1.0, "dtm_p": 2},  # multi-frame segments with anchor frames
    "mixed": {"dyseg_c": 3, "dyseg_tau": -1.0, "dtm_p": 2},  # 3 segments of 4 frames: one- and two-frame ones
    # p = 1: every frame of a segment is an anchor with C targets, which the reference merges frame by
    # frame (its single-frame branch selects frames by count == C), not over the segment
    "stride1": {"dyseg_c": 2, "dyseg_tau": -1.0, "dtm_p": 1},
}
PRUNEVID_OPTIONS = {"layer": 1, "tau": 0.8, "merge_above": 3, "temporal_segment_ratio": 0.5, "temporal_k": 2, "spatial_k": 3}


def keep_ordinals(kept: torch.Tensor) -> PrunePlan:
    return PrunePlan(selectors={0: lambda view: view.visual_index[kept.to(view.visual_index.device)]})


@pytest.fixture
def never_stop(monkeypatch):
    """No end-of-answer token, so every run decodes all its steps (random weights stop early)."""
    for name in TINY_MODELS:
        monkeypatch.setattr(type(tiny_video_model(name)), "eos_token_ids", property(lambda self: [-1]))


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FASTVID_CASES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_fastvid_equals_a_forward_over_the_merged_embeddings(name, case, never_stop):
    vlm, prompt = tiny_video_model(name), prompt_of(name)
    method = build_method("fastvid", 0.5, **FASTVID_CASES[case])
    merged = method.transform(vlm, prompt)
    info = merged.meta["fastvid"]
    embeds = prompt.inputs_embeds.clone()
    embeds[0, prompt.visual_index[info["kept"]]] = merged.inputs_embeds[0, merged.visual_index]
    assert not torch.equal(embeds, prompt.inputs_embeds)  # DTM changed the anchors
    full = dataclasses.replace(prompt, inputs_embeds=embeds)
    removed = generate(vlm, prompt, method, max_new_tokens=6, return_logits=True)
    masked = generate(vlm, full, keep_ordinals(info["kept"]), max_new_tokens=6, mode="mask", return_logits=True)
    assert len(removed.tokens) == 6 and removed.tokens == masked.tokens
    torch.testing.assert_close(removed.prefill_logits, masked.prefill_logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(removed.step_logits, masked.step_logits, atol=1e-9, rtol=0)
    # the count: S per frame, the anchors, the tokens outside the frames
    frames, extra = video_frames(prompt, "fastvid")
    salient, context = method.budget_split(frames.shape[1])
    expected = frames.shape[0] * salient + sum(info["targets_per_frame"]) + extra.numel()
    assert removed.kept_per_layer == [expected] * vlm.decoder.num_layers
    assert expected <= method.visual_tokens_per_layer(prompt.num_visual, 1)[0] + extra.numel()
    if case in ("segments", "mixed"):
        assert any(size > 1 for size in info["segments"]) and max(info["targets_per_frame"]) > context
    if case == "mixed":
        assert 1 in info["segments"]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_prunevid_removal_with_eviction_equals_masking(name, never_stop):
    vlm, prompt = tiny_video_model(name), prompt_of(name)
    method = build_method("prunevid", 0.4, **PRUNEVID_OPTIONS)
    removed = generate(vlm, prompt, method, max_new_tokens=6, return_logits=True)
    masked = generate(vlm, prompt, method, max_new_tokens=6, mode="mask", return_logits=True)
    assert len(removed.tokens) == 6 and removed.tokens == masked.tokens
    torch.testing.assert_close(removed.prefill_logits, masked.prefill_logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(removed.step_logits, masked.step_logits, atol=1e-9, rtol=0)
    merged = method.transform(vlm, prompt)
    m1 = merged.num_visual
    assert removed.kept_per_layer[:2] == [m1, m1] and removed.kept_per_layer[2] < m1
    # every layer's cache holds only the survivors (layers 0..K too): the KV bytes say so
    layers, text = vlm.decoder.num_layers, merged.length - m1
    config = vlm.decoder.config
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 8  # K + V, float64
    assert removed.kv_cache_bytes == layers * (text + removed.kept_per_layer[2]) * per_token
    # without eviction, decoding would see the dropped tokens in layers 0..K: the logits differ
    plan = method.plan(vlm, merged)
    plan.evict_earlier_caches = False
    kept_only = generate(vlm, merged, plan, max_new_tokens=6, return_logits=True)
    torch.testing.assert_close(kept_only.prefill_logits, removed.prefill_logits, atol=1e-9, rtol=0)
    assert not torch.allclose(kept_only.step_logits[1:], removed.step_logits[1:], atol=1e-6)


def test_eviction_needs_one_selecting_layer():
    with pytest.raises(ValueError, match="exactly one selecting layer"):
        PrunePlan(selectors={1: None, 2: None}, evict_earlier_caches=True).validate(4)


# --- against straightforward re-implementations of the official rules ----------------------------


def naive_peak_scores(x: torch.Tensor, k: int) -> tuple[list[float], list[list[float]]]:
    """DPC-kNN by its definition, token by token (no jitter)."""
    n, d = x.shape
    dist = [[float(((x[i] - x[j]) ** 2).sum().sqrt()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    k = min(k, n)
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in dist]
    largest = max(max(row) for row in dist)
    scores = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        scores.append((min(denser) if denser else largest) * density[i])
    return scores, dist


def top(values, count):
    """Indices of the `count` largest values, largest first, earlier index on ties."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def naive_fastvid(x, attention, retention, c=8, tau=0.9, d=0.4, p=4, beta=0.6, k=4):
    """FastVID on frames x [T, P, D] with attention [T, P]: {ordinal in the frames: embedding}."""
    t_count, p_count, _ = x.shape
    g = [F.normalize(x[t].mean(0), dim=0) for t in range(t_count)]
    sim = [float(g[t] @ g[t + 1]) for t in range(t_count - 1)]
    cuts = set(sorted(range(len(sim)), key=lambda i: (sim[i], i))[: min(c - 1, len(sim))]) | {i for i, s in enumerate(sim) if s < tau}
    segments, current = [], []
    for t in range(t_count):
        current.append(t)
        if t in cuts or t == t_count - 1:
            segments.append(current)
            current = []
    retained = int(p_count * retention)
    context = int(retained * d)
    salient_n = retained - context
    out = {}
    salient, rest = {}, {}
    for t in range(t_count):
        salient[t] = top(attention[t].tolist(), salient_n)
        rest[t] = [i for i in range(p_count) if i not in salient[t]]
        for i in salient[t]:
            out[t * p_count + i] = x[t, i]
    for segment in segments:
        length = len(segment)
        counts = {t: context for t in segment} if length == 1 else {
            t: (context * length // math.ceil(length / p) if (length - 1 - j) % p == 0 else 0) for j, t in enumerate(segment)}
        for t in segment:
            if counts[t] == 0:
                continue
            scores, _ = naive_peak_scores(x[t, rest[t]], k)
            targets = [rest[t][i] for i in top(scores, counts[t])]
            sources = [x[t, i] for i in rest[t]] if counts[t] == context else [x[f, i] for f in segment for i in rest[f]]
            gathered = {j: [] for j in range(len(targets))}
            for s in sources:
                cos = [float(F.normalize(s, dim=0) @ F.normalize(x[t, i], dim=0)) for i in targets]
                gathered[max(range(len(cos)), key=lambda j: (cos[j], -j))].append(s)
            for j, i in enumerate(targets):
                n = len(gathered[j])
                w = max(1 / (n + 1), beta)
                mean = torch.stack(gathered[j]).sum(0) / max(n, 1) if n else torch.zeros_like(x[t, i])
                out[t * p_count + i] = w * x[t, i] + (1 - w) * mean
    return out


@pytest.mark.parametrize("case", FASTVID_CASES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_fastvid_equals_the_official_rule(name, case):
    vlm, prompt = tiny_video_model(name), prompt_of(name)
    options = {**FASTVID_CASES[case], "density_noise": 0.0}  # the reference's 1e-6 jitter only breaks exact ties
    merged = build_method("fastvid", 0.5, **options).transform(vlm, prompt)
    frames, extra = video_frames(prompt, "fastvid")
    embeds = prompt.inputs_embeds[0, prompt.visual_index]
    attention = vision_token_scores(vlm, prompt, -1)[0][frames]
    opts = {"c": options.get("dyseg_c", 8), "tau": options.get("dyseg_tau", 0.9), "p": options.get("dtm_p", 4)}
    reference = naive_fastvid(embeds[frames], attention, 0.5, **opts)
    expected = sorted(int(frames.flatten()[i]) for i in reference) + extra.tolist()
    kept = merged.meta["fastvid"]["kept"]
    assert kept.tolist() == expected
    got = dict(zip(kept.tolist(), merged.inputs_embeds[0, merged.visual_index]))
    for i, value in reference.items():
        torch.testing.assert_close(got[int(frames.flatten()[i])], value, atol=1e-10, rtol=0)


def test_fastvid_facts_of_the_reference():
    """Stated from modeling_qwen2.py L912-948: DySeg cuts, the anchor distribution, the budget split."""
    sim = torch.tensor([0.95, 0.80, 0.97, 0.99, 0.93, 0.96, 0.98])  # 8 frames
    assert segment_sizes(sim, 3, 0.9) == [2, 3, 3]  # cut after 1 (< tau) and after 4 (2nd least similar)
    assert segment_sizes(sim, 1, 0.5) == [8]  # no cut: c = 1 and nothing under tau
    # C = 19: one-frame segments get 19; L = 5 -> ceil(5/4) = 2 anchors (frames 0 and 4 of 5) of 95 // 2
    assert anchor_counts([1, 5, 4], 19, 4) == [19, 47, 0, 0, 0, 47, 0, 0, 0, 76]
    fastvid = build_method("fastvid", 0.25)
    assert fastvid.budget_split(196) == (30, 19)  # R = int(49.0), C = int(19.6)
    assert build_method("fastvid", 0.1).budget_split(196) == (12, 7)  # R = 19, C = int(7.6)


def test_fastvid_and_prunevid_refuse_images_and_are_reproducible():
    vlm = tiny_video_model("tiny_qwen2vl")
    image = vlm.prepare(Sample(id="img", question="q ?", images=[video(1)[0]]))
    for name in ("fastvid", "prunevid"):
        with pytest.raises(InputError, match="prunes videos"):
            build_method(name).transform(vlm, image)
    prompt = prompt_of("tiny_qwen2vl")
    runs_ = [build_method("fastvid", 0.5).transform(vlm, prompt) for _ in range(2)]  # default jitter, seeded
    assert torch.equal(runs_[0].inputs_embeds, runs_[1].inputs_embeds)


def naive_cluster_means(x, count, k):
    scores, dist = naive_peak_scores(x, k)
    centres = top(scores, count)
    labels = [min(range(count), key=lambda c: (dist[centres[c]][i], c)) for i in range(x.shape[0])]
    for c, i in enumerate(centres):
        labels[i] = c
    means = [torch.stack([x[i] for i in range(x.shape[0]) if labels[i] == c]).mean(0) for c in range(count)]
    return means, centres


def naive_prunevid_stage1(x, frames, segment_ratio, temporal_k, tau, cluster_ratio, above, spatial_k):
    """PruneVid's stage 1 on x [T, P, D] -> ({ordinal: embedding}, {ordinal: group}), segments."""
    t_count, p_count, _ = x.shape
    means = x.mean(1)
    count = max(1, int(t_count * segment_ratio))
    scores, dist = naive_peak_scores(means, temporal_k)
    centres = top(scores, count)
    labels = [min(range(count), key=lambda c: (dist[centres[c]][t], c)) for t in range(t_count)]
    for c, t in enumerate(centres):
        labels[t] = c
    sizes = [end - start + 1 for start, end, _ in runs(refine_clusters(labels))]
    out, groups, group, start = {}, {}, 0, 0
    for size in sizes:
        window = x[start : start + size]
        static = []
        for pos in range(p_count):
            pair = [float(F.normalize(window[a, pos], dim=0) @ F.normalize(window[b, pos], dim=0))
                    for a in range(size) for b in range(size) if a != b]
            static.append(bool(pair) and sum(pair) / len(pair) > tau)
        sets = [([window[:, pos].mean(0) for pos in range(p_count) if static[pos]], [frames[start, pos] for pos in range(p_count) if static[pos]])]
        sets += [([window[w, pos] for pos in range(p_count) if not static[pos]], [frames[start + w, pos] for pos in range(p_count) if not static[pos]])
                 for w in range(size)]
        for feats, where in sets:
            if not feats:
                continue
            if len(feats) > above:
                feats, centres = naive_cluster_means(torch.stack(feats), int(len(feats) * cluster_ratio), spatial_k)
                where = [where[c] for c in centres]
            for f, at in zip(feats, where):
                out[int(at)], groups[int(at)] = f, group
            group += 1
        start += size
    return out, groups, sizes


@pytest.mark.parametrize("name", TINY_MODELS)
def test_prunevid_equals_the_official_rule(name):
    vlm, prompt = tiny_video_model(name), prompt_of(name)
    options = {**PRUNEVID_OPTIONS, "density_noise": 0.0}
    method = build_method("prunevid", 0.4, **options)
    merged = method.transform(vlm, prompt)
    info = merged.meta["prunevid"]
    frames, extra = video_frames(prompt, "prunevid")
    embeds = prompt.inputs_embeds[0, prompt.visual_index]
    reference, groups, sizes = naive_prunevid_stage1(
        embeds[frames], frames, options["temporal_segment_ratio"], options["temporal_k"], options["tau"], 0.5,
        options["merge_above"], options["spatial_k"])
    assert info["segments"] == sizes
    kept = info["kept"].tolist()
    assert kept == sorted([*reference, *extra.tolist()])
    got = dict(zip(kept, merged.inputs_embeds[0, merged.visual_index]))
    for ordinal, value in reference.items():
        torch.testing.assert_close(got[ordinal], value, atol=1e-10, rtol=0)
    assert [groups.get(o, -1) for o in kept] == info["groups"].tolist()
    assert any(g_size > 1 for g_size in sizes) and len(set(groups.values())) > len(sizes)  # static and dynamic groups
    # stage 2: layer K's attention on HF's own hidden states, before RoPE, over all tokens
    layer = options["layer"]
    hidden = _hf_eager(vlm, merged).hidden_states[layer][0]
    block = vlm.decoder.layers[layer]
    attn = block.self_attn
    h = block.input_layernorm(hidden)
    q = attn.q_proj(h).view(h.shape[0], -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(h).view(h.shape[0], -1, attn.head_dim).transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    after = torch.arange(int(merged.visual_index.max()) + 1, merged.length)
    weights = (q[:, after] @ k.transpose(1, 2) * attn.scaling).softmax(-1)  # [H, Q, n]
    score = weights[:, :, merged.visual_index].amax(0).amax(0)
    survivors = [kept[i] for i, g in enumerate(info["groups"].tolist()) if g < 0]
    for g in range(info["num_groups"]):
        members = [i for i, label in enumerate(info["groups"].tolist()) if label == g]
        survivors += [kept[members[i]] for i in top(score[members].tolist(), int(len(members) * 0.4))]
    plan = method.plan(vlm, merged)
    generate(vlm, merged, plan, max_new_tokens=1)
    assert plan.info["kept"][layer + 1].tolist() == sorted(survivors)


def test_prunevid_facts_of_the_reference():
    """Stated from modeling_pllava.py L213-314 (refine_clusters) and L776-790 (static positions)."""
    # label 0: runs 0-1 and 3-4 both of the longest length (kept); label 1 only single frames (dropped);
    # the freed frame 2 has equal runs both sides: the left one wins
    assert refine_clusters([0, 0, 1, 0, 0, 2, 2]) == [0, 0, 0, 0, 0, 2, 2]
    # a shorter run of a label is relabelled after its longer neighbour
    assert refine_clusters([1, 0, 0, 0, 1, 1, 2, 2]) == [0, 0, 0, 0, 1, 1, 2, 2]
    # nothing survives: every frame goes to cluster 0
    assert refine_clusters([0, 1, 2]) == [0, 0, 0]
    prunevid = build_method("prunevid", 0.4)
    assert prunevid.keep_count_of(14) == 5 and prunevid.keep_count_of(2) == 0
