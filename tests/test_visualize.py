"""python -m explain_prune.visualize and explain_prune.explain.heatmap: rasters, kept tokens, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, model_cfg, random_image, write_video
from hydra import compose, initialize_config_dir
from PIL import Image

import explain_prune.cli  # noqa: F401  (registers the ep.asset resolver the synthetic model config uses)
from explain_prune.cli import task
from explain_prune.compress.network import FTheta, FThetaConfig, save_compressor
from explain_prune.engine import generate
from explain_prune.explain import heatmap
from explain_prune.methods import build_method
from explain_prune.models import Sample, build_vlm
from explain_prune.models.base import VLM
from explain_prune.synthetic.generator import (
    SceneObject,
    SyntheticConfig,
    make_sample,
    object_mask,
)
from explain_prune.visualize import run

NO = list(VLM.NO_PLACE)


# --- the raster -------------------------------------------------------------------------------
def test_raster_places_each_value_in_exactly_its_box():
    boxes = torch.tensor(
        [
            [0, 1, 0, 0.0, 0.0, 0.5, 0.5],  # picture 0: columns 0-4, rows 0-3 of a 10 x 8 picture
            [0, 1, 0, 0.5, 0.0, 1.0, 0.5],  # columns 5-9, rows 0-3
            [0, 1, 0, 0.0, 0.5, 0.34, 1.0],  # pixel centres 0.05, 0.15, 0.25 < 0.34: columns 0-2, rows 4-7
            NO,  # a newline token
            [1, 2, 0, 0.0, 0.0, 1.0, 1.0],  # another picture
            [0, 1, 1, 0.0, 0.0, 1.0, 1.0],  # another view of picture 0
        ],
        dtype=torch.float64,
    )
    values = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    expected = np.full((8, 10), np.nan)
    expected[:4, :5], expected[:4, 5:], expected[4:, :3] = 10, 20, 30
    np.testing.assert_array_equal(heatmap.raster(values, heatmap.owner_map(boxes, 0, 0, 8, 10)), expected)
    np.testing.assert_array_equal(heatmap.raster(values, heatmap.owner_map(boxes, 1, 0, 8, 10)), np.full((8, 10), 50.0))
    np.testing.assert_array_equal(heatmap.raster(values, heatmap.owner_map(boxes, 0, 1, 8, 10)), np.full((8, 10), 60.0))
    overlapping = torch.cat([boxes, torch.tensor([[0, 1, 0, 0.4, 0.4, 0.6, 0.6]], dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="overlap"):
        heatmap.owner_map(overlapping, 0, 0, 8, 10)


@pytest.fixture(scope="module")
def tiny():
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_vlm(model_cfg(name))
        return built[name]

    return get


def owners(vlm, image, view=0):
    prompt = vlm.prepare(Sample(id="r", question="what is this ?", images=[image]))
    boxes = vlm.visual_token_boxes(prompt)
    return heatmap.owner_map(boxes, 0, view, image.height, image.width)


def test_each_familys_raster_follows_its_token_layout(tiny):
    y, x = np.mgrid[0:112, 0:112]
    # Qwen2-VL: 28-px tokens in raster order
    assert np.array_equal(owners(tiny("tiny_qwen2vl"), random_image(0)), (y // 28) * 4 + x // 28)
    # LLaVA-OneVision, 112 px: a 4 x 4 thumbnail of 28-px tokens, then 8 rows of 8 crop tokens + a newline
    llava = tiny("tiny_llava_ov")
    assert np.array_equal(owners(llava, random_image(0)), (y // 28) * 4 + x // 28)
    assert np.array_equal(owners(llava, random_image(0), view=1), 16 + (y // 14) * 9 + x // 14)
    # VILA, 384 px: 28-px tokens in column-major order over the first 378 px; the rest is read by none
    y, x = np.mgrid[0:384, 0:384]
    expected = np.where((y < 378) & (x < 378), (x // 28) * 14 + y // 28, -1)
    assert np.array_equal(owners(tiny("tiny_vila"), random_image(0, 384, 384)), expected)


# --- kept tokens ------------------------------------------------------------------------------
def test_kept_tokens_are_the_top_k_as_the_gae_method_keeps_them(tiny):
    vlm = tiny("tiny_qwen2vl")
    prompt = vlm.prepare(Sample(id="k", question="what is this ?", images=[random_image(1)]))
    assert prompt.num_visual == 16
    scores = torch.from_numpy(np.random.default_rng(0).permutation(16).astype(np.float32))
    for r, k in ((0.5, 8), (0.25, 4), (0.01, 1)):  # k = max(1, round(r * 16))
        kept, _ = heatmap.keep(vlm, prompt, scores, r, max_new_tokens=2)
        assert kept.tolist() == sorted(np.argsort(-scores.numpy())[:k].tolist())
    kept, _ = heatmap.keep(vlm, prompt, torch.ones(16), 0.25, max_new_tokens=2)
    assert kept.tolist() == [0, 1, 2, 3]  # ties go to the earlier token, as TokenView.keep_top
    # the same set and answer as the gae method's own engine run at that retention
    gae = build_method("gae", 0.25, max_new_tokens=4)
    rv, _ = gae.scores(vlm, prompt)
    plan = gae.plan(vlm, prompt)
    answer = generate(vlm, prompt, plan, max_new_tokens=4)
    kept, text = heatmap.keep(vlm, prompt, rv, 0.25, max_new_tokens=4)
    assert kept.tolist() == plan.info["kept"][0].tolist() and text == answer.text


def test_ground_truth_regions_hold_the_queried_object():
    for cfg in (SyntheticConfig(max_objects=3), SyntheticConfig(max_objects=3, frames=8)):
        sample = make_sample(cfg, seed=5, index=2)
        gt = heatmap.gt_boxes(sample)
        target = sample.meta["objects"][sample.meta["target"]]
        pixels = object_mask(cfg, SceneObject(**{**target, "slots": tuple(target["slots"])}))
        side = cfg.image_px
        frames = [f for f in range(max(1, cfg.frames)) if not cfg.frames or f // 2 in target["slots"]]
        for f in range(max(1, cfg.frames)):
            mask = heatmap._gt_mask(gt, f, side, side)
            if f in frames:
                assert mask[pixels].all() and mask.any()  # covers the whole object
                cells = np.unique(np.argwhere(mask) // 28, axis=0)
                for cy, cx in cells:  # every outlined 28-px token holds an object pixel
                    assert pixels[cy * 28 : cy * 28 + 28, cx * 28 : cx * 28 + 28].any()
            else:
                assert not mask.any()  # the object is absent from this frame


# --- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ftheta(tmp_path_factory):
    torch.manual_seed(0)
    return save_compressor(tmp_path_factory.mktemp("ftheta") / "compressor.safetensors", FTheta(FThetaConfig(channels=[8, 8])))


def visualize_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="visualize", overrides=list(overrides))


def check_outputs(png: Path, layout: tuple[int, int]):
    """A valid PNG with `layout` (rows, columns) of square-ish panels, and kept sets = top-k of the
    recorded scores."""
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG"
        width, height = img.size
    rows, cols = layout
    assert (width > height) == (cols > rows)
    record = json.loads(png.with_suffix(".json").read_text())
    n = record["num_visual"]
    assert set(record["scorers"]) == {"R_v", "f_θ"}
    for scorer in record["scorers"].values():
        scores = np.asarray(scorer["scores"])
        assert scores.shape == (n,) and (scores >= 0).all()
        for r, kept in scorer["kept"].items():
            k = max(1, round(float(r) * n))
            assert kept == sorted(np.argsort(-scores, kind="stable")[:k].tolist())
    return record


@pytest.mark.parametrize("model, panels", [("tiny_qwen2vl", 1), ("tiny_llava_ov", 2), ("tiny_vila", 1)])
def test_cli_writes_a_png_per_family(tmp_path, ftheta, model, panels):
    image = tmp_path / "in.png"
    random_image(3, 84, 112).save(image)
    out = tmp_path / "map.png"
    cfg = visualize_cfg(f"model={model}", f"image={image}", "question=what is this ?", f"checkpoint={ftheta}", f"out={out}", "max_new_tokens=3")
    assert run(cfg) == out
    record = check_outputs(out, (panels, 7))  # LLaVA-OneVision: thumbnail and crops rows
    assert record["question"] == "what is this ?" and record["model"] == model


def test_cli_video_draws_a_row_of_frames(tmp_path, ftheta):
    video = write_video(tmp_path / "clip.mp4", num_frames=6)
    out = tmp_path / "video.png"
    cfg = visualize_cfg(
        "model=tiny_qwen2vl", f"video={video}", "question=what is this ?", f"checkpoint={ftheta}", f"out={out}", "max_new_tokens=3"
    )
    run(cfg)
    record = check_outputs(out, (7, 4))  # 4 frames (tiny_qwen2vl's budget) x (input, 2 x (heat-map, 50 %, 25 %))
    assert record["num_visual"] == 2 * 4  # 2 temporal patches of 2 x 2 tokens


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint=/nonexistent/compressor.safetensors"], "compressor file not found: /nonexistent"),
        (["checkpoint={bad}"], "unreadable compressor file"),
        (["image=/nonexistent.png", "question=what ?"], "image file not found: /nonexistent.png"),
        (["video=/nonexistent.mp4", "question=what ?"], "video file not found: /nonexistent.mp4"),
        (["image={image}"], "question=<text> is needed"),
        (["retentions=[0.5,1.5]"], "retention must be in (0, 1]"),
        (["synthetic.index=-1"], "synthetic.index must be a non-negative integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    image = tmp_path / "in.png"
    random_image(0).save(image)
    overrides = [o.format(bad=bad, image=image) for o in overrides]
    cfg = visualize_cfg("model=tiny_qwen2vl", f"out={tmp_path / 'x.png'}", *overrides)
    with pytest.raises(SystemExit) as exit_info:
        task(run)(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "x.png").exists()


def test_no_arguments_makes_the_synthetic_picture(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "explain_prune.visualize"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (png,) = (tmp_path / "outputs" / "visualize" / "runs").glob("*/heatmap.png")
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["model"] == "synthetic" and record["num_visual"] == 64 and set(record["scorers"]) == {"R_v"}
    assert record["sample_id"] == "synthetic-image-g4c56f0-s1000002-0" and record["gt_tokens"]
    assert f"heat-map: {png.relative_to(tmp_path)}" in proc.stdout or f"heat-map: {png}" in proc.stdout
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 2.5 * img.size[1]  # one row: input, heat-map, 50 %, 25 %
