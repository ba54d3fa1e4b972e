"""Every benchmark besides MMStar (tests/test_evaluate.py) end to end through the evaluate task,
in-process: a tiny fixture in the released format -> Hydra compose of conf/evaluate.yaml -> the
task function -> results.json, checked against predictions.jsonl (counts, the scorer's output,
the official aggregation's keys, the efficiency record and the kept counts the method must give).

The three tiny model families and three pruning methods are spread over the ten benchmarks; the
judge benchmarks use judge=fake. Also: each adapter reads MVBench-style clip bounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from fixtures import (
    CORRUPT_B64,
    RED,
    b64,
    gray_video,
    mme_rows,
    mmvet_rows,
    pope_rows,
    seedbench_rows,
    write_activitynet,
    write_mmbench_video,
    write_mvbench,
    write_nextqa,
    write_tsv,
    write_videomme,
    write_wordnet,
)
from helpers import TINY_MODELS, model_cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from explain_prune.engine import flops as flops_lib
from explain_prune.benchmarks import Record, build_benchmark, build_judge
from explain_prune.core import Sample
from explain_prune.methods.base import keep_count
from explain_prune.models import build_vlm

ROOT = Path(__file__).resolve().parents[1]
RETENTION = 0.5
EFFICIENCY_FIELDS = {
    "num_visual", "kept_per_layer", "layer_avg_retention", "retention", "flops_T", "vanilla_flops_T",
    "kv_cache_bytes", "prefill_seconds", "decode_seconds",
}
# method -> (overrides, visual tokens kept per layer of a 3-layer model for N visual tokens at r = 0.5)
METHODS: dict[str, tuple[list[str], Callable[[int], list[int]]]] = {
    "random": ([], lambda n: [keep_count(RETENTION, n)] * 3),  # input stage: every layer
    "fastv": ([], lambda n: [n, n, keep_count(RETENTION, n)]),  # layer 2 on (conf/method/fastv.yaml)
    # one stage at layer 1 with λ = 0.25: layer-averaged (1 + 2·0.25)/3 = 0.5
    "pdrop": (
        ["method.options.layers=[1]", "method.options.lam=0.25"],
        lambda n: [n, keep_count(0.25, n), keep_count(0.25, n)],
    ),
}


@dataclass
class Case:
    benchmark: str
    model: str
    method: str
    samples: int
    errors: set[str]  # ids of the rows that must be counted as errors
    keys: dict[str, set[str]]  # score[<key>] must have exactly these keys (the official aggregation)
    overrides: list[str] = field(default_factory=list)
    accuracy: bool = False  # score.overall is % of rows whose extracted letter is the answer
    reasons: dict[str, str] = field(default_factory=dict)  # id -> the start of its error in predictions.jsonl

    def __str__(self) -> str:
        return self.benchmark


VIDEO = ["modality=video", "modality.num_frames=4"]
CASES = [
    Case("mme", "tiny_qwen2vl", "fastv", 4, {"5", "6", "7", "8", "9"},
         {"categories": {"existence", "code_reasoning"}}),
    Case("pope", "tiny_llava_ov", "random", 2, {"2"}, {"splits": {"adversarial", "popular", "random"}}),
    Case("seedbench", "tiny_vila", "pdrop", 2, {"12", "13", "14"},
         {"categories": {"Scene Understanding", "Instance Identity"}}, accuracy=True,
         reasons={"13": "empty question", "14": "invalid UTF-8 in column 'question'"}),
    Case("mmvet", "tiny_qwen2vl", "random", 1, {"v1"}, {"capabilities": {"ocr", "math"}, "combinations": {"ocr_math"}},
         ["judge=fake"]),
    Case("videomme", "tiny_llava_ov", "fastv", 2, {"003-1"},
         {"durations": {"short", "medium"}, "domains": {"Knowledge", "Film & Television"},
          "task_types": {"Counting Problem", "OCR Problems"}}, VIDEO, accuracy=True),
    Case("mvbench", "tiny_vila", "random", 3, {"action_count/0001", "action_count/0002", "action_count/0003"},
         {"tasks": {"action_count", "action_sequence", "episodic_reasoning"}},
         [*VIDEO, "benchmark.tasks=[action_count,action_sequence,episodic_reasoning]"], accuracy=True,
         reasons={"action_count/0003": "empty question"}),
    Case("mmbench_video", "tiny_qwen2vl", "pdrop", 1, {"12", "13"},
         {"fine_all": {"Event Recognition", "Causal Reasoning"},
          "coarse_all": {"FP-S", "TR", "Perception", "Reasoning", "Overall"}}, [*VIDEO, "judge=fake"]),
    Case("nextqa_mc", "tiny_llava_ov", "pdrop", 1, {"555_1"}, {"types": {"CW"}}, VIDEO, accuracy=True),
    Case("nextqa_oe", "tiny_vila", "fastv", 1, set(), {"wups0": {"TC"}, "wups9": {"TC"}, "wups0_groups": {"T"}},
         [*VIDEO, "benchmark.split=validation", "benchmark.pos_tagger=none"]),
    Case("activitynetqa", "tiny_qwen2vl", "fastv", 2, {"v_ghi_3"},
         {"type_accuracy": {"3", "4"}, "type_score": {"3", "4"}}, [*VIDEO, "judge=fake"]),
]


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    """One root per benchmark, written once with the shared fixture writers."""
    base = tmp_path_factory.mktemp("benchmarks")
    roots = {c.benchmark: base / c.benchmark for c in CASES}
    roots["wordnet"] = write_wordnet(base / "wordnet")
    for name in ("mme", "pope", "seedbench", "mmvet"):
        roots[name].mkdir()
    write_tsv(roots["mme"] / "MME.tsv", mme_rows())
    write_tsv(roots["pope"] / "POPE.tsv", pope_rows())
    corrupt = dict(index=12, image=CORRUPT_B64, question="Broken?", A="x", B="y", C="z", D="w", answer="A",
                   category="Instance Identity")
    blank = dict(corrupt, index=13, image="10", question=" \t ")  # the MCQ template would hide it
    bad_bytes = dict(corrupt, index=14, image="10", question="Which one? <BAD>")
    write_bad_bytes(roots["seedbench"] / "SEEDBench_IMG.tsv", [*seedbench_rows(), corrupt, blank, bad_bytes])
    write_tsv(roots["mmvet"] / "MMVet.tsv", mmvet_rows())
    write_videomme(roots["videomme"])
    write_mvbench(roots["mvbench"])
    counts = roots["mvbench"] / "json" / "action_count.json"  # + a blank question: action_count/0003
    blank_record = {"video": "count1.mp4", "question": "   ", "candidates": ["1", "2"], "answer": "1"}
    counts.write_text(json.dumps([*json.loads(counts.read_text()), blank_record]))
    write_mmbench_video(roots["mmbench_video"])
    write_nextqa(roots["nextqa_mc"])
    write_nextqa(roots["nextqa_oe"])
    write_activitynet(roots["activitynetqa"])
    return roots


def write_bad_bytes(path: Path, rows: list[dict]) -> Path:
    """The TSV as VLMEvalKit writes it, then each "<BAD>" replaced by bytes that are not UTF-8."""
    write_tsv(path, rows)
    path.write_bytes(path.read_bytes().replace(b"<BAD>", b"\xff\xfe"))
    return path


def run_task(overrides: list[str], out_dir: Path):
    """compose conf/evaluate.yaml, then call the task function as Hydra's launcher would."""
    from explain_prune.evaluate import main

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.log_dir={out_dir}", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a launched task sees its config without the hydra node
    threads = torch.get_num_threads()
    try:
        main(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg


@pytest.mark.parametrize("case", CASES, ids=str)
def test_benchmark_end_to_end(case: Case, data_roots, tmp_path):
    out = tmp_path / "run"
    method_overrides, expected_kept = METHODS[case.method]
    overrides = [f"model={case.model}", f"benchmark={case.benchmark}", f"benchmark.root={data_roots[case.benchmark]}",
                 f"method={case.method}", f"method.retention={RETENTION}", "benchmark.max_new_tokens=4", *method_overrides,
                 *case.overrides]
    if case.benchmark == "nextqa_oe":
        overrides.append(f"benchmark.wordnet_path={data_roots['wordnet']}")
    cfg = run_task(overrides, out)

    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "error" not in r]
    assert len(rows) == case.samples + len(case.errors)
    assert {r["id"] for r in rows if "error" in r} == case.errors
    assert results["num_samples"] == len(scored) == case.samples
    assert results["num_errors"] == sum(results["errors"].values()) == len(case.errors)
    logged = {r["id"]: r["error"] for r in rows if "error" in r}
    for sample_id, reason in case.reasons.items():  # counted under their own reason, never sent to the model
        assert logged[sample_id].startswith(reason), logged[sample_id]
        assert any(key.startswith(reason) for key in results["errors"]), results["errors"]
    assert (results["benchmark"], results["method"], results["model"]) == (case.benchmark, case.method, case.model)
    assert results["judge"] == ("fake-judge" if "judge=fake" in case.overrides else None)

    # the stored score is the benchmark's scorer applied to the stored predictions
    bench = build_benchmark(**OmegaConf.to_container(cfg.benchmark, resolve=True), family=cfg.model.family)
    assert (results["prompt_id"], results["extraction_id"]) == (bench.prompt_id, bench.extraction_id)
    records = [Record(r["id"], r["prediction"], r["answer"], r["extracted"], r["meta"]) for r in scored]
    rescored = json.loads(json.dumps(bench.score(records, judge=build_judge(cfg.judge)), default=str))
    assert results["score"] == rescored
    assert results["score"]["max_new_tokens"] == 4
    for key, expected in case.keys.items():
        assert set(results["score"][key]) == expected, key
    if case.accuracy:
        hits = sum(r["extracted"] == r["answer"] for r in scored)
        assert results["score"]["overall"] == pytest.approx(100 * hits / len(scored))
    if bench.modality == "video":
        assert results["score"]["num_frames"] == 4
        assert all(r["meta"]["frame_sampling"] == bench.frame_sampling for r in scored)

    # efficiency: the method's kept counts per sample, and the record as means over the samples
    for r in scored:
        assert r["kept_per_layer"] == expected_kept(r["num_visual"]), r["id"]
        assert r["flops"] == pytest.approx(flops_lib.llm_flops(cfg.model.llm, r["kept_per_layer"]))
    eff = results["efficiency"]
    assert EFFICIENCY_FIELDS <= set(eff)
    n_visual = np.mean([r["num_visual"] for r in scored])
    kept = np.mean([r["kept_per_layer"] for r in scored], axis=0)
    assert eff["num_visual"] == pytest.approx(n_visual) and eff["kept_per_layer"] == pytest.approx(kept.tolist())
    assert eff["layer_avg_retention"] == pytest.approx(kept.sum() / (3 * n_visual))
    assert eff["retention"] == RETENTION
    assert eff["flops_T"] == pytest.approx(flops_lib.tera(np.mean([r["flops"] for r in scored])))
    assert 0 < eff["flops_T"] < eff["vanilla_flops_T"]
    assert eff["kv_cache_bytes"] == pytest.approx(np.mean([r["kv_cache_bytes"] for r in scored]))
    assert eff["kv_cache_bytes"] > 0
    assert eff["prefill_seconds"] > 0 and eff["decode_seconds"] >= 0


