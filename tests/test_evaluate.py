"""`python -m explain_prune.evaluate` end to end on a tiny model and a VLMEvalKit-format fixture:
results.json contents, counted per-sample errors, kill-and-resume equality, strict mode, batching,
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import CORRUPT_B64, write_tsv
from helpers import random_image

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("prefill_seconds", "decode_seconds")


def b64_image(seed: int) -> str:
    import base64
    import io

    buf = io.BytesIO()
    random_image(seed, 84, 112).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def mmstar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmudata")
    rows = [
        dict(index=i, image=b64_image(i), question=f"Which option is right {i} ?", A="red", B="green", C="blue",
             D="cyan", answer="ABCD"[i % 4], category="coarse perception", **{"l2-category": "color"})
        for i in range(5)
    ]
    rows.append(dict(index=5, image=CORRUPT_B64, question="Broken ?", A="x", B="y", C="z", D="w", answer="A",
                     category="coarse perception", **{"l2-category": "color"}))
    write_tsv(root / "MMStar.tsv", rows)
    return root


def run_evaluate(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "explain_prune.evaluate", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def common(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny_qwen2vl", "benchmark=mmstar", f"benchmark.root={root}", "method=fastv", "retention=r0.5",
            f"hydra.run.dir={run_dir}", *extra]


def without_timing(results: dict) -> dict:
    results = json.loads(json.dumps(results))
    for key in TIMING:
        results["efficiency"].pop(key)
    results.pop("config", None)
    return results


def test_evaluate_end_to_end_and_resume(mmstar_root, tmp_path):
    run = tmp_path / "run"
    proc = run_evaluate(*common(mmstar_root, run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 5 and results["num_errors"] == 1
    assert results["method"] == "fastv" and results["benchmark"] == "mmstar"
    assert results["prompt_id"] and results["extraction_id"]
    eff = results["efficiency"]
    n_visual, kept = eff["num_visual"], eff["kept_per_layer"]
    # FastV at layer 2 of 3: layers 0-1 see every visual token, layer 2 keeps half
    assert kept[0] == kept[1] == n_visual and kept[2] == pytest.approx(n_visual / 2, abs=1)
    assert eff["layer_avg_retention"] == pytest.approx(sum(kept) / (3 * n_visual))
    assert 0 < eff["flops_T"] < eff["vanilla_flops_T"]
    lines = (run / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and sum("error" in json.loads(line) for line in lines) == 1

    # kill mid-run: keep two finished lines and half of the third, then rerun the same command
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    proc = run_evaluate(*common(mmstar_root, resumed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((resumed / "results.json").read_text())
    assert without_timing(again) == without_timing(results)


def test_batched_evaluation_equals_single(mmstar_root, tmp_path):
    single, batched = tmp_path / "single", tmp_path / "batched"
    assert run_evaluate(*common(mmstar_root, single)).returncode == 0
    proc = run_evaluate(*common(mmstar_root, batched, "batch_size=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]

    def predictions(run: Path) -> dict:
        rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        return {r["id"]: (r.get("prediction"), r.get("kept_per_layer")) for r in rows}

    assert predictions(single) == predictions(batched)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["strict=true"], "strict=true"),
        (["method=nonsense"], "nonsense"),
        (["model=nonsense"], "nonsense"),
        (["method.retention=1.5"], "retention"),
    ],
)
def test_bad_input_is_one_line_nonzero_exit(mmstar_root, tmp_path, extra, message):
    proc = run_evaluate(*common(mmstar_root, tmp_path / "run"), *extra)
    assert proc.returncode != 0
    assert message in proc.stderr
    if extra not in (["method=nonsense"], ["model=nonsense"]):  # Hydra reports unknown group options itself
        assert "Traceback" not in proc.stderr


def test_missing_benchmark_file_names_it(tmp_path):
    proc = run_evaluate(*common(tmp_path / "empty", tmp_path / "run"))
    assert proc.returncode != 0
    assert "MMStar" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_bad_job_in_a_multirun_does_not_stop_the_sweep(tmp_path):
    """method.retention=2.0 is rejected with its one-line error, the r0.5 job still runs, exit is non-zero."""
    sweep = tmp_path / "sweep"
    proc = run_evaluate("-m", "model=tiny_qwen2vl", "benchmark=synthetic", "benchmark.limit=1", "method=random",
                        "method.retention=2.0,0.5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0
    assert "error: method.retention: must be in (0, 1], got 2.0" in proc.stderr
    done = sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("results.json"))
    assert done == ["tiny_qwen2vl/synthetic/random/r0.5/results.json"], done


def test_top_level_max_new_tokens_is_what_results_record(tmp_path):
    proc = run_evaluate("model=tiny_qwen2vl", "benchmark=synthetic", "benchmark.limit=1", "max_new_tokens=1",
                        f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["score"]["max_new_tokens"] == 1  # the synthetic benchmark's pinned value is 2


def test_run_dir_of_another_job_is_refused_not_resumed(tmp_path):
    """The run_id does not name method options: resuming a gae(grad) dir as gae(mean) would score the
    grad answers; it fails with one line instead.  A larger limit resumes the same job."""
    base = ["model=synthetic", "benchmark=synthetic", "method=gae", "retention=r0.5", f"hydra.run.dir={tmp_path}"]
    first = run_evaluate(*base, "benchmark.limit=1")
    assert first.returncode == 0, first.stderr[-2000:]
    other = run_evaluate(*base, "benchmark.limit=1", "method.options.head_reduce=mean")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(f"error: run dir {tmp_path} holds predictions of a different job")
    assert "method.options.head_reduce" in other.stderr
    more = run_evaluate(*base, "benchmark.limit=2")
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["num_samples"] == 2
