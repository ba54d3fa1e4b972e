"""VisionZip on every tiny family x (one image, two images, a video), in float64.

* removal == masking: the zipped prompt gives the same logits (prefill and 6 decode steps) as the
  unzipped prompt with the zipped embeddings at the kept slots and every other visual token masked
  from layer 0 on, through the engine's mask mode (as the other methods' exactness tests);
* budget: dominant + contextual == round(r N_v) == the engine's count in every layer;
* dominant tokens == the top of an independent reference: the maps HF's own eager attention function
  computes in the vision tower (recorded while the family's vision forward runs), reduced to
  "attention received" and pooled onto the LLM tokens by hand (Qwen2-VL 2x2 groups; LLaVA-OV base +
  unpadded / downscaled crops + newlines, 2x2-pooled frames; VILA zero-padded 2x2 groups, column-major);
* the benchmark runner records the pre-merge count and prices the vanilla reference with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, model_cfg, random_image
from test_methods import tiny
from transformers import AttentionInterface
from transformers.image_processing_utils import select_best_resolution
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.siglip import modeling_siglip

from explain_prune.engine import flops as flops_lib
from explain_prune.benchmarks.base import Benchmark
from explain_prune.stages.evaluate import EvalSettings, evaluate
from explain_prune.core import InputError
from explain_prune.engine import PrunePlan, generate
from explain_prune.methods import build_method, keep_count
from explain_prune.methods.visionzip import zip_tokens
from explain_prune.models import Sample, build_vlm

KINDS = ["image", "images", "video"]
RECORDER = "visionzip_test_eager_recorder"


def sample(kind: str) -> Sample:
    question = "What is in the picture ?"
    if kind == "image":
        return Sample(id="img", question=question, images=[random_image(30, 112, 140)], answer="a")
    if kind == "images":
        return Sample(id="imgs", question=question, images=[random_image(31, 84, 112), random_image(32, 112, 84)])
    return Sample(id="vid", question=question, video=[random_image(40 + i, 112, 112) for i in range(4)], answer="b")


@functools.lru_cache(maxsize=None)
def prepared(name: str, kind: str):
    return tiny(name).prepare(sample(kind))


# --- removal == masking, budget ------------------------------------------------------------------


def keep_ordinals(kept: torch.Tensor) -> PrunePlan:
    """A plan that keeps exactly the visual tokens `kept` (ordinals) from layer 0 on."""
    return PrunePlan(selectors={0: lambda view: view.visual_index[kept.to(view.visual_index.device)]})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_removal_equals_masking_and_budget(name, kind, monkeypatch):
    vlm, prompt = tiny(name), prepared(name, kind)
    method = build_method("visionzip", 0.5)
    zipped = method.transform(vlm, prompt)
    info = zipped.meta["visionzip"]
    n = prompt.num_visual
    k = keep_count(0.5, n)
    targets = info["contextual_targets"]
    assert info["num_visual_input"] == n and zipped.num_visual == k == info["kept"].numel()
    assert info["dominant"] + targets.numel() == k and targets.numel() == round(k * 10 / 64) > 0
    assert set(targets.tolist()) <= set(info["kept"].tolist())
    # the reference prompt: every token of the original, the zipped embeddings written at the kept slots
    embeds = prompt.inputs_embeds.clone()
    embeds[0, prompt.visual_index[info["kept"]]] = zipped.inputs_embeds[0, zipped.visual_index]
    assert not torch.equal(embeds, prompt.inputs_embeds)  # the contextual merge changed the targets
    full = dataclasses.replace(prompt, inputs_embeds=embeds)
    # no end-of-answer token, so both runs decode all 6 steps (random weights stop early)
    monkeypatch.setattr(type(vlm), "eos_token_ids", property(lambda self: [-1]))
    removed = generate(vlm, prompt, method, max_new_tokens=6, return_logits=True)  # the engine zips it
    masked = generate(vlm, full, keep_ordinals(info["kept"]), max_new_tokens=6, mode="mask", return_logits=True)
    assert len(removed.tokens) == 6 and removed.tokens == masked.tokens
    torch.testing.assert_close(removed.prefill_logits, masked.prefill_logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(removed.step_logits, masked.step_logits, atol=1e-9, rtol=0)
    layers = vlm.decoder.num_layers
    assert removed.kept_per_layer == masked.kept_per_layer == method.visual_tokens_per_layer(n, layers) == [k] * layers


# --- dominant tokens against HF's eager vision attention --------------------------------------------


@contextlib.contextmanager
def eager_maps(attn: torch.nn.Module, eager):
    """Run the tower of `attn` with HF's eager attention function `eager`; yields the list of maps
    ([B, H, n, n], one per call) that `attn` computes."""
    maps: list[torch.Tensor] = []

    def record(module, *args, **kwargs):
        out, weights = eager(module, *args, **kwargs)
        if module is attn:
            maps.append(weights.detach())
        return out, weights

    AttentionInterface.register(RECORDER, record)
    config = attn.config
    previous = config._attn_implementation
    config._attn_implementation = RECORDER
    try:
        yield maps
    finally:
        config._attn_implementation = previous


def received(maps: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, n, n] maps -> [B, n]: mean over heads and queries of the attention each key gets."""
    return torch.cat([m.mean(1).mean(1) for m in maps])