def test_strict_makes_a_bad_row_fatal_naming_it(tmp_path, capsys):
    """strict=true: the invalid-UTF-8 row stops the job (exit 2) with one line naming the row, the
    path of every counted SampleError; it comes first, so no sample is generated before it."""
    root = tmp_path / "data"
    root.mkdir()
    bad = dict(index=20, image=b64(RED), question="Which one? <BAD>", A="x", B="y", answer="A", category="c")
    write_bad_bytes(root / "SEEDBench_IMG.tsv", [bad, *seedbench_rows()])
    overrides = ["model=tiny_vila", "benchmark=seedbench", f"benchmark.root={root}", "method=random",
                 f"method.retention={RETENTION}", "benchmark.max_new_tokens=4", "strict=true"]
    with pytest.raises(SystemExit) as exit_:
        run_task(overrides, tmp_path / "run")
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: sample '20': invalid UTF-8 in column 'question'"), lines
    assert lines[-1].endswith("(strict=true)") and "Traceback" not in "".join(lines)


def decoded(path: Path, indices: list[int]) -> list[Image.Image]:
    import decord

    return [Image.fromarray(f) for f in decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()]


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_adapters_read_frames_inside_clip_bounds(model_name, tmp_path):
    """A sample with MVBench clip bounds gives the same visual input as the frames chosen by hand."""
    video = gray_video(tmp_path / "v.mp4", num_frames=20, fps=4)  # frame i has gray level 10 + 8i
    vlm = build_vlm(model_cfg(model_name), modality={"num_frames": 4})

    def embeds(video_input, meta=None):
        return vlm.prepare(Sample(id="s", question="What happens?", video=video_input, meta=meta or {})).inputs_embeds

    # [2 s, 4 s] at 4 fps = frames 8..16; centres: seg = 2 -> 9, 11, 13, 15 (tests/test_benchmarks_video.py)
    bounded = embeds(str(video), {"frame_sampling": "centers", "start": 2.0, "end": 4.0})
    assert torch.equal(bounded, embeds(decoded(video, [9, 11, 13, 15])))
    # without bounds the centres of the whole video are 2, 7, 12, 16
    whole = embeds(str(video), {"frame_sampling": "centers"})
    assert torch.equal(whole, embeds(decoded(video, [2, 7, 12, 16])))
    assert not torch.equal(whole, bounded)
