"""The paper experiments (conf/experiment/<table>.yaml): each composes, sweeps existing configs only,
gives every job its own run dir (vanilla once per model and benchmark), covers the paper rows it
transcribes, and its transcription is self-consistent (Avg.(%) and speedups recomputed from the printed
numbers within their rounding; FLOPs of the FastV / DART variants recomputed with explain_prune.flops).
Then a real sweep of Table 2 on a tiny model and VLMEvalKit-format fixtures, an interrupted-sweep
resume, and `report` on it with Avg.(%) checked against a hand computation from the results.json files."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_mvbench, write_tsv
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf
from test_evaluate import b64_image

from explain_prune import report
from explain_prune.stages.report import main as report_main
from explain_prune.compress.network import FTheta, FThetaConfig, save_compressor
from explain_prune.engine.flops import method_report
from explain_prune.methods import build_from_config

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEP_KEYS = {"model", "benchmark", "experiment/arm"}
ROW_KEYS = {"model", "method", "retention", "scores", "options", *report.PAPER_VALUE_KEYS}
DECIMALS = {"mme": 1, "mmbench_video": 2}  # printed decimals of the paper's scores (1 for the rest)
# App. C's reference inputs of the paper's FLOPs: visual tokens per (model, modality)
REFERENCE_N = {("qwen2vl", "image"): 1302, ("llava_ov", "image"): 1728, ("qwen2vl", "video"): 5824,
               ("llava_ov", "video"): 6272, ("vila15", "video"): 3136}


def test_every_table_and_figure_has_an_experiment():
    assert EXPERIMENTS == sorted(["figure3", *(f"table{i}" for i in range(1, 12))])


@pytest.fixture(scope="module")
def hydra_conf():
    """One Hydra compose context for the module (composing is the slow part of these tests)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield GlobalHydra.instance().config_loader()


