"""`python -m explain_prune.export <run dir> --format vlmevalkit`: the file VLMEvalKit's evaluation reads,
read back and checked column by column against the run's predictions."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from fixtures import write_mvbench, write_tsv
from helpers import ROOT
from test_experiments import mcq_rows

from explain_prune.benchmarks.mvbench import MVBench
from explain_prune.core import InputError, Sample
from explain_prune.export import main as export_main
from explain_prune.report.vlmevalkit import export_run


def run(*args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def read_predictions(run_dir):
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_an_mmstar_run_exports_as_vlmevalkit_reads_it(tmp_path):
    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    rows = mcq_rows()
    rows[2]["hint"] = "Look at the colour."
    write_tsv(lmu / "MMStar.tsv", rows)
    run_dir = tmp_path / "run"
    proc = run("-m", "explain_prune.evaluate", "model=tiny_qwen2vl", "benchmark=mmstar", "method=fastv", "retention=r0.5",
               f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"LMUData": str(lmu)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("-m", "explain_prune.export", str(run_dir), "--format", "vlmevalkit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = run_dir / "vlmevalkit" / "tiny_qwen2vl_fastv_0.5" / "tiny_qwen2vl_fastv_0.5_MMStar.tsv"
    assert proc.stdout.strip() == f"wrote {path}"
    table = pd.read_csv(path, sep="\t")  # as vlmeval.smp.load reads a .tsv
    predictions = {p["id"]: p for p in read_predictions(run_dir)}
    assert len(table) == len(rows) == len(predictions)
    for line in table.to_dict(orient="records"):
        source = rows[int(line["index"])]
        prediction = predictions[str(line["explain_prune_id"])]
        assert line["prediction"] == prediction["prediction"] or (pd.isna(line["prediction"]) and not prediction["prediction"])
        assert line["question"] == source["question"] and line["answer"] == source["answer"]
        assert [line[k] for k in "ABCD"] == [source[k] for k in "ABCD"]
        assert (line["category"], line["l2-category"]) == (source["category"], source["l2-category"])
        assert (line["hint"] == source["hint"]) if "hint" in source else pd.isna(line["hint"])
    assert {"index", "question", "A", "B", "C", "D", "answer", "prediction", "category"} <= set(table.columns)


def test_an_mvbench_run_exports_text_answers_candidates_and_row_labels(tmp_path):
    """VLMEvalKit's MVBench.evaluate compares `answer` (the option text) with `eval(candidates)` and writes
    scores by row label, so index is the row position."""
    write_mvbench(tmp_path)
    samples = [s for s in MVBench(tmp_path, tasks=["action_count", "action_sequence"], num_frames=4).load()
               if isinstance(s, Sample)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"benchmark": "mvbench", "model": "qwen2vl", "method": "vanilla"}))
    lines = [{"id": s.id, "prediction": f"({s.answer}) yes", "answer": s.answer, "meta": s.meta} for s in samples]
    lines.insert(1, {"id": "bad", "error": "video file not found"})  # a counted skip: no prediction to export
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    path = export_main([str(run_dir), "--out", str(tmp_path / "work")])
    assert path == tmp_path / "work" / "qwen2vl" / "qwen2vl_MVBench.tsv"
    table = pd.read_csv(path, sep="\t")
    assert list(table["index"]) == list(range(len(samples)))
    for line, sample in zip(table.to_dict(orient="records"), samples):
        candidates = ast.literal_eval(line["candidates"])
        assert candidates == sample.meta["candidates"] and line["answer"] == sample.meta["answer_text"]
        assert "ABCDE"[candidates.index(line["answer"])] == sample.answer
        assert line["task_type"] == sample.meta["task_name"] and line["explain_prune_id"] == sample.id


def test_export_refuses_what_vlmevalkit_cannot_score(tmp_path):
    with pytest.raises(InputError, match="not an evaluate run dir: results.json is missing"):
        export_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"benchmark": "nextqa_mc"}))
    (tmp_path / "predictions.jsonl").write_text("")
    with pytest.raises(InputError, match="'nextqa_mc' has no VLMEvalKit dataset .*lmms-eval"):
        export_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"benchmark": "pope"}))
    with pytest.raises(InputError, match="holds no predictions"):
        export_run(tmp_path)
    proc = run("-m", "explain_prune.export", str(tmp_path / "missing"), cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
