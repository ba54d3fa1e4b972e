"""The `synthetic` benchmark: pointing-game metrics against hand-computed values (ties, zero and
negative scores), the scorer on hand-made records, held-out seed and generator options, the engine /
runner plumbing of ranking scores, and `python -m explain_prune.evaluate` with its defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from explain_prune.benchmarks import build_benchmark
from explain_prune.benchmarks.base import Record
from explain_prune.stages.evaluate import first_stage_scores
from explain_prune.benchmarks.synthetic import (
    BENCHMARK_SEED,
    SyntheticBenchmark,
    aggregate_pointing,
    expected_topk,
    pointing_game,
)
from explain_prune.core import InputError
from explain_prune.engine import Generation
from explain_prune.synthetic.generator import SyntheticConfig, make_sample

ROOT = Path(__file__).resolve().parents[1]


# --- the pointing game --------------------------------------------------------------------------
def test_pointing_game_hand_computed_with_a_tie_at_the_kth_place():
    # N = 6, gt = {2, 3}, k = 2.  Ranked: 0 (.5), then 2 and 5 tied at .4 for the one slot left.
    scores = torch.tensor([0.5, 0.1, 0.4, 0.0, -0.2, 0.4])
    assert expected_topk(scores, 2).tolist() == [1.0, 0.0, 0.5, 0.0, 0.0, 0.5]
    m = pointing_game(scores, [3, 2])
    assert m["argmax_hit"] == 0.0  # token 0 is not in gt
    assert m["topk_precision"] == pytest.approx(0.5 / 2)  # token 2 is in the top 2 with prob. 1/2
    # s⁺ mass of the (expected) top 2: .5 + .5*.4 + .5*.4 = .9, of which gt holds .5*.4 = .2
    assert m["topk_mass_in_gt"] == pytest.approx(0.2 / 0.9)
    assert m["mass_in_gt"] == pytest.approx(0.4 / 1.4)  # the negative score adds no mass
    assert (m["uniform"], m["k"], m["num_visual"]) == (pytest.approx(2 / 6), 2, 6)


def test_pointing_game_ties_at_the_maximum_and_constant_or_zero_scores():
    assert pointing_game(torch.tensor([1.0, 1.0, 0.0, 0.0]), [1])["argmax_hit"] == 0.5
    assert pointing_game(torch.tensor([1.0, 1.0, 1.0, 0.0]), [3])["argmax_hit"] == 0.0
    # constant positive scores carry no information: every metric equals the uniform reference 2/8
    flat = pointing_game(torch.full((8,), 0.3), [0, 5])
    for key in ("argmax_hit", "topk_precision", "topk_mass_in_gt", "mass_in_gt"):
        assert flat[key] == pytest.approx(0.25)
    # all zero: the rank metrics are uniform, the mass shares are undefined (no positive mass)
    zero = pointing_game(torch.zeros(8), [0, 5])
    assert zero["argmax_hit"] == zero["topk_precision"] == pytest.approx(0.25)
    assert zero["topk_mass_in_gt"] is None and zero["mass_in_gt"] is None
    # the top-k rank by the raw score, so a ranking among negative scores still counts
    neg = pointing_game(torch.tensor([-1.0, -3.0, -0.5, -2.0]), [2, 0])
    assert neg["argmax_hit"] == 1.0 and neg["topk_precision"] == 1.0 and neg["topk_mass_in_gt"] is None


def test_pointing_game_rejects_bad_input():
    with pytest.raises(InputError, match="gt_tokens"):
        pointing_game(torch.ones(4), [4])
    with pytest.raises(InputError, match="gt_tokens"):
        pointing_game(torch.ones(4), [])
    with pytest.raises(InputError, match="NaN"):
        pointing_game(torch.tensor([1.0, float("nan")]), [0])


def test_aggregate_pointing_means_over_defined_samples():
    a = {"argmax_hit": 1.0, "topk_precision": 0.5, "topk_mass_in_gt": 0.8, "mass_in_gt": 0.6, "uniform": 0.25}
    b = {"argmax_hit": 0.0, "topk_precision": 0.25, "topk_mass_in_gt": None, "mass_in_gt": None, "uniform": 0.125}
    agg = aggregate_pointing([a, b])
    assert agg["n"] == 2
    assert agg["argmax_hit"] == pytest.approx(50.0) and agg["argmax_hit_uniform"] == pytest.approx(18.75)
    assert agg["topk_precision"] == pytest.approx(37.5) and agg["topk_precision_n"] == 2
    # b has no positive mass: the mass shares and their uniform reference are over a alone
    assert agg["topk_mass_in_gt"] == pytest.approx(80.0) and agg["topk_mass_in_gt_n"] == 1
    assert agg["topk_mass_in_gt_uniform"] == pytest.approx(25.0)
    assert aggregate_pointing([]) is None


# --- the benchmark --------------------------------------------------------------------------------
def record(i: int, prediction: str, answer: str, qtype: str, n_objects: int, metrics=None) -> Record:
    answers = ["circle", "square", "triangle", "cross"] if qtype == "shape" else ["red", "green", "blue", "yellow"]
    meta = {"question_type": qtype, "answers": answers, "chance": 0.25, "objects": [{}] * n_objects}
    return Record(str(i), prediction, answer, None, meta, metrics)


def test_score_on_hand_made_records():
    bench = SyntheticBenchmark(limit=5)
    m1 = {"argmax_hit": 1.0, "topk_precision": 0.75, "topk_mass_in_gt": 0.9, "mass_in_gt": 0.7, "uniform": 0.0625}
    m2 = {"argmax_hit": 0.0, "topk_precision": 0.25, "topk_mass_in_gt": 0.3, "mass_in_gt": 0.1, "uniform": 0.0625}
    records = [
        record(0, "Square.", "square", "shape", 2, m1),  # right, exact after normalisation
        record(1, "square blue", "square", "shape", 10, m2),  # right first word, a run-on: not exact
        record(2, "red", "blue", "color", 3),  # wrong
        record(3, "", "green", "color", 2),  # empty: wrong, out of set
        record(4, "Blue", "blue", "color", 3),
    ]
    score = bench.score(records)
    assert [r.extracted for r in records] == ["square", "square", "red", "", "blue"]
    assert score["overall"] == score["accuracy"] == pytest.approx(60.0)
    assert score["exact_match"] == pytest.approx(40.0)
    assert score["question_types"] == {"color": pytest.approx(100 / 3), "shape": 100.0}
    assert list(score["num_objects"]) == ["2", "3", "10"]  # numeric order
    assert score["num_objects"] == {"2": 50.0, "3": 50.0, "10": 100.0}
    assert score["out_of_set_answers"] == 1 and score["chance"] == 25.0 and score["n"] == 5
    assert score["pointing"]["n"] == 2 and score["pointing"]["argmax_hit"] == pytest.approx(50.0)
    assert score["pointing"]["topk_mass_in_gt"] == pytest.approx(60.0)
    assert score["pointing"]["topk_precision_uniform"] == pytest.approx(6.25)
    assert bench.score(records[2:])["pointing"] is None  # no ranking scores (vanilla, random)


def test_samples_are_the_held_out_generator_stream():
    from explain_prune.synthetic.fit import TEST_SEED, VAL_SEED

    bench = build_benchmark(**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/benchmark/synthetic.yaml")))
    assert bench.seed == BENCHMARK_SEED and bench.limit == 500 and bench.modality == "image"
    # the seed is none of the streams the model (fit.py) or f_θ (conf/data/synthetic.yaml) learned from
    fit = OmegaConf.load(ROOT / "conf/synthetic_fit.yaml")
    fit_streams = {int(fit.seed) + 7919 * k for k in range(len(fit.training.streams))}
    data_seed = int(OmegaConf.load(ROOT / "conf/data/synthetic.yaml").seed)
    assert BENCHMARK_SEED not in fit_streams | {VAL_SEED, TEST_SEED, data_seed}
    samples = list(bench.load(limit=3))
    cfg = SyntheticConfig(grid=4, cell_px=56, min_objects=2, max_objects=6)
    assert [s.id for s in samples] == [make_sample(cfg, BENCHMARK_SEED, i).id for i in range(3)]
    assert samples[2].meta == make_sample(cfg, BENCHMARK_SEED, 2).meta
    assert len(list(SyntheticBenchmark(limit=2).load(limit=10))) == 2

    video = SyntheticBenchmark(limit=1, generator={"frames": 8})
    assert video.modality == "video" and len(next(iter(video.load())).video) == 8
    large = next(iter(SyntheticBenchmark(limit=1, generator={"grid": 8, "max_objects": 10}).load()))
    assert large.meta["visual_grid"] == (1, 16, 16)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"limit": None}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": 3, "root": "/data"}, "root"),
        ({"limit": 3, "generator": {"gird": 8}}, "gird"),
        ({"limit": 3, "generator": {"cell_px": 30}}, "cell_px"),
    ],
)
def test_bad_options_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        build_benchmark("synthetic", **kwargs)


def test_sample_metrics_checks_the_token_grid():
    bench = SyntheticBenchmark(limit=1)
    meta = {"visual_grid": [1, 2, 2], "gt_tokens": [3]}
    assert bench.sample_metrics(meta, torch.tensor([0.1, 0.2, 0.3, 0.9]))["argmax_hit"] == 1.0
    with pytest.raises(InputError, match="resized"):
        bench.sample_metrics(meta, torch.ones(16))


# --- plumbing: engine -> Generation.info -> runner ------------------------------------------------
def generation(num_visual: int, scores: dict) -> Generation:
    return Generation([], "", num_visual, [num_visual], 0.0, 0.0, 0, info={"scores": scores})


def test_first_stage_scores_only_when_the_stage_saw_every_token():
    full, later = torch.arange(8.0), torch.arange(4.0)
    assert first_stage_scores(generation(8, {3: later, 1: full}), 8) is full  # the earliest stage
    assert first_stage_scores(generation(8, {1: later}), 8) is None  # it saw a subset
    assert first_stage_scores(generation(4, {0: later}), 8) is None  # a rewritten (shorter) prompt
    assert first_stage_scores(Generation([], "", 8, [8], 0.0, 0.0, 0), 8) is None  # no scoring stage


@pytest.fixture(scope="module")
def synthetic_vlm():
    from explain_prune.models import build_vlm
    from explain_prune.synthetic import register_resolvers

    register_resolvers()
    return build_vlm(OmegaConf.load(ROOT / "conf/model/synthetic.yaml"))


def test_runner_records_the_pointing_game_of_the_methods_own_scores(synthetic_vlm, tmp_path):
    """In process: each gae record's sample_metrics equal a numpy top-k of R_v recomputed here by
    GAE.scores; FastV (layer 2, all tokens alive) is scored too; random (no scores) is not."""
    from explain_prune.stages.evaluate import EvalSettings, evaluate
    from explain_prune.methods import build_method

    bench = SyntheticBenchmark(limit=3)
    dims = OmegaConf.load(ROOT / "conf/model/synthetic.yaml").llm
    gae = build_method("gae", 0.25)
    results = evaluate(synthetic_vlm, bench, gae, tmp_path / "gae", EvalSettings(), dims)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "gae/predictions.jsonl").read_text().splitlines())}
    for sample in bench.load():
        rv, _ = gae.scores(synthetic_vlm, synthetic_vlm.prepare(sample))
        rv, gt = rv.numpy(), np.array(sample.meta["gt_tokens"])
        top = np.argsort(-rv, kind="stable")[: len(gt)]
        got = rows[sample.id]["sample_metrics"]
        assert got["argmax_hit"] == float(np.argmax(rv) in gt)
        assert got["topk_precision"] == pytest.approx(np.isin(top, gt).mean())
        assert got["topk_mass_in_gt"] == pytest.approx(rv[top[np.isin(top, gt)]].sum() / rv[top].sum())
        assert got["uniform"] == pytest.approx(len(gt) / 64)
    assert results["score"]["pointing"]["n"] == 3

    fastv = evaluate(synthetic_vlm, bench, build_method("fastv", 0.25), tmp_path / "fastv", EvalSettings(), dims)
    assert fastv["score"]["pointing"]["n"] == 3
    rand = evaluate(synthetic_vlm, bench, build_method("random", 0.25), tmp_path / "random", EvalSettings(), dims)
    assert rand["score"]["pointing"] is None


def test_evaluate_cli_defaults_to_the_synthetic_benchmark(tmp_path):
    """`python -m explain_prune.evaluate` with only a method, a limit and a run dir: results.json
    agrees with predictions.jsonl (accuracy by first word, pointing means)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "explain_prune.evaluate", "method=gae", "retention=r0.25", "benchmark.limit=4",
         f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["benchmark"] == "synthetic" and results["model"] == "synthetic" and results["num_samples"] == 4
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    correct = [r["prediction"].split()[0].lower() == r["answer"] if r["prediction"] else False for r in rows]
    assert results["score"]["accuracy"] == pytest.approx(100 * sum(correct) / 4)
    pointing = results["score"]["pointing"]
    for key in ("argmax_hit", "topk_precision", "topk_mass_in_gt"):
        assert pointing[key] == pytest.approx(100 * np.mean([r["sample_metrics"][key] for r in rows]))
    assert pointing["argmax_hit_uniform"] == pytest.approx(100 * np.mean([len(r["meta"]["gt_tokens"]) / 64 for r in rows]))
    assert results["efficiency"]["kept_per_layer"] == [16.0] * 12  # the default synthetic model has 12 layers


