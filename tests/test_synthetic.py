"""The synthetic grid task: determinism, ground-truth tokens, answer dependence, video frames,
alignment with the Qwen2-VL adapter, and the shipped trained model."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from explain_prune.synthetic import MODEL_DIR
from explain_prune.synthetic.generator import (
    ANSWERS,
    COLORS,
    SHAPES,
    TOKEN_PX,
    SyntheticConfig,
    generate,
    make_sample,
    make_scene,
    render,
    scene_to_sample,
    solve,
    token_positions,
    with_objects,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(grid=4, cell_px=56, min_objects=2, max_objects=6)


def saturated(pixels: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels of any object (some channel > 190; the background never exceeds 158)."""
    return pixels.max(-1) > 190


def of_color(pixels: np.ndarray, color: str) -> np.ndarray:
    """[H, W] bool: object pixels of one colour (object texture is +-15 around the colour)."""
    return np.all(np.abs(pixels.astype(int) - np.array(COLORS[color])) <= 15, axis=-1)


def token_map(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool -> [h*w] bool: which 28x28 tokens (raster order) contain a True pixel."""
    h, w = mask.shape[0] // TOKEN_PX, mask.shape[1] // TOKEN_PX
    return mask.reshape(h, TOKEN_PX, w, TOKEN_PX).any(axis=(1, 3)).reshape(-1)


# --- generator ----------------------------------------------------------------------------------
def test_deterministic_by_seed_and_index():
    a, b = make_sample(SMALL, seed=3, index=17), make_sample(SMALL, seed=3, index=17)
    assert (a.id, a.question, a.answer, a.meta) == (b.id, b.question, b.answer, b.meta)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    others = [make_sample(SMALL, seed=4, index=17), make_sample(SMALL, seed=3, index=18)]
    for c in others:
        assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    # generate() is the same stream, independent of where it starts
    assert generate(SMALL, 3, seed=3, start=16)[1].meta == a.meta


def test_sizes_answers_and_chance():
    samples = generate(SMALL, 64, seed=0)
    assert {s.meta["question_type"] for s in samples} == {"shape", "color"}
    for s in samples:
        assert s.images[0].size == (224, 224)
        assert s.meta["visual_grid"] == (1, 8, 8)
        assert s.answer in ANSWERS[s.meta["question_type"]] and len(s.meta["answers"]) == 4
        assert s.meta["chance"] == 0.25
        assert 2 <= len(s.meta["objects"]) <= 6
        assert s.meta["gt_tokens"] == sorted(set(s.meta["gt_tokens"])) and 1 <= len(s.meta["gt_tokens"]) <= 4
    large = make_sample(SyntheticConfig(grid=8, cell_px=56, max_objects=10), seed=0, index=0)
    assert large.images[0].size == (448, 448) and large.meta["visual_grid"] == (1, 16, 16)
    with pytest.raises(ValueError):
        SyntheticConfig(cell_px=42)  # not token-aligned
    with pytest.raises(ValueError):
        SyntheticConfig(grid=2, max_objects=5)


def test_all_words_in_tokenizer():
    from explain_prune.models.tiny import build_tokenizer

    tok = build_tokenizer()
    unk = tok.unk_token_id
    words = {w for s in generate(SMALL, 64, seed=1) for w in s.question.split()} | set(SHAPES) | set(COLORS)
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, w


@pytest.mark.parametrize("cfg", [SMALL, SyntheticConfig(grid=8, cell_px=28, min_objects=3, max_objects=12)])
def test_gt_tokens_cover_exactly_the_queried_object(cfg):
    for s in generate(cfg, 24, seed=5):
        scene = make_scene(cfg, seed=5, index=int(s.id.rsplit("-", 1)[1]))
        pix = np.asarray(s.images[0])
        gt = np.zeros(cfg.tokens_per_side**2, dtype=bool)
        gt[s.meta["gt_tokens"]] = True
        # removing the queried object changes pixels in exactly the gt tokens
        rest = [o for i, o in enumerate(scene.objects) if i != scene.target]
        without = np.asarray(render(dataclasses.replace(scene, objects=rest))[0])
        assert np.array_equal(token_map(np.any(pix != without, axis=-1)), gt)
        # the queried object's colour: all its pixels are in gt tokens when the colour selects it
        target = scene.objects[scene.target]
        if s.meta["question_type"] == "shape":
            assert np.array_equal(token_map(of_color(pix, target.color)), gt)
        # gt tokens lie inside the object's cell, and other objects never touch them
        others = token_map(saturated(without))
        assert not (others & gt).any()


def test_answer_depends_only_on_the_queried_object():
    rng = np.random.default_rng(0)
    for index in range(32):
        scene = make_scene(SMALL, seed=7, index=index)
        target = scene.objects[scene.target]
        sample = scene_to_sample(scene, "x")
        free = [c for c in range(16) if c != target.row * 4 + target.col]
        moved = []
        for o, cell in zip(scene.objects[1:], rng.choice(free, size=len(scene.objects) - 1, replace=False)):
            if scene.question_type == "shape":  # the colour selects: keep distractors off the target colour
                color = str(rng.choice([c for c in COLORS if c != target.color]))
                shape = str(rng.choice(SHAPES))
            else:
                color = str(rng.choice(list(COLORS)))
                shape = str(rng.choice([s for s in SHAPES if s != target.shape]))
            moved.append(dataclasses.replace(o, color=color, shape=shape, row=int(cell) // 4, col=int(cell) % 4))
        perturbed = with_objects(scene, [target, *moved])
        other = scene_to_sample(perturbed, "y")
        assert perturbed.answer == scene.answer == sample.answer
        assert other.meta["gt_tokens"] == sample.meta["gt_tokens"]
        # changing the asked attribute of the queried object changes the answer
        attr = scene.question_type
        new_value = next(v for v in ANSWERS[attr] if v != getattr(target, attr))
        changed = with_objects(scene, [dataclasses.replace(target, **{attr: new_value}), *scene.objects[1:]])
        assert changed.answer == new_value != scene.answer
    with pytest.raises(ValueError):  # an ambiguous selector is rejected by the oracle
        o = make_scene(SMALL, seed=7, index=0).objects[0]
        solve(f"what shape is the {o.color} object ?", [o, dataclasses.replace(o, row=(o.row + 1) % 4)])


def test_video_gt_frames():
    cfg = SyntheticConfig(grid=4, cell_px=56, min_objects=2, max_objects=5, frames=8)
    for index in range(12):
        s = make_sample(cfg, seed=2, index=index)
        scene = make_scene(cfg, seed=2, index=index)
        assert s.video is not None and len(s.video) == 8 and not s.images
        assert s.meta["visual_grid"] == (4, 8, 8)
        target = scene.objects[scene.target]
        assert 1 <= len(target.slots) < 4  # absent from at least one temporal token
        gt = np.array(s.meta["gt_tokens"])
        assert set((gt // 64).tolist()) == set(target.slots)
        spatial = token_positions(dataclasses.replace(cfg, frames=0), target)
        cell = np.zeros(64, dtype=bool)
        cell[spatial] = True
        for f, frame in enumerate(s.video):
            present = token_map(of_color(np.asarray(frame), target.color)) & cell
            if f // 2 in target.slots:
                assert np.array_equal(present, cell)
                assert sorted((gt[gt // 64 == f // 2] % 64).tolist()) == spatial
            else:  # the target's tokens show background only
                assert not token_map(saturated(np.asarray(frame)))[cell].any()


# --- adapter alignment and the shipped model ------------------------------------------------------
def synthetic_model_cfg(pretrained: bool = True, name: str = "synthetic"):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    if not pretrained:
        cfg.pretrained = None
    return cfg


@pytest.fixture(scope="module")
def random_vlm():
    from explain_prune.models import build_vlm

    return build_vlm(synthetic_model_cfg(pretrained=False))


def test_gt_tokens_index_the_adapters_visual_sequence(random_vlm):
    """The gt indices address the adapter's visual tokens: the 2x2 patches merged into token j
    (rows 4j..4j+3 of pixel_values) hold the object's colour exactly when j is a gt token."""
    from explain_prune.synthetic.generator import object_mask

    proc = random_vlm.image_processor
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    for cfg in (SMALL, SyntheticConfig(grid=8, cell_px=56, min_objects=2, max_objects=10)):
        s = make_sample(cfg, seed=9, index=1)
        prompt = random_vlm.prepare(s)
        assert prompt.visual_grid == s.meta["visual_grid"] and prompt.num_visual == cfg.num_visual_tokens
        pixels, _ = random_vlm.image_pixels(s.images)
        # [tokens, 4 patches, C, T, 14, 14] -> RGB 0..255 per patch pixel
        patches = pixels.view(-1, 4, 3, 2, 14, 14)[:, :, :, 0].permute(0, 1, 3, 4, 2).numpy()
        rgb = (patches * std + mean) * 255
        scene = make_scene(cfg, seed=9, index=1)
        mask = object_mask(cfg, scene.objects[scene.target])
        expected = token_map(mask)
        color = np.array(COLORS[scene.objects[scene.target].color])
        has = (np.abs(rgb - color) <= 16).all(-1).reshape(len(rgb), -1).any(-1)
        assert np.array_equal(np.nonzero(has & expected)[0], np.array(s.meta["gt_tokens"]))
        assert np.array_equal(np.nonzero(expected)[0], np.array(s.meta["gt_tokens"]))


def test_training_batches_match_the_adapter_prompt(random_vlm):
    """fit.encode_batch (right-padded, with answers) gives the adapter's prompt ids and the same
    next-token logits at the answer position as the adapter's prepare() path."""
    from explain_prune.synthetic.fit import encode_batch, forward_logits

    vlm = random_vlm
    samples = generate(SMALL, 3, seed=11) + generate(SyntheticConfig(frames=4, max_objects=3), 1, seed=11)
    batch = encode_batch(vlm, samples)
    with torch.no_grad():
        logits = forward_logits(vlm.model, batch)
        for i, s in enumerate(samples):
            prompt = vlm.prepare(s)
            p = int(batch["answer_pos"][i])
            assert torch.equal(batch["input_ids"][i, : p + 1], prompt.input_ids[0])
            answer = vlm.tokenizer(f"{s.answer}<|im_end|>", add_special_tokens=False)["input_ids"]
            assert batch["labels"][i, p + 1 : p + 3].tolist() == answer
            ref = vlm.model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                            attention_mask=prompt.attention_mask).logits[0, -1]
            torch.testing.assert_close(logits[i, p], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,layers", [("synthetic", 12), ("synthetic_4layer", 4)])
def test_shipped_model_accuracy(name, layers):
    """The committed weights (the 12-layer default and the 4-layer predecessor) load through
    build_vlm(conf/model/<name>.yaml) and answer >= 90 % of 128 held-out samples with 2-6 objects
    (chance 25 %); greedy decoding gives the answer word then stops."""
    from explain_prune.models import build_vlm
    from explain_prune.models.tiny import build_tokenizer
    from explain_prune.synthetic.fit import TEST_SEED, predict

    cfg = synthetic_model_cfg(name=name)
    assert (Path(cfg.pretrained) == MODEL_DIR) == (name == "synthetic")
    vlm = build_vlm(cfg)
    assert vlm.decoder.num_layers == layers
    assert vlm.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert vlm.decoder.num_layers == cfg.llm.num_layers and vlm.decoder.head_dim == cfg.llm.head_dim
    samples = generate(SMALL, 128, seed=TEST_SEED)
    preds = predict(vlm, samples)
    words = vlm.tokenizer.convert_ids_to_tokens(preds)
    assert sum(w == s.answer for w, s in zip(words, samples)) / len(samples) >= 0.9
    for s, word in list(zip(samples, words))[:4]:  # the adapter's prompt + greedy generate agree
        tokens = vlm.generate_reference(vlm.prepare(s), max_new_tokens=3)
        assert vlm.decode(tokens) == word
        assert int(tokens[1]) in vlm.eos_token_ids


def test_shipped_model_depends_on_the_gt_tokens():
    """Removing the ground-truth tokens drops the shipped model to about chance; removing as many
    other tokens does not, and the ground-truth tokens alone suffice."""
    from explain_prune.models import build_vlm
    from explain_prune.synthetic.fit import TEST_SEED
    from explain_prune.synthetic.metrics import token_ablation

    vlm = build_vlm(synthetic_model_cfg())
    result = token_ablation(vlm, generate(SMALL, 48, seed=TEST_SEED + 1))
    assert result["full"] >= 0.85
    assert result["drop_random"] >= result["full"] - 0.1
    assert result["keep_gt_only"] >= result["full"] - 0.1
    assert result["drop_gt"] <= 0.45


# --- the training script -------------------------------------------------------------------------
def test_curriculum_raises_the_bound_on_running_accuracy():
    from explain_prune.synthetic.fit import Curriculum

    cur = Curriculum(start=1, stop=3, threshold=0.9, window=8, min_steps=2)
    cur.update(1, [True] * 8)  # window full but fewer than min_steps steps
    assert cur.current == 1
    cur.update(2, [True] * 7 + [False])  # 15/16 seen, the window holds the last 8: 7/8 < 0.9
    assert cur.current == 1
    cur.update(3, [True] * 8)
    assert cur.current == 2 and cur.history == [{"step": 3, "max_objects": 2}]
    for step in range(4, 10):
        cur.update(step, [True] * 8)
    assert cur.current == 3  # stops at `stop`


def _fit(overrides):
    """Compose conf/synthetic_fit.yaml with `overrides` and fit, restoring torch's thread count (fit sets its own)."""
    from hydra import compose, initialize_config_dir

    from explain_prune.synthetic import fit as fit_module

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="synthetic_fit", overrides=overrides)
    threads = torch.get_num_threads()
    try:
        return cfg, fit_module.fit(cfg, overrides)
    finally:
        torch.set_num_threads(threads)