def sweep_of(cfg) -> dict[str, list]:
    """hydra.sweeper.params parsed as Hydra parses them: key -> the values it sweeps."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in parsed}


def arm_name(arm: list[str]) -> str:
    return "[" + ",".join(arm) + "]"


@pytest.fixture(scope="module")
def experiments(hydra_conf):
    """name -> (composed experiment, its sweep, {arm: composed first job of that arm})."""
    out = {}
    for name in EXPERIMENTS:
        cfg = compose("evaluate", overrides=[f"experiment={name}"], return_hydra_config=True)
        sweep = sweep_of(cfg)
        first = [f"model={sweep['model'][0]}", f"benchmark={sweep['benchmark'][0]}"]
        arms = {arm_name(a): compose("evaluate", overrides=[f"experiment={name}", f"+experiment/arm={arm_name(a)}", *first])
                for a in sweep["experiment/arm"]}
        out[name] = (cfg, sweep, arms)
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_a_valid_sweep(name, experiments, hydra_conf):
    cfg, sweep, _ = experiments[name]
    assert cfg.hydra.mode == RunMode.MULTIRUN  # experiment=<name> sweeps without -m
    # its own sweep dir per launch: named after it, stamped to the microsecond
    assert re.search(rf"/evaluate/multiruns/{name}/\d{{4}}(-\d\d){{2}}_(\d\d-){{3}}\d{{6}}$", cfg.hydra.sweep.dir)
    assert set(sweep) == SWEEP_KEYS
    for key, group in (("model", "model"), ("benchmark", "benchmark")):
        options = hydra_conf.get_group_options(group)
        assert len(set(sweep[key])) == len(sweep[key]) and set(sweep[key]) <= set(options), (key, sweep[key])
        for option in sweep[key]:  # run dirs are named by `name`: it must be the option's own name
            assert OmegaConf.load(CONF / group / f"{option}.yaml").name == option
    arm_options = set(hydra_conf.get_group_options("experiment/arm"))
    assert all(set(arm) <= arm_options for arm in sweep["experiment/arm"])
    assert len({arm_name(arm) for arm in sweep["experiment/arm"]}) == len(sweep["experiment/arm"])
    exp = cfg.experiment
    assert exp.name == name and exp.title and exp.kind in report.KINDS
    assert list(exp.columns) and sorted(exp.columns) == sorted(sweep["benchmark"])
    groups = exp.get("groups") or {}
    assert not groups or sorted(b for g in groups.values() for b in g) == sorted(exp.columns)
    for row in OmegaConf.to_container(exp.paper):
        extra = {f"avg_{g}" for g in groups}
        assert set(row) <= ROW_KEYS | extra and {"model", "method", "retention"} <= set(row), row
        assert row["model"] in sweep["model"] and set(row.get("scores", {})) <= set(exp.columns), row
        assert extra <= set(row), row


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_arms_are_distinct_cells_covering_the_paper_rows(name, experiments):
    cfg, sweep, arms = experiments[name]
    model, benchmark = sweep["model"][0], sweep["benchmark"][0]
    cells = {}
    for arm, job in arms.items():
        cell = (job.variant, float(job.method.retention))
        assert job.run_id == f"{model}/{benchmark}/{job.variant}/r{job.method.retention}"
        assert cell not in cells, f"{arm} and {cells.get(cell)} share a run dir"
        cells[cell] = arm
        if job.method.name == "vanilla":
            assert job.method.retention == 1.0
        else:
            assert job.method.retention < 1.0, arm
    assert ("vanilla", 1.0) in cells  # vanilla: one job per (model, benchmark), whatever the retentions
    for row in OmegaConf.to_container(cfg.experiment.paper):
        runs = [job for job in arms.values() if job.method.name == row["method"] and job.method.retention == row["retention"]
                and all(job.method.options.get(k) == v for k, v in row.get("options", {}).items())]
        assert len(runs) == 1, row  # exactly one arm reproduces each paper row


@pytest.mark.parametrize(("name", "model", "frames", "image_pixels", "video_pixels"), [
    ("table3", "qwen2vl", 8, 1176000, 254016),     # App. B budget: the model configs
    ("table3", "llava_ov", 8, None, None),
    ("table3", "vila15", 8, None, None),
    ("table8", "qwen2vl", 32, 6422528, 384 * 28 * 28),  # larger inputs: half of 12845056, VIDEO_MAX_PIXELS
    ("table8", "llava_ov", 32, None, None),
    ("table8", "vila15", 16, None, None),
])
def test_input_settings_per_model(name, model, frames, image_pixels, video_pixels, hydra_conf):
    cfg = compose("evaluate", overrides=[f"experiment={name}", f"model={model}"])
    assert cfg.modality.name == "video" and cfg.modality.num_frames == frames
    assert cfg.benchmark.num_frames == frames  # what the video benchmark decodes and records
    assert OmegaConf.select(cfg, "model.image.max_pixels") == image_pixels
    assert OmegaConf.select(cfg, "model.video.max_pixels") == video_pixels


def test_paper_avg_and_speedups_agree_with_the_printed_numbers():
    """The transcription check: each Avg.(%) is the mean of score / vanilla score over the row's columns
    (or group of columns) — recomputed over the whole rounding box of the printed scores, it must meet
    the printed Avg. within its own rounding.  Speedups are vanilla time / row time."""
    checked = 0
    for name in EXPERIMENTS:
        exp = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml").experiment)
        vanilla = {r["model"]: r for r in exp["paper"] if r["method"] == "vanilla"}
        groups = {f"avg_{g}": cols for g, cols in (exp.get("groups") or {}).items()} or {"avg": exp["columns"]}
        for row in exp["paper"]:
            base = vanilla[row["model"]]
            for key, cols in groups.items():
                if key not in row or "scores" not in row:
                    continue
                lows, highs = [], []
                for col in cols:
                    half = 0.5 * 10 ** -DECIMALS.get(col, 1)
                    score, ref = row["scores"][col], base["scores"][col]
                    lows.append((score - half) / (ref + half))
                    highs.append((score + half) / (ref - half))
                low, high = 100 * sum(lows) / len(cols), 100 * sum(highs) / len(cols)
                assert low - 0.05 <= row[key] <= high + 0.05, (name, row["model"], row["method"], row["retention"], key)
                checked += 1
            for speedup, time in (("total_speedup", "total_ms"), ("prefill_speedup", "prefill_ms")):
                if speedup in row:
                    assert row[speedup] == pytest.approx(base[time] / row[time], abs=0.006), (name, row["method"], speedup)
                    checked += 1
    # Avg.: Tables 1 (9 rows x image/video), 2 (18), 3 (27), 5 (9), 6 (15), 7 (10), 8 (15), Figure 3 (10 x 2);
    # speedups: Tables 4 and 11 (5 rows x 2 each)
    assert checked == 18 + 18 + 27 + 9 + 15 + 10 + 15 + 20 + 20


def test_paper_flops_of_fastv_and_dart_rows_match_their_arms(experiments):
    """FLOPs at App. C's reference input tell FastV / DART's pruning layer apart: the arms' layers
    reproduce every such row of the paper (FLOPs x to the printed 2 decimals, FLOPs T to 1)."""
    checked = 0
    for name, (cfg, sweep, arms) in experiments.items():
        modality = cfg.modality_of[sweep["benchmark"][0]]
        for row in OmegaConf.to_container(cfg.experiment.paper):
            if row["method"] not in ("vanilla", "fastv", "dart") or not {"flops_x", "flops_T"} & set(row):
                continue
            (job,) = [j for j in arms.values() if j.method.name == row["method"] and j.method.retention == row["retention"]
                      and all(j.method.options.get(k) == v for k, v in row.get("options", {}).items())]
            dims = OmegaConf.load(CONF / "model" / f"{row['model']}.yaml").llm
            got = method_report(dims, build_from_config(job.method), REFERENCE_N[(row["model"], modality)])
            if "flops_x" in row:
                assert got["flops_ratio"] == pytest.approx(row["flops_x"], abs=0.005), (name, row)
            if "flops_T" in row:
                assert got["flops_T"] == pytest.approx(row["flops_T"], abs=0.05), (name, row)
            checked += 1
    # vanilla / FastV / DART rows with FLOPs: Tables 2 (10), 3 (15), 4 (3), 6 (9), 7 (6), 8 (9), 9 (5), 10 (6), 11 (3)
    assert checked == 10 + 15 + 3 + 9 + 6 + 9 + 5 + 6 + 3


def test_paper_flops_of_pdrop_image_rows_match_their_arms(experiments):
    """PDrop's image rows (Tables 2, 4, 9, 11; 28-layer LLMs at App. C's input) carry the paper's FLOPs
    within 2 % under the arms' schedules: [8, 16, 24] / λ 0.5 for "51 %*" (0.51×), [2, 5, 11] / λ 0.5 for
    "25 %*" (0.25×, 18.1 MB KV on Qwen2-VL, 3.2 T on LLaVA-OV) and the solver at 30 % (3.8 T).  The video
    rows of Tables 3 / 6 follow no single schedule (docs/methods.md §PDrop lists them)."""
    checked = 0
    for name, (cfg, sweep, arms) in experiments.items():
        if cfg.modality_of[sweep["benchmark"][0]] != "image":
            continue
        for row in OmegaConf.to_container(cfg.experiment.paper):
            if row["method"] != "pdrop":
                continue
            (job,) = [j for j in arms.values() if j.method.name == "pdrop" and j.method.retention == row["retention"]]
            dims = OmegaConf.load(CONF / "model" / f"{row['model']}.yaml").llm
            got = method_report(dims, build_from_config(job.method), REFERENCE_N[(row["model"], "image")])
            if "flops_x" in row:
                assert got["flops_ratio"] == pytest.approx(row["flops_x"], rel=0.02), (name, row)
            if "flops_T" in row:
                assert got["flops_T"] == pytest.approx(row["flops_T"], rel=0.02), (name, row)
            if "kv_mib" in row:
                assert got["kv_cache_MiB"] == pytest.approx(row["kv_mib"], rel=0.02), (name, row)
            checked += 1
    assert checked == 4 + 1 + 2 + 1  # Tables 2, 4, 9, 11


def test_paper_flops_of_the_video_baselines_match_their_arms(experiments):
    """Table 10 (LLaVA-OV, 32 x 196 frames = 6272 tokens): FastVID at 25 % keeps T int(196 r) = 1568 tokens,
    11.69 T (paper 11.7).  PruneVid's stage 1 is data-dependent: its arm's analytic schedule (stage 1 to
    40 %, then alpha 0.4 after layer 10) gives 12.0 T (paper 11.9), and 1003 / 6272 = 16 % survive stage 2,
    near the 17 % PruneVid reports; with no static token (the bound, 50 %) it would be 15.2 T."""
    cfg, sweep, arms = experiments["table10"]
    dims = OmegaConf.load(CONF / "model" / "llava_ov.yaml").llm
    got = {}
    for row in OmegaConf.to_container(cfg.experiment.paper):
        if row["method"] in ("fastvid", "prunevid"):
            (job,) = [j for j in arms.values() if j.method.name == row["method"] and j.method.retention == row["retention"]]
            got[row["method"]] = method_report(dims, build_from_config(job.method), 6272)
            assert got[row["method"]]["flops_T"] == pytest.approx(row["flops_T"], rel=0.02), row
    assert got["fastvid"]["visual_tokens_per_layer"] == [1568] * 28
    assert got["prunevid"]["visual_tokens_per_layer"] == [2508] * 11 + [1003] * 17
    assert got["prunevid"]["kv_ratio"] == pytest.approx(1003 / 6272)  # layers 0..10's caches are evicted too
    bound = method_report(dims, build_from_config(OmegaConf.load(CONF / "method" / "prunevid.yaml")), 6272)
    assert bound["visual_tokens_per_layer"][0] == 3136 and bound["flops_T"] == pytest.approx(15.2, abs=0.05)


# --- a real sweep on a tiny model ------------------------------------------------------------------

def mcq_rows(answers: dict[int, str] | None = None, order: list[int] | None = None) -> list[dict]:
    """MMStar / SEED-Bench rows (VLMEvalKit TSV columns) over random images."""
    answers = answers or {}
    return [dict(index=i, image=b64_image(i), question=f"Which option is right {i} ?", A="red", B="green",
                 C="blue", D="cyan", answer=answers.get(i, "A"), category="coarse perception",
                 **{"l2-category": "color"}) for i in (order or range(6))]


def run_evaluate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m explain_prune.evaluate` in cwd, with the VLMEvalKit TSVs under cwd/LMUData."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "LMUData": str(cwd / "LMUData")}
    proc = subprocess.run([sys.executable, "-m", "explain_prune.evaluate", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_table2_sweep_on_a_tiny_model_resume_and_report(tmp_path):
    lmu, benches = tmp_path / "LMUData", ("mmstar", "seedbench")
    lmu.mkdir()
    for bench, tsv in zip(benches, ("MMStar.tsv", "SEEDBench_IMG.tsv")):
        write_tsv(lmu / tsv, mcq_rows())
    # A random-weight model rarely answers a letter. Probe its unpruned answers, then key the benchmarks
    # by them, rows with a letter first, so vanilla scores > 0 and Avg.(%) has a non-zero denominator.
    probe = run_evaluate(tmp_path, "-m", "model=tiny_qwen2vl", "benchmark=mmstar,seedbench", "benchmark.limit=6",
                         f"hydra.sweep.dir={tmp_path / 'probe'}")
    assert "results:" in probe.stdout
    for bench, tsv in zip(benches, ("MMStar.tsv", "SEEDBench_IMG.tsv")):
        lines = (tmp_path / f"probe/tiny_qwen2vl/{bench}/vanilla/r1.0/predictions.jsonl").read_text().splitlines()
        said = {int(r["id"]): r["extracted"] for r in map(json.loads, lines) if r.get("extracted") in tuple("ABCD")}
        assert said, f"the tiny model answered no {bench} probe question with a letter"
        write_tsv(lmu / tsv, mcq_rows(said, sorted(range(6), key=lambda i: i not in said)))
    torch.manual_seed(0)
    save_compressor(tmp_path / "compressors/tiny_qwen2vl/image.safetensors", FTheta(FThetaConfig(channels=[8, 8])))

    arms = "[vanilla],[fastv_l1,r0.5],[dart_l1,r0.5],[ours,r0.5],[ours,r0.25]"
    command = ["experiment=table2", "model=tiny_qwen2vl", "benchmark=mmstar,seedbench", "benchmark.limit=2", "judge=none",
               f"compressor_dir={tmp_path / 'compressors'}", f"+experiment/arm={arms}"]
    run_evaluate(tmp_path, *command)  # no -m: the experiment is a multirun; run from outside the repo
    (sweep_dir,) = (tmp_path / "outputs/evaluate/multiruns/table2").iterdir()
    found = sorted(p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.rglob("results.json"))
    cells = ["dart_l1/r0.5", "fastv_l1/r0.5", "ours/r0.25", "ours/r0.5", "vanilla/r1.0"]
    assert found == [f"tiny_qwen2vl/{b}/{c}" for b in benches for c in cells]
    results = {p: json.loads((sweep_dir / p / "results.json").read_text()) for p in found}

    # an interrupted sweep: one job lost its results; the rerun in the same sweep dir redoes only that one
    lost = sweep_dir / "tiny_qwen2vl/seedbench/ours/r0.25/results.json"
    lost.unlink()
    rerun = run_evaluate(tmp_path, *command, f"hydra.sweep.dir={sweep_dir}")
    assert rerun.stdout.count("skip: ") == 9 and lost.is_file()
    assert json.loads(lost.read_text())["score"] == results["tiny_qwen2vl/seedbench/ours/r0.25"]["score"]

    report_main([str(sweep_dir)])
    with open(sweep_dir / "report.csv") as fh:
        rows = {(r["method"], float(r["retention"])): r for r in csv.DictReader(fh) if r["source"] == "measured"}
    cells_md = [[c.strip() for c in line.strip("|").split("|")] for line in (sweep_dir / "report.md").read_text().splitlines()
                if line.startswith("| measured |")]
    table_md = {(c[3], c[4]): c[-1] for c in cells_md}  # (method, retention) -> Avg.(%), the last column
    vanilla = {b: results[f"tiny_qwen2vl/{b}/vanilla/r1.0"]["score"]["overall"] for b in benches}
    assert all(vanilla.values())
    for cell in cells:
        variant, retention = cell.split("/r")
        scores = {b: results[f"tiny_qwen2vl/{b}/{cell}"]["score"]["overall"] for b in benches}
        hand = sum(100 * scores[b] / vanilla[b] for b in benches) / len(benches)  # Avg.(%): mean preservation
        assert float(rows[(variant, float(retention))]["avg"]) == pytest.approx(hand, abs=1e-9), cell
        assert table_md[(variant, f"{100 * float(retention):.1f}%")] == f"{hand:.1f}", cell
    assert len(rows) == len(table_md) == len(cells)


def test_table10_sweep_on_a_tiny_model_runs_the_video_baselines(tmp_path):
    """experiment=table10 runs FastVID and PruneVid next to vanilla (MVBench fixture, tiny Qwen2-VL), and
    the report shows their measured rows (PruneVid at layer 1 of the 3-layer model)."""
    write_mvbench(tmp_path / "mvbench")
    common = ["experiment=table10", "model=tiny_qwen2vl", "benchmark=mvbench", f"benchmark.root={tmp_path / 'mvbench'}",
              "benchmark.tasks=[action_count,action_sequence]", "judge=none"]
    run_evaluate(tmp_path, *common, "+experiment/arm=[vanilla],[fastvid,r0.25]")
    (sweep_dir,) = (tmp_path / "outputs/evaluate/multiruns/table10").iterdir()
    run_evaluate(tmp_path, *common, "+experiment/arm=[prunevid]", "method.options.layer=1", f"hydra.sweep.dir={sweep_dir}")
    results = {p.parent.relative_to(sweep_dir).as_posix(): json.loads(p.read_text()) for p in sweep_dir.rglob("results.json")}
    base = "tiny_qwen2vl/mvbench"
    assert set(results) == {f"{base}/vanilla/r1.0", f"{base}/fastvid/r0.25", f"{base}/prunevid/r0.4"}
    n = results[f"{base}/vanilla/r1.0"]["efficiency"]["num_visual"]
    fastvid = results[f"{base}/fastvid/r0.25"]["efficiency"]["kept_per_layer"]
    assert fastvid == [n / 4] * 3  # one-frame segments keep R = int(P / 4) per frame: S salient + C merged anchors
    prunevid = results[f"{base}/prunevid/r0.4"]["efficiency"]["kept_per_layer"]
    assert prunevid[0] == prunevid[1] < n and prunevid[2] < prunevid[1]  # stage 1 before layer 0, stage 2 after layer 1
    report_main([str(sweep_dir)])
    with open(sweep_dir / "report.csv") as fh:
        measured = {r["method"] for r in csv.DictReader(fh) if r["source"] == "measured"}
    assert {"fastvid", "prunevid", "vanilla"} <= measured