def test_run_on_probe_interventions_change_only_what_they_name(synthetic_vlm):
    """scripts/probe_run_on.py: a fixed kept set given to the engine answers as the method that chose
    it did, and renumbering gives the live tokens 0..n-1 on all three M-RoPE axes, nothing else."""
    import importlib.util

    from explain_prune.benchmarks.synthetic import BENCHMARK_SEED
    from explain_prune.methods import build_method
    from explain_prune.synthetic.generator import make_scene, scene_to_sample

    spec = importlib.util.spec_from_file_location("probe_run_on", ROOT / "scripts/probe_run_on.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cfg = SyntheticConfig(grid=4, cell_px=56, min_objects=2, max_objects=6)
    prompt = synthetic_vlm.prepare(scene_to_sample(make_scene(cfg, BENCHMARK_SEED, 0), "probe-0"))
    original = prompt.position_ids.clone()
    words, kept = probe.method_kept(build_method("gae", 0.25, max_new_tokens=2), synthetic_vlm, prompt)
    assert len(kept) == 16 and probe.answer_with(synthetic_vlm, prompt, kept, renumber=False) == words

    compact = probe.renumbered(prompt, kept).position_ids  # [3, 1, L]
    live = torch.ones(prompt.length, dtype=torch.bool)
    live[prompt.visual_index] = False
    live[prompt.visual_index[kept]] = True
    assert compact.shape == original.shape and torch.equal(prompt.position_ids, original)
    for axis in range(3):
        torch.testing.assert_close(compact[axis, 0, live], torch.arange(int(live.sum())))
    first_visual = int(prompt.visual_index[0])
    assert torch.equal(compact[:, 0, :first_visual], original[:, 0, :first_visual])  # the text before is unchanged
    assert not torch.equal(compact[:, 0, live], original[:, 0, live])  # the grid positions are not