def test_fit_smoke(tmp_path):
    """Two optimisation steps end to end: the saved directory loads through the adapter."""
    from explain_prune.models import build_vlm

    overrides = [
        "steps=2", "eval_every=1", "training.val_n=2", f"out_dir={tmp_path}", "target_accuracy=0",
        "training.streams.small.batch_size=2", "training.streams.large.batch_size=1", "training.streams.large.from_level=1",
        "heldout.test.n=2", "heldout.test.ablation_n=1", "~heldout.test_1to6", "~heldout.large_448px",
        "heldout.video_8f.n=1", "heldout.video_8f.ablation_n=0",
    ]
    cfg, report = _fit(overrides)
    assert report["steps"] == 2 and len(report["curve"]) == 2
    assert report["batches_per_stream"]["large"] >= 1  # the cycle reached the large stream
    assert set(report["heldout"]) == {"test", "video_8f"} and "token_ablation" in report["heldout"]["test"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "fit_report.json"):
        assert (tmp_path / name).is_file()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    model_cfg["pretrained"] = str(tmp_path)
    vlm = build_vlm(OmegaConf.create(model_cfg))
    assert vlm.prepare(make_sample(SMALL, seed=0, index=0)).num_visual == 64


def test_fit_below_target_never_replaces_out_dir(tmp_path, monkeypatch):
    """A fit whose first held-out set misses target_accuracy publishes to `<out_dir>-below-target` and
    leaves the model already in out_dir byte for byte."""
    from explain_prune.synthetic import fit as fit_module

    shipped = tmp_path / "model"
    shipped.mkdir()
    (shipped / "model.safetensors").write_bytes(b"shipped weights")
    monkeypatch.setattr(fit_module, "evaluate_sets", lambda vlm, sets, seed: {"test": {"accuracy": 0.5}})
    overrides = [
        "steps=1", "eval_every=10", "training.val_n=2", f"out_dir={shipped}", "target_accuracy=0.9",
        "training.streams.small.batch_size=2", "training.streams.large.batch_size=1",
        "heldout.test.n=2", "heldout.test.ablation_n=0", "~heldout.test_1to6", "~heldout.large_448px", "~heldout.video_8f",
    ]
    _, report = _fit(overrides)
    rejected = tmp_path / "model-below-target"
    assert not report["accepted"] and report["out_dir"] == str(rejected)
    assert sorted(p.name for p in shipped.iterdir()) == ["model.safetensors"]
    assert (shipped / "model.safetensors").read_bytes() == b"shipped weights"
    saved = json.loads((rejected / "fit_report.json").read_text())
    assert saved["accepted"] is False and saved["target_accuracy"] == 0.9
    assert (rejected / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-below-target"]  # no staging left


class _SavesFiles:
    """Stands in for a model or tokenizer: save_pretrained writes one named file."""

    def __init__(self, name, fail=False):
        self.name, self.fail = name, fail

    def save_pretrained(self, folder):
        if self.fail:
            raise OSError("disk full")
        (Path(folder) / self.name).write_text("new")


def test_publish_swaps_whole_folder_and_survives_interruptions(tmp_path):
    """_publish replaces out_dir in one rename; a save that fails leaves out_dir as it was; a swap
    interrupted between its two renames is repaired by the next publish."""
    from types import SimpleNamespace

    from explain_prune.synthetic.fit import _publish

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    broken = SimpleNamespace(model=_SavesFiles("model.safetensors", fail=True), tokenizer=_SavesFiles("tokenizer.json"))
    with pytest.raises(OSError, match="disk full"):
        _publish(broken, {"n": 1}, out)
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    good = SimpleNamespace(model=_SavesFiles("model.safetensors"), tokenizer=_SavesFiles("tokenizer.json"))
    _publish(good, {"n": 2}, out)
    assert sorted(p.name for p in out.iterdir()) == ["fit_report.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the failed staging folder is gone too
    os.replace(out, tmp_path / ".model.previous")  # as if killed after moving out_dir aside
    with pytest.raises(OSError):
        _publish(broken, {"n": 3}, out)
    assert json.loads((out / "fit_report.json").read_text()) == {"n": 2}  # the previous model is back


def test_fit_alias_module_checks_config_first():
    """`python -m explain_prune.synthetic.fit` is the stage itself: a bad setting is one line, exit 2,
    before any model is built."""
    proc = subprocess.run([sys.executable, "-m", "explain_prune.synthetic.fit", "steps=0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: steps: must be >= 1, got 0"


def test_fit_is_deterministic(tmp_path):
    """The same seed and overrides twice -> identical weights, on the shipped 12-layer architecture with
    the fit's own thread count (3 steps), and a different seed -> different weights."""
    from safetensors.torch import load_file

    def run(out, seed):
        overrides = [
            f"seed={seed}", "steps=3", "eval_every=10", "training.val_n=2", f"out_dir={out}", "target_accuracy=0",
            "training.streams.small.batch_size=2", "training.streams.large.batch_size=1",
            "heldout.test.n=2", "heldout.test.ablation_n=0", "~heldout.test_1to6", "~heldout.large_448px", "~heldout.video_8f",
        ]
        _fit(overrides)
        return load_file(out / "model.safetensors")

    first, again, other = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert sum(k.endswith("self_attn.q_proj.weight") for k in first) == 12