def qwen2vl_reference(vlm, prompt, layer):
    visual = vlm.model.model.visual
    grid = prompt.meta.get("image_grid_thw", prompt.meta.get("video_grid_thw"))
    with eager_maps(visual.blocks[layer].attn, modeling_qwen2_vl.eager_attention_forward) as maps, torch.no_grad():
        visual(prompt.meta["pixel_values"], grid_thw=grid)
    per_patch = torch.cat([m[0].mean(0).mean(0) for m in maps])  # one window per image / temporal patch
    assert len(maps) == (grid.shape[0] if "image_grid_thw" in prompt.meta else int(grid[0, 0]))
    return per_patch.view(-1, 4).mean(1)  # the merger's 2x2 patches are consecutive


def unpad(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred crop of a tiled [rows, cols] map that holds the image (not the padding)."""
    rows, cols = grid.shape
    if width / height > cols / rows:
        keep = int(round(height * cols / width, 7))
        pad = (rows - keep) // 2
        return grid[pad : rows - pad]
    keep = int(round(width * rows / height, 7))
    pad = (cols - keep) // 2
    return grid[:, pad : cols - pad]


def with_newlines(grid: torch.Tensor) -> torch.Tensor:
    return torch.cat([grid, torch.full((grid.shape[0], 1), math.inf, dtype=grid.dtype)], 1).flatten()


def llava_ov_reference(vlm, prompt, layer):
    model, meta = vlm.model.model, prompt.meta
    p = vlm.patches
    inf = torch.tensor([math.inf], dtype=torch.float64)
    attn = model.vision_tower.encoder.layers[layer].self_attn
    with eager_maps(attn, modeling_siglip.eager_attention_forward) as maps, torch.no_grad():
        if "pixel_values_videos" in meta:
            model.get_video_features(meta["pixel_values_videos"])
        else:
            model.get_image_features(meta["pixel_values"], meta["image_sizes"], batch_num_images=meta["batch_num_images"])
    tiles = received(maps).view(-1, p, p)  # [tiles, p, p]
    if "pixel_values_videos" in meta:
        assert p % 2 == 0  # bilinear 2x downscaling of an even grid == 2x2 means
        return torch.cat([F.avg_pool2d(tiles[:, None], 2).flatten(), inf])
    sizes = meta["image_sizes"].tolist()
    if len(sizes) > 1:  # multi-image: each base grid and one newline
        assert tiles.shape[0] == len(sizes)
        return torch.cat([torch.cat([t.flatten(), inf]) for t in tiles])
    (height, width), tile = sizes[0], vlm.tile
    best_h, best_w = select_best_resolution([height, width], model.config.image_grid_pinpoints)
    nph, npw = best_h // tile, best_w // tile
    assert tiles.shape[0] == 1 + nph * npw
    crops = tiles[1:].view(nph, npw, p, p).permute(0, 2, 1, 3).reshape(nph * p, npw * p)  # tiles side by side
    crops = unpad(crops, height, width)
    max_tiles = int(vlm.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(crops.numel() / (max_tiles * p * p))
    if ratio > 1.1:
        size = [int(crops.shape[0] // ratio), int(crops.shape[1] // ratio)]
        crops = F.interpolate(crops[None, None], size=size, mode="bilinear")[0, 0]
    segment = meta["visual_segments"][1]
    assert (segment["rows"], segment["cols"]) == tuple(crops.shape)
    return torch.cat([tiles[0].flatten(), with_newlines(crops)])


def vila_reference(vlm, prompt, layer):
    model = vlm.model
    attn = model.vision_tower.encoder.layers[layer].self_attn
    with eager_maps(attn, modeling_siglip.eager_attention_forward) as maps, torch.no_grad():
        model.vision_features(prompt.meta["pixel_values"])
    per_patch = received(maps)  # [images, s*s]
    s = math.isqrt(per_patch.shape[1])
    m = (s + 1) // 2
    grid = F.pad(per_patch.view(-1, s, s), (0, 2 * m - s, 0, 2 * m - s), value=math.nan)  # [images, 2m, 2m]
    groups = grid.view(-1, m, 2, m, 2).nanmean((2, 4))  # [images, row_pair, col_pair], real patches only
    return groups.transpose(1, 2).flatten()  # token index = col_pair * m + row_pair (VILA's order)


REFERENCES = {"qwen2vl": qwen2vl_reference, "llava_onevision": llava_ov_reference, "vila": vila_reference}


def check_dominant(vlm, prompt, layer):
    reference = REFERENCES[vlm.family](vlm, prompt, layer)
    scores, keys = vlm.vision_token_scores(prompt, layer)
    assert keys.shape[0] == prompt.num_visual
    # HF eager takes the softmax in float32; +inf (newline tokens) must sit at the same tokens
    torch.testing.assert_close(scores, reference, atol=1e-9, rtol=1e-6)
    info = build_method("visionzip", 0.5, vision_layer=layer).transform(vlm, prompt).meta["visionzip"]
    dominant = set(info["kept"].tolist()) - set(info["contextual_targets"].tolist())
    expected = torch.argsort(-reference, stable=True)[: info["dominant"]]
    assert dominant == set(expected.tolist())
    newlines = set(reference.isinf().nonzero().flatten().tolist())  # LLaVA-OV's: always dominant
    assert bool(newlines) == (vlm.family == "llava_onevision") and newlines <= dominant


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_dominant_tokens_are_the_top_of_eager_vision_attention(name, kind):
    vlm, prompt = tiny(name), prepared(name, kind)
    for layer in (-2, -1):
        check_dominant(vlm, prompt, layer)


def test_llava_ov_downscaled_crops():
    """anyres_max_1 shrinks the 2x2-tile crop map bilinearly (ratio > 1.1): scores follow the features."""
    vlm = build_vlm(model_cfg("tiny_llava_ov", dtype="float64", **{"image.vision_aspect_ratio": "anyres_max_1"}))
    prompt = vlm.prepare(sample("image"))
    crops = prompt.meta["visual_segments"][1]
    assert crops["rows"] * crops["cols"] < 4 * vlm.patches**2  # the map was downscaled
    check_dominant(vlm, prompt, -2)


# --- zip_tokens on hand-made inputs ---------------------------------------------------------------------


def test_zip_tokens_dominant_and_contextual():
    torch.manual_seed(0)
    scores, keys, embeds = torch.rand(20), torch.randn(20, 5), torch.randn(20, 3, dtype=torch.float64)
    scores[7] = math.inf  # a non-patch token (LLaVA-OV newline): always dominant
    kept, new, targets = zip_tokens(scores, keys, embeds, dominant=6, contextual=2)
    dominant = torch.argsort(-scores)[:6]
    assert 7 in dominant.tolist()
    rest = [i for i in range(20) if i not in set(dominant.tolist())]  # 14 left, stride 7 -> targets rest[0], rest[7]
    assert targets.tolist() == [rest[0], rest[7]]
    assert kept.tolist() == sorted(dominant.tolist() + targets.tolist())
    metric = F.normalize(keys, dim=-1)
    others = [i for i in rest if i not in targets.tolist()]
    for slot, target in enumerate(targets.tolist()):
        members = [o for o in others if int((metric[o] @ metric[targets].T).argmax()) == slot]
        expected = embeds[target] + (embeds[members].mean(0) if members else 0)
        torch.testing.assert_close(new[kept.tolist().index(target)], expected)
    for d in dominant.tolist():
        assert torch.equal(new[kept.tolist().index(d)], embeds[d])


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input():
    vlm, prompt = tiny("tiny_vila"), prepared("tiny_vila", "image")
    method = build_method("visionzip", 0.5)
    with pytest.raises(InputError, match="transform"):
        method.plan(vlm, prompt)
    with pytest.raises(InputError, match="already compressed"):
        method.transform(vlm, method.transform(vlm, prompt))
    with pytest.raises(InputError, match="vision_layer 2 is outside a 2-block"):
        build_method("visionzip", 0.5, vision_layer=2).transform(vlm, prompt)
    with pytest.raises(InputError, match="contextual_share"):
        build_method("visionzip", 0.5, contextual_share=1.0)

    class NoHook:
        family = "other"

    with pytest.raises(InputError, match="vision_token_scores"):
        method.transform(NoHook(), prompt)


# --- the benchmark runner ------------------------------------------------------------------------------


class ImageAndVideo(Benchmark):
    name = "visionzip_fixture"
    prompt_id = extraction_id = "raw"
    max_new_tokens = 2

    def load(self, limit=None):
        yield sample("image")
        yield sample("video")

    def extract(self, prediction, sample_meta):
        return prediction

    def score(self, records, judge=None):
        return {"overall": sum(r.extracted == r.answer for r in records) / len(records)}


def test_runner_prices_vanilla_with_the_pre_merge_count(tmp_path):
    name = "tiny_llava_ov"
    dims = model_cfg(name).llm
    results = evaluate(tiny(name), ImageAndVideo(tmp_path), build_method("visionzip", 0.5), tmp_path, EvalSettings(), dims)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    inputs = [prepared(name, "image").num_visual, prepared(name, "video").num_visual]
    assert [r["num_visual_input"] for r in rows] == inputs  # rows are logged in load order
    assert [r["num_visual"] for r in rows] == [keep_count(0.5, n) for n in inputs]
    eff = results["efficiency"]
    vanilla = sum(flops_lib.llm_flops(dims, n) for n in inputs) / 2
    pruned = sum(flops_lib.llm_flops(dims, keep_count(0.5, n)) for n in inputs) / 2
    assert eff["vanilla_flops_T"] == pytest.approx(flops_lib.tera(vanilla), rel=1e-12)
    assert eff["flops_T"] == pytest.approx(flops_lib.tera(pruned), rel=1e-12) and pruned < vanilla
    assert eff["num_visual_input"] == sum(inputs) / 2
    assert eff["layer_avg_retention"] == pytest.approx(sum(keep_count(0.5, n) for n in inputs) / sum(inputs))
