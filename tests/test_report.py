"""`python -m explain_prune.report`: a hand-written sweep (two models, vanilla + FastV + ours at three
retentions, two benchmarks, one job missing) rendered as Markdown / CSV / LaTeX and checked number by
number against hand computations (in the comments); a mixed image + video sweep (per-modality averages,
inputs and plot panels, checked the same way) and the composed Table 1 / Figure 3 paper rows; missing
vanilla rows, the efficiency and FLOPs layouts, bad directories and groups, `--wandb` offline; and a real
tiny-model multirun followed by the report."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from test_evaluate import mmstar_root  # noqa: F401  (the MMStar fixture writer)

from explain_prune import report
from explain_prune.stages.report import main as report_main

MIB = 2**20
EXPERIMENT = {
    "name": "table_test",
    "title": "Table T: hand-made sweep",
    "kind": "scores",
    "columns": ["mmstar", "pope"],
    "paper": [
        {"model": "qwen2vl", "method": "vanilla", "retention": 1.0, "scores": {"mmstar": 60.4, "pope": 87.5}, "avg": 100.0,
         "flops_x": 1.0},
        {"model": "qwen2vl", "method": "fastv", "retention": 0.25, "scores": {"mmstar": 37.6, "pope": 77.6}, "avg": 67.7,
         "flops_x": 0.27},
    ],
}
# (model, method, retention) -> ({benchmark: score}, (flops_T on mmstar, on pope), layer-averaged retention)
# vanilla FLOPs: qwen2vl 10.0 T, llava_ov 12.9 T on both benchmarks.
SWEEP = {
    ("qwen2vl", "vanilla", 1.0): ({"mmstar": 60.0, "pope": 80.0}, (10.0, 10.0), 1.0),
    ("qwen2vl", "fastv", 0.5): ({"mmstar": 45.0, "pope": 72.0}, (5.0, 6.0), 15 / 28),
    ("qwen2vl", "fastv", 0.25): ({"mmstar": 30.0, "pope": 64.0}, (3.0, 3.0), 8.5 / 28),
    ("qwen2vl", "fastv", 0.1): ({"mmstar": 15.0, "pope": 40.0}, (1.5, 1.5), 4.6 / 28),
    ("qwen2vl", "ours", 0.5): ({"mmstar": 57.0, "pope": 76.0}, (4.8, 4.8), 0.5),
    ("qwen2vl", "ours", 0.25): ({"mmstar": 51.0, "pope": 72.0}, (2.4, 2.4), 0.2504),
    ("qwen2vl", "ours", 0.1): ({"mmstar": 42.0, "pope": 60.0}, (1.0, 1.0), 0.1),
    ("llava_ov", "vanilla", 1.0): ({"mmstar": 50.0, "pope": 90.0}, (12.9, 12.9), 1.0),
    ("llava_ov", "fastv", 0.5): ({"mmstar": 40.0, "pope": 81.0}, (6.6, 6.6), 15 / 28),
    ("llava_ov", "fastv", 0.25): ({"mmstar": 35.0, "pope": 72.0}, (3.6, 3.6), 8.5 / 28),
    ("llava_ov", "fastv", 0.1): ({"mmstar": 25.0, "pope": 45.0}, (2.1, 2.1), 4.6 / 28),
    ("llava_ov", "ours", 0.5): ({"mmstar": 49.0, "pope": 88.2}, (6.2, 6.2), 0.5),
    ("llava_ov", "ours", 0.25): ({"mmstar": 46.0}, (3.1, 3.1), 0.25),  # the pope job is missing
    ("llava_ov", "ours", 0.1): ({"mmstar": 40.0, "pope": 81.0}, (1.3, 1.3), 0.1),
}
VANILLA_FLOPS = {"qwen2vl": 10.0, "llava_ov": 12.9}


def write_job(root: Path, model: str, method: str, retention: float, benchmark: str, score: float, flops: float,
              layer_avg: float, experiment: dict | None = EXPERIMENT, options: dict | None = None,
              vanilla_flops: float | None = None) -> Path:
    """A results.json shaped like evaluate's (run_info + finalize), with hand-picked numbers. Timing and
    KV scale with the FLOPs ratio so the efficiency layout has hand-computable values too."""
    vanilla_flops = VANILLA_FLOPS[model] if vanilla_flops is None else vanilla_flops
    ratio = flops / vanilla_flops
    model_cfg = {"name": model, "family": model, "llm": {"hidden_size": "${..tiny.hidden_size}"}, "tiny": {"hidden_size": 64}}
    if model == "qwen2vl":
        model_cfg["image"] = {"max_pixels": 1176000}
    config = {
        "model": model_cfg,
        "modality": {"name": "image"},
        "benchmark": {"name": benchmark, "limit": None},
        "method": {"name": method, "retention": retention, "options": options or {}},
        "retention": retention,
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},  # only resolvable inside the job
    }
    if experiment is not None:
        config["experiment"] = experiment
    results = {
        "model": model, "retention": retention, "benchmark": benchmark, "method": method,
        "choices": {"model": model, "modality": "image", "benchmark": benchmark, "method": method},
        "config": config, "complete": True, "num_samples": 10, "num_errors": 0,
        "score": {"overall": score, "categories": {"a": score}},
        "efficiency": {
            "num_visual": 100.0, "kept_per_layer": [100.0 * layer_avg] * 2, "layer_avg_retention": layer_avg,
            "retention": retention, "flops_T": flops, "vanilla_flops_T": vanilla_flops,
            "kv_cache_bytes": 2 * MIB * ratio, "prefill_seconds": 0.2 * ratio, "decode_seconds": 0.8,
        },
    }
    tag = "-".join(f"{k}{v}" for k, v in sorted((options or {}).items()))
    path = root / model / benchmark / (method + tag) / f"r{retention}" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def edit_config(path: Path, **config) -> None:
    """Replace top-level keys of the config saved in a results.json."""
    data = json.loads(path.read_text())
    data["config"].update(config)
    path.write_text(json.dumps(data))


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for (model, method, retention), (scores, flops, layer_avg) in SWEEP.items():
        for i, (benchmark, score) in enumerate(scores.items()):
            write_job(root, model, method, retention, benchmark, score, flops[i], layer_avg)
    return root


def md_table(markdown: str) -> list[dict[str, str]]:
    """Markdown table -> one {header: cell} per row."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def md_rows(markdown: str) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """{(source, model, method, retention): {header: cell}} (unique in tables with one input per model)."""
    table = md_table(markdown)
    rows = {(c["Source"], c["Model"], c["Method"], c["Retention"]): c for c in table}
    assert len(rows) == len(table)
    return rows


def run_report(capsys, *argv: str) -> tuple[str, str]:
    report_main(list(argv))
    out = capsys.readouterr()
    return out.out, out.err


# Avg.(%) by hand = mean over benchmarks of 100 * score / vanilla score, e.g. qwen2vl FastV 25 %:
# (30/60 + 64/80) / 2 * 100 = (50 + 80) / 2 = 65.0.  FLOPs(×) = mean FLOPs / vanilla FLOPs.
EXPECTED = {  # (model, method, retention cell): (layer-avg cell, FLOPs(×), mmstar, pope, Avg.)
    ("qwen2vl", "vanilla", "100.0%"): ("100.0%", "1.00×", "60.0", "80.0", "100.0"),
    ("qwen2vl", "fastv", "50.0%"): ("53.6%*", "0.55×", "45.0", "72.0", "82.5"),   # (75 + 90) / 2; (5+6)/2 / 10
    ("qwen2vl", "fastv", "25.0%"): ("30.4%*", "0.30×", "30.0", "64.0", "65.0"),   # (50 + 80) / 2
    ("qwen2vl", "fastv", "10.0%"): ("16.4%*", "0.15×", "15.0", "40.0", "37.5"),   # (25 + 50) / 2
    ("qwen2vl", "ours", "50.0%"): ("50.0%", "0.48×", "57.0", "76.0", "95.0"),     # (95 + 95) / 2
    ("qwen2vl", "ours", "25.0%"): ("25.0%", "0.24×", "51.0", "72.0", "87.5"),     # (85 + 90) / 2; 25.04 % shows 25.0 %: no *
    ("qwen2vl", "ours", "10.0%"): ("10.0%", "0.10×", "42.0", "60.0", "72.5"),     # (70 + 75) / 2
    ("llava_ov", "vanilla", "100.0%"): ("100.0%", "1.00×", "50.0", "90.0", "100.0"),
    ("llava_ov", "fastv", "50.0%"): ("53.6%*", "0.51×", "40.0", "81.0", "85.0"),  # (80 + 90) / 2; 6.6 / 12.9
    ("llava_ov", "fastv", "25.0%"): ("30.4%*", "0.28×", "35.0", "72.0", "75.0"),  # (70 + 80) / 2; 3.6 / 12.9
    ("llava_ov", "fastv", "10.0%"): ("16.4%*", "0.16×", "25.0", "45.0", "50.0"),  # (50 + 50) / 2; 2.1 / 12.9
    ("llava_ov", "ours", "50.0%"): ("50.0%", "0.48×", "49.0", "88.2", "98.0"),    # (98 + 98) / 2; 6.2 / 12.9
    ("llava_ov", "ours", "25.0%"): ("25.0%", "0.24×", "46.0", "n/a", "92.0†"),    # 46/50 only: pope job missing
    ("llava_ov", "ours", "10.0%"): ("10.0%", "0.10×", "40.0", "81.0", "85.0"),    # (80 + 90) / 2; 1.3 / 12.9
}


def test_scores_table_markdown_csv_latex_and_plot(sweep, capsys):
    stdout, stderr = run_report(capsys, str(sweep))
    markdown = (sweep / "report.md").read_text()
    assert markdown in stdout
    assert markdown.startswith("# Table T: hand-made sweep")
    rows = md_rows(markdown)
    for (model, method, retention), (layer, flops_x, mmstar, pope, avg) in EXPECTED.items():
        cells = rows[("measured", model, method, retention)]
        assert cells["Input"] == "image"  # one input setting per model: nothing to tell apart
        assert (cells["Layer-avg. retention"], cells["FLOPs(×)"], cells["mmstar"], cells["pope"], cells["Avg.(%)"]) == (
            layer, flops_x, mmstar, pope, avg), (model, method, retention)
    assert len([r for r in rows if r[0] == "measured"]) == len(EXPECTED)
    # the paper's rows sit right under ours, marked as such, with the paper's numbers
    keys = list(rows)
    paper = rows[("paper", "qwen2vl", "fastv", "25.0%")]
    assert (paper["mmstar"], paper["pope"], paper["Avg.(%)"], paper["FLOPs(×)"]) == ("37.6", "77.6", "67.7", "0.27×")
    assert keys.index(("paper", "qwen2vl", "fastv", "25.0%")) == keys.index(("measured", "qwen2vl", "fastv", "25.0%")) + 1
    assert keys.index(("paper", "qwen2vl", "vanilla", "100.0%")) == keys.index(("measured", "qwen2vl", "vanilla", "100.0%")) + 1
    # order: models as in the paper block, vanilla first, then retention descending
    assert keys[0] == ("measured", "qwen2vl", "vanilla", "100.0%") and keys[-1] == ("measured", "llava_ov", "ours", "10.0%")
    assert "llava_ov (image) ours r=0.25: Avg.(%) over 1 of 2 benchmarks" in stderr and "pope" in stderr

    # CSV: raw numbers, * and k/n in their own columns
    table = {(r["source"], r["model"], r["method"], r["retention"]): r
             for r in csv.DictReader(io.StringIO((sweep / "report.csv").read_text()))}
    fastv = table[("measured", "qwen2vl", "fastv", "0.25")]
    assert float(fastv["avg"]) == pytest.approx(65.0) and fastv["avg_over"] == "2/2"
    assert float(fastv["flops_x"]) == pytest.approx(0.3) and float(fastv["layer_avg_retention"]) == pytest.approx(8.5 / 28)
    assert fastv["layer_avg_star"] == "*" and float(fastv["mmstar"]) == 30.0
    partial = table[("measured", "llava_ov", "ours", "0.25")]
    assert float(partial["avg"]) == pytest.approx(92.0) and partial["avg_over"] == "1/2" and partial["pope"] == ""
    assert float(partial["flops_x"]) == pytest.approx(3.1 / 12.9) and partial["layer_avg_star"] == ""
    assert float(table[("measured", "llava_ov", "fastv", "0.5")]["avg"]) == pytest.approx(85.0)
    assert table[("paper", "qwen2vl", "fastv", "0.25")]["avg"] == "67.7"

    # LaTeX: same cells, escaped
    latex = (sweep / "report.tex").read_text()
    assert "\\begin{tabular}{llllllrrrr}" in latex
    assert ("measured & qwen2vl & image & fastv & 25.0\\% & 30.4\\%* & 0.30$\\times$ & 30.0 & 64.0 & 65.0 \\\\"
            in latex)
    assert "measured & llava\\_ov & image & ours & 25.0\\% & 25.0\\% & 0.24$\\times$ & 46.0 & n/a & 92.0$^\\dagger$ \\\\" in latex
    assert "paper & qwen2vl &  & fastv & 25.0\\% & n/a & 0.27$\\times$ & 37.6 & 77.6 & 67.7 \\\\" in latex

    png = (sweep / report.PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(sweep / report.PLOT).shape[0] > 100


def test_missing_vanilla_row_is_na_with_a_warning(sweep, capsys, tmp_path):
    for path in (sweep / "llava_ov").glob("*/vanilla/*"):
        shutil.rmtree(path)
    out = tmp_path / "out"
    _, stderr = run_report(capsys, str(sweep), "--out", str(out))
    rows = md_rows((out / "report.md").read_text())
    assert rows[("measured", "llava_ov", "fastv", "25.0%")]["Avg.(%)"] == "n/a"
    assert rows[("measured", "llava_ov", "fastv", "25.0%")]["FLOPs(×)"] == "0.28×"  # FLOPs need no vanilla row
    assert rows[("measured", "qwen2vl", "fastv", "25.0%")]["Avg.(%)"] == "65.0"
    warning = [line for line in stderr.splitlines() if "no vanilla row" in line]
    assert warning == ["warning: no vanilla row for llava_ov (image): Avg.(%) and speedups are n/a for its 6 rows"]
    assert not (sweep / "report.md").exists()  # --out took the files


def test_efficiency_layout(tmp_path, capsys):
    # vanilla: prefill 0.2 s, decode 0.8 s, KV 2 MiB; FastV 25 % at FLOPs 3.0 / 10.0 scales prefill and KV by 0.3
    experiment = {"name": "table4_test", "title": "Efficiency", "kind": "efficiency", "columns": ["mmstar"],
                  "paper": [{"model": "qwen2vl", "method": "fastv", "retention": 0.25, "prefill_ms": 4140.0,
                             "kv_mib": 19.7, "bogus": 1}]}
    write_job(tmp_path, "qwen2vl", "vanilla", 1.0, "mmstar", 60.0, 10.0, 1.0, experiment)
    write_job(tmp_path, "qwen2vl", "fastv", 0.25, "mmstar", 39.0, 3.0, 8.5 / 28, experiment)
    _, stderr = run_report(capsys, str(tmp_path))
    rows = md_rows((tmp_path / "report.md").read_text())
    fastv = rows[("measured", "qwen2vl", "fastv", "25.0%")]
    assert fastv["FLOPs(×)"] == "0.30×" and fastv["FLOPs(T)"] == "3.0"
    assert fastv["Prefill (ms/sample)"] == "60.0"        # 1000 * 0.2 * 0.3
    assert fastv["Total (ms/sample)"] == "860.0"         # 1000 * (0.06 + 0.8)
    assert fastv["KV cache (MiB)"] == "0.60"             # 2 MiB * 0.3
    assert fastv["Prefill speedup"] == "3.33×"           # 200 / 60
    assert fastv["Total speedup"] == "1.16×"             # 1000 / 860
    assert fastv["mmstar"] == "39.0" and "Avg.(%)" not in fastv
    paper = rows[("paper", "qwen2vl", "fastv", "25.0%")]
    assert (paper["Prefill (ms/sample)"], paper["KV cache (MiB)"], paper["FLOPs(T)"]) == ("4140.0", "19.70", "n/a")
    assert "experiment.paper keys not shown (no such column): bogus" in stderr


def test_flops_layout_tells_method_variants_apart(tmp_path, capsys):
    # Table 9: FastV pruning at layer 2 or 4 keeps 25 % either way; the differing option names the row
    experiment = {"name": "table9_test", "title": "FLOPs", "kind": "flops", "columns": ["mmstar"]}
    write_job(tmp_path, "qwen2vl", "vanilla", 1.0, "mmstar", 60.0, 9.6, 1.0, experiment, vanilla_flops=9.6)
    write_job(tmp_path, "qwen2vl", "fastv", 0.25, "mmstar", 54.0, 3.1, 8.5 / 28, experiment, {"layer": 2}, 9.6)
    write_job(tmp_path, "qwen2vl", "fastv", 0.25, "mmstar", 42.0, 3.5, 11.5 / 28, experiment, {"layer": 4}, 9.6)
    run_report(capsys, str(tmp_path))
    rows = md_rows((tmp_path / "report.md").read_text())
    two, four = rows[("measured", "qwen2vl", "fastv (layer=2)", "25.0%")], rows[("measured", "qwen2vl", "fastv (layer=4)", "25.0%")]
    assert (two["FLOPs(T)"], two["Preservation(%)"], two["Layer-avg. retention"]) == ("3.1", "90.0", "30.4%*")  # 54/60
    assert (four["FLOPs(T)"], four["Preservation(%)"], four["Layer-avg. retention"]) == ("3.5", "70.0", "41.1%*")  # 42/60


def test_experiment_arm_variants_name_the_rows(tmp_path, capsys):
    # Table 5 style arms: `variant` names the row; a per-model checkpoint option is not a variant;
    # paper rows told apart by `options` sit under the row with those options
    experiment = {"name": "table5_test", "title": "Ablation", "kind": "scores", "columns": ["mmstar"], "paper": [
        {"model": "qwen2vl", "method": "gae", "options": {"head_reduce": "mean"}, "retention": 0.25, "avg": 96.3},
        {"model": "qwen2vl", "method": "gae", "options": {"head_reduce": "grad"}, "retention": 0.25, "avg": 99.3},
    ]}
    for model in ("qwen2vl", "llava_ov"):
        write_job(tmp_path, model, "vanilla", 1.0, "mmstar", 50.0, 10.0, 1.0, experiment)
        for variant, head_reduce, score in (("gae", "grad", 45.0), ("gae_mean", "mean", 40.0)):
            path = write_job(tmp_path / variant, model, "gae", 0.25, "mmstar", score, 2.5, 0.25, experiment,
                             {"head_reduce": head_reduce, "checkpoint": f"c/{model}/image.safetensors"})
            data = json.loads(path.read_text())
            data["config"]["variant"] = variant
            path.write_text(json.dumps(data))
    run_report(capsys, str(tmp_path))
    rows = md_rows((tmp_path / "report.md").read_text())
    for model in ("qwen2vl", "llava_ov"):
        assert rows[("measured", model, "gae", "25.0%")]["Avg.(%)"] == "90.0"        # 45 / 50
        assert rows[("measured", model, "gae_mean", "25.0%")]["Avg.(%)"] == "80.0"   # 40 / 50
    order = [(source, model, method) for source, model, method, _ in rows]
    assert order[1:5] == [("measured", "qwen2vl", "gae"), ("paper", "qwen2vl", "gae (head_reduce=grad)"),
                          ("measured", "qwen2vl", "gae_mean"), ("paper", "qwen2vl", "gae (head_reduce=mean)")]
    assert rows[("paper", "qwen2vl", "gae (head_reduce=mean)", "25.0%")]["Avg.(%)"] == "96.3"


def test_input_settings_key_the_rows(tmp_path, capsys):
    # Table 7 style: two pixel budgets of one model, each with its own vanilla row; plus a video job
    # whose modality.num_frames=32 overrides the model's 8 frames
    experiment = {"name": "table7_test", "title": "Inputs", "kind": "scores", "columns": ["mmstar"]}
    for pixels, (vanilla, ours) in {1176000: (60.0, 54.0), 4000000: (64.0, 60.8)}.items():
        for method, retention, score in (("vanilla", 1.0, vanilla), ("ours", 0.25, ours)):
            path = write_job(tmp_path / str(pixels), "qwen2vl", method, retention, "mmstar", score, 10 * retention,
                             retention, experiment)
            edit_config(path, model={"name": "qwen2vl", "image": {"min_pixels": 3136, "max_pixels": pixels}})
    path = write_job(tmp_path / "video", "qwen2vl", "vanilla", 1.0, "videomme", 50.0, 40.0, 1.0, experiment,
                     vanilla_flops=40.0)
    edit_config(path, modality={"name": "video", "num_frames": 32, "sampling": None},
         model={"name": "qwen2vl", "video": {"num_frames": 8, "max_pixels": 254016, "sampling": "linspace"}})
    run_report(capsys, str(tmp_path))
    by_input = {(cells["Input"], cells["Method"]): cells for cells in md_table((tmp_path / "report.md").read_text())}
    assert len(by_input) == 5
    assert by_input[("image, max_pixels=1176000", "ours")]["Avg.(%)"] == "90.0"   # 54 / 60
    assert by_input[("image, max_pixels=4000000", "ours")]["Avg.(%)"] == "95.0"   # 60.8 / 64
    video = by_input[("video, 32 frames", "vanilla")]
    # videomme is appended to the experiment's columns; image rows are not partial for lacking it
    assert (video["videomme"], video["mmstar"], video["Avg.(%)"], video["FLOPs(×)"]) == ("50.0", "n/a", "100.0", "1.00×")
    assert by_input[("image, max_pixels=1176000", "vanilla")]["videomme"] == "n/a"


# --- a mixed image + video sweep (Table 1 / Figure 3 shape) ---------------------------------------
# One sweep under the video modality group (32 frames) over two image benchmarks and one video
# benchmark, as experiment=table1 / figure3 run them: the saved modality_of map says which is which.
MIXED_EXPERIMENT = {
    "name": "mixed_test", "title": "Table M: image + video", "kind": "scores", "columns": ["mmstar", "pope", "videomme"],
    "paper": [
        {"model": "qwen2vl", "method": "vanilla", "retention": 1.0, "scores": {"mmstar": 60.4, "pope": 87.5, "videomme": 57.1},
         "avg_image": 100.0, "avg_video": 100.0},
        {"model": "qwen2vl", "method": "fastv", "retention": 0.25, "flops_x": 0.25,
         "scores": {"mmstar": 55.0, "pope": 77.6, "videomme": 53.0}, "avg_image": 89.9, "avg_video": 92.8},
    ],
}
MODALITY_OF = {"mmstar": "image", "pope": "image", "videomme": "video"}
# (method, retention) -> {benchmark: (score, flops_T)}, layer-averaged retention; vanilla FLOPs: 10 T per
# image sample, 40 T per video sample.  The ours job on pope is missing.
MIXED = {
    ("vanilla", 1.0): ({"mmstar": (60.0, 10.0), "pope": (80.0, 10.0), "videomme": (50.0, 40.0)}, 1.0),
    ("fastv", 0.25): ({"mmstar": (30.0, 3.0), "pope": (64.0, 3.0), "videomme": (45.0, 11.0)}, 8.5 / 28),
    ("ours", 0.25): ({"mmstar": (51.0, 2.4), "videomme": (47.5, 9.6)}, 0.25),
}
MIXED_INPUT = "image; video, 32 frames"  # image benchmarks ignore the video group's frame count


@pytest.fixture()
def mixed_sweep(tmp_path) -> Path:
    root = tmp_path / "mixed"
    for (method, retention), (scores, layer_avg) in MIXED.items():
        for benchmark, (score, flops) in scores.items():
            modality = MODALITY_OF[benchmark]
            # ours loads one checkpoint per modality: not a variant, the row stays one row
            options = {"checkpoint": f"{modality}.safetensors"} if method == "ours" else None
            path = write_job(root, "qwen2vl", method, retention, benchmark, score, flops, layer_avg, MIXED_EXPERIMENT,
                             options, vanilla_flops=10.0 if modality == "image" else 40.0)
            edit_config(path, modality={"name": "video", "num_frames": 32, "sampling": None}, modality_of=MODALITY_OF,
                        model={"name": "qwen2vl", "image": {"max_pixels": 6422528},
                               "video": {"num_frames": 8, "max_pixels": 301056, "sampling": "linspace"}})
    return root


def test_mixed_image_video_sweep_averages_each_modality(mixed_sweep, capsys):
    stdout, stderr = run_report(capsys, str(mixed_sweep))
    markdown = (mixed_sweep / "report.md").read_text()
    assert markdown in stdout
    # Preservation by hand (score / vanilla score x 100):
    #   fastv: mmstar 30/60 = 50, pope 64/80 = 80, videomme 45/50 = 90
    #          Avg. image (50 + 80) / 2 = 65.0; Avg. video 90.0; Avg. (50 + 80 + 90) / 3 = 73.33 -> 73.3
    #          FLOPs(x) = mean(3, 3, 11) / mean(10, 10, 40) = 5.667 / 20 = 0.283 -> 0.28x
    #   ours:  mmstar 51/60 = 85, pope missing, videomme 47.5/50 = 95
    #          Avg. image 85.0 over 1 of 2 (dagger); Avg. video 95.0; Avg. (85 + 95) / 2 = 90.0 over 2 of 3 (dagger)
    #          FLOPs(x) = mean(2.4, 9.6) / mean(10, 40) = 6 / 25 = 0.24x
    #   paper rows: their own numbers; no overall avg printed (n/a), avg_image / avg_video under the group columns
    header = ["Source", "Model", "Input", "Method", "Retention", "Layer-avg. retention", "FLOPs(×)",
              "mmstar", "pope", "Avg. image(%)", "videomme", "Avg. video(%)", "Avg.(%)"]
    expected = [
        ["measured", "qwen2vl", MIXED_INPUT, "vanilla", "100.0%", "100.0%", "1.00×", "60.0", "80.0", "100.0", "50.0", "100.0", "100.0"],
        ["paper", "qwen2vl", "", "vanilla", "100.0%", "n/a", "n/a", "60.4", "87.5", "100.0", "57.1", "100.0", "n/a"],
        ["measured", "qwen2vl", MIXED_INPUT, "fastv", "25.0%", "30.4%*", "0.28×", "30.0", "64.0", "65.0", "45.0", "90.0", "73.3"],
        ["paper", "qwen2vl", "", "fastv", "25.0%", "n/a", "0.25×", "55.0", "77.6", "89.9", "53.0", "92.8", "n/a"],
        ["measured", "qwen2vl", MIXED_INPUT, "ours", "25.0%", "25.0%", "0.24×", "51.0", "n/a", "85.0†", "47.5", "95.0", "90.0†"],
    ]
    assert md_table(markdown) == [dict(zip(header, cells)) for cells in expected]
    assert ("- Avg. image(%), Avg. video(%): the same mean over that group's benchmarks only (image: mmstar, pope; "
            "video: videomme), each with its own † and n/a; on paper rows, the paper's avg_image, avg_video.") in markdown
    assert f"warning: qwen2vl ({MIXED_INPUT}) ours r=0.25: Avg.(%) over 2 of 3 benchmarks" in stderr
    assert "not shown" not in stderr  # avg_image / avg_video are columns, not unknown keys

    # CSV: the same numbers at full precision, and used/available benchmarks per average
    rows = list(csv.reader(io.StringIO((mixed_sweep / "report.csv").read_text())))
    assert rows[0] == ["source", "model", "input", "method", "retention", "layer_avg_retention", "layer_avg_star", "flops_x",
                       "mmstar", "pope", "avg_image", "videomme", "avg_video", "avg", "avg_image_over", "avg_video_over",
                       "avg_over"]
    expected_csv = [
        ["measured", "qwen2vl", MIXED_INPUT, "vanilla", 1.0, 1.0, "", 1.0, 60.0, 80.0, 100.0, 50.0, 100.0, 100.0, "2/2", "1/1", "3/3"],
        ["paper", "qwen2vl", "", "vanilla", 1.0, "", "", "", 60.4, 87.5, 100.0, 57.1, 100.0, "", "", "", ""],
        ["measured", "qwen2vl", MIXED_INPUT, "fastv", 0.25, 8.5 / 28, "*", 17 / 60, 30.0, 64.0, 65.0, 45.0, 90.0, 220 / 3,
         "2/2", "1/1", "3/3"],
        ["paper", "qwen2vl", "", "fastv", 0.25, "", "", 0.25, 55.0, 77.6, 89.9, 53.0, 92.8, "", "", "", ""],
        ["measured", "qwen2vl", MIXED_INPUT, "ours", 0.25, 0.25, "", 0.24, 51.0, "", 85.0, 47.5, 95.0, 90.0, "1/2", "1/1", "2/3"],
    ]
    assert len(rows) == 1 + len(expected_csv)
    for got, want in zip(rows[1:], expected_csv):
        assert len(got) == len(want)
        for value, hand in zip(got, want):
            assert value == hand if isinstance(hand, str) else float(value) == pytest.approx(hand), (got, want)

    # LaTeX: a band over each group (7 blank columns before it: identity + FLOPs), then the same cells
    latex = (mixed_sweep / "report.tex").read_text().splitlines()
    start = latex.index("\\toprule")
    assert latex[start - 1] == "\\begin{tabular}{llllllrrrrrrr}"
    assert latex[start + 1:start + 4] == [
        " & " * 7 + "\\multicolumn{3}{c}{image benchmarks} & \\multicolumn{2}{c}{video benchmarks} &  \\\\",
        "\\cmidrule(lr){8-10} \\cmidrule(lr){11-12}",
        ("Source & Model & Input & Method & Retention & Layer-avg. retention & FLOPs($\\times$) & mmstar & pope & "
         "Avg. image(\\%) & videomme & Avg. video(\\%) & Avg.(\\%) \\\\"),
    ]
    body = latex[start + 5:start + 5 + len(expected)]
    assert body == [" & ".join(c.replace("%", "\\%").replace("×", "$\\times$").replace("†", "$^\\dagger$")
                               for c in cells) + " \\\\" for cells in expected]
    assert body[4] == ("measured & qwen2vl & image; video, 32 frames & ours & 25.0\\% & 25.0\\% & 0.24$\\times$ & 51.0 & n/a & "
                       "85.0$^\\dagger$ & 47.5 & 95.0 & 90.0$^\\dagger$ \\\\")

    # the plot: a panel per modality, each average against that modality's own FLOPs (image 10 T vs video
    # 40 T unpruned); ours' image average misses pope, so it is left out of the image panel
    assert report.plot_points(report.build_table(mixed_sweep)) == {
        ("qwen2vl", MIXED_INPUT, "image"): {"vanilla": [(10.0, 100.0, 1.0)], "fastv": [(3.0, 65.0, 0.25)]},
        ("qwen2vl", MIXED_INPUT, "video"): {"vanilla": [(40.0, 100.0, 1.0)], "fastv": [(11.0, 90.0, 0.25)],
                                            "ours": [(9.6, 95.0, 0.25)]},
    }
    assert (mixed_sweep / report.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each job's input is its benchmark's modality block; only a video job takes the video group's 32 frames
    from omegaconf import OmegaConf

    config = OmegaConf.create(json.loads(next(mixed_sweep.rglob("results.json")).read_text())["config"])
    assert report.input_settings(config, "image") == {"max_pixels": 6422528}
    assert report.input_settings(config, "video") == {"num_frames": 32, "max_pixels": 301056, "sampling": "linspace"}


@pytest.mark.parametrize(("name", "frames", "image", "video", "hand"), [
    # Table 1, Qwen2-VL w/ GAE-based compressor at 25 %: Avg. 97.7 (image), 97.5 (video); MMBench-V 1.17
    ("table1", 8, ["mme", "mmstar", "mmvet"], ["videomme", "mvbench", "mmbench_video"],
     ("gae", "25.0%", {"mmvet": "51.7", "Avg. image(%)": "97.7", "mmbench_video": "1.17", "Avg. video(%)": "97.5"})),
    # Figure 3(a) (Tables 7 / 8), Qwen2-VL w/ ours at 25 %: 95.3 (image), 94.1 (video); MMBench-Video 1.30
    ("figure3", 32, ["mme", "mmstar", "mmvet", "seedbench"],
     ["videomme", "mvbench", "mmbench_video", "nextqa_mc", "nextqa_oe", "activitynetqa"],
     ("ours", "25.0%", {"seedbench": "71.0", "Avg. image(%)": "95.3", "mmbench_video": "1.30", "Avg. video(%)": "94.1"})),
])
def test_table1_and_figure3_paper_rows_fill_the_group_averages(name, frames, image, video, hand, tmp_path, capsys):
    """The experiments as evaluate saves them (composed, unresolved): a Qwen2-VL vanilla job on one image
    and one video benchmark, then the report with every paper row of the experiment."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for benchmark, flops in ((image[0], 10.0), (video[0], 40.0)):
            cfg = compose("evaluate", overrides=[f"experiment={name}", "model=qwen2vl", f"benchmark={benchmark}",
                                                 "+experiment/arm=[vanilla]"])
            path = write_job(tmp_path, "qwen2vl", "vanilla", 1.0, benchmark, 50.0, flops, 1.0, vanilla_flops=flops)
            edit_config(path, **OmegaConf.to_container(cfg, resolve=False))
    _, stderr = run_report(capsys, str(tmp_path))
    assert "experiment.paper keys not shown" not in stderr
    markdown = (tmp_path / "report.md").read_text()
    table = md_table(markdown)
    # Table 1's layout: each modality's benchmarks closed by its Avg., then the overall Avg.
    assert list(table[0])[6:] == ["FLOPs(×)", *image, "Avg. image(%)", *video, "Avg. video(%)", "Avg.(%)"]
    ours = [cells for cells in table if cells["Source"] == "measured"]
    assert [(c["Input"], c["Avg. image(%)"], c["Avg. video(%)"], c["Avg.(%)"]) for c in ours] == [
        (f"image; video, {frames} frames", "100.0", "100.0", "100.0")]  # 50 / 50 on each
    rows = md_rows(markdown)
    method, retention, cells = hand
    assert {k: rows[("paper", "qwen2vl", method, retention)][k] for k in cells} == cells
    paper = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").experiment.paper)
    assert len(rows) == 1 + len(paper)
    for entry in paper:
        shown = rows[("paper", entry["model"], entry["method"], f"{100 * entry['retention']:.1f}%")]
        assert (shown["Avg. image(%)"], shown["Avg. video(%)"], shown["Avg.(%)"]) == (
            f"{entry['avg_image']:.1f}", f"{entry['avg_video']:.1f}", "n/a"), entry  # the paper prints no overall Avg.
    band = (tmp_path / "report.tex").read_text().splitlines()[3]
    assert band == (" & " * 7 + f"\\multicolumn{{{len(image) + 1}}}{{c}}{{image benchmarks}} & "
                    f"\\multicolumn{{{len(video) + 1}}}{{c}}{{video benchmarks}} &  \\\\")


@pytest.mark.parametrize(("groups", "message"), [
    ({"image": "mmstar"}, "experiment.groups must map each group name to a list of benchmarks"),
    ({"image": ["mmstar"], "all": ["mmstar", "pope"]}, "experiment.groups lists mmstar in more than one group"),
])
def test_bad_groups_are_one_line_exit_2(tmp_path, capsys, groups, message):
    write_job(tmp_path, "qwen2vl", "vanilla", 1.0, "mmstar", 60.0, 10.0, 1.0, {**MIXED_EXPERIMENT, "groups": groups})
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: report: {message}")

@pytest.mark.parametrize("make", ["missing", "empty", "mixed"])
def test_bad_sweep_dir_is_one_line_exit_2(tmp_path, capsys, make):
    target = tmp_path / "sweep"
    if make != "missing":
        target.mkdir()
    if make == "mixed":
        write_job(target / "a", "qwen2vl", "vanilla", 1.0, "mmstar", 60.0, 10.0, 1.0, {"name": "table2"})
        write_job(target / "b", "qwen2vl", "vanilla", 1.0, "mmstar", 60.0, 10.0, 1.0, {"name": "table4"})
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: report:")
    assert ("table2, table4" if make == "mixed" else str(target)) in err[0]


def test_wandb_offline_writes_a_run(sweep, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    run_report(capsys, str(sweep), "--wandb", "--out", str(out))
    import wandb

    wandb.teardown()  # run.finish() returns before the service has written the run file; this waits for it
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    logged = json.loads(next(runs[0].glob("files/media/table/*.table.json")).read_text())
    csv_rows = list(csv.reader(io.StringIO((out / "report.csv").read_text())))
    assert logged["columns"] == csv_rows[0] and len(logged["data"]) == len(csv_rows) - 1
    row = next(r for r in logged["data"] if r[:4] == ["measured", "qwen2vl", "image", "fastv"] and r[4] == 0.25)
    assert row[csv_rows[0].index("avg")] == pytest.approx(65.0)
    assert list(runs[0].glob("files/media/images/*.png"))
    assert b"table_test" in next(runs[0].glob("run-*.wandb")).read_bytes()  # the group


def test_real_multirun_then_report(mmstar_root, tmp_path, monkeypatch, capsys):  # noqa: F811
    from explain_prune import evaluate

    sweep_dir = tmp_path / "multirun"
    monkeypatch.setattr(sys, "argv", [  # in-process, Hydra needs the config dir as a path, not a module
        "evaluate", "--config-path", str(ROOT / "conf"), "-m", "model=tiny_qwen2vl", "benchmark=mmstar", f"benchmark.root={mmstar_root}", "benchmark.limit=2",
        "method=vanilla,fastv", f"hydra.sweep.dir={sweep_dir}",  # each method at its own default retention
    ])
    evaluate.main()
    files = {p.parent.relative_to(sweep_dir).as_posix(): json.loads(p.read_text()) for p in sweep_dir.rglob("results.json")}
    assert sorted(files) == ["tiny_qwen2vl/mmstar/fastv/r0.25", "tiny_qwen2vl/mmstar/vanilla/r1.0"]
    vanilla, fastv = files["tiny_qwen2vl/mmstar/vanilla/r1.0"], files["tiny_qwen2vl/mmstar/fastv/r0.25"]
    capsys.readouterr()

    run_report(capsys, str(sweep_dir))
    rows = md_rows((sweep_dir / "report.md").read_text())
    assert sorted(rows) == [("measured", "tiny_qwen2vl", "fastv", "25.0%"), ("measured", "tiny_qwen2vl", "vanilla", "100.0%")]
    row = rows[("measured", "tiny_qwen2vl", "fastv", "25.0%")]
    assert row["Input"] == "image"
    assert row["mmstar"] == f"{fastv['score']['overall']:.1f}"
    eff = fastv["efficiency"]
    assert row["FLOPs(×)"] == f"{eff['flops_T'] / eff['vanilla_flops_T']:.2f}×"
    # FastV at layer 2 of 3 keeps every token in layers 0-1: (1 + 1 + 0.25) / 3 = 75 %, marked *
    assert row["Layer-avg. retention"] == f"{100 * eff['layer_avg_retention']:.1f}%*" == "75.0%*"
    base = vanilla["score"]["overall"]
    expected_avg = f"{100 * fastv['score']['overall'] / base:.1f}" if base else "n/a"  # a zero vanilla cannot normalise
    assert row["Avg.(%)"] == expected_avg


def test_matched_flops_view_pairs_each_row_with_the_nearest_flops_of_the_other_methods(sweep, capsys):
    """By hand from SWEEP (FLOPs = mean over the two benchmarks): qwen2vl fastv 5.5 / 3.0 / 1.5 T,
    ours 4.8 / 2.4 / 1.0 T. So ours 25 % (2.4 T) meets fastv 25 % (3.0 T: |0.6| < |0.9| to 1.5 T), and
    fastv 50 % (5.5 T) meets ours 50 % (4.8 T); llava_ov ours 25 % (3.1 T) meets fastv 25 % (3.6 T)."""
    _, stderr = run_report(capsys, str(sweep))
    assert "matched_flops.md" in stderr
    text = (sweep / "matched_flops.md").read_text()
    sections = {block.split("\n", 1)[0]: block for block in text.split("## ")[1:]}
    qwen = {(r["Method"], r["Retention"]): r for r in md_table(sections["qwen2vl (image)"])}
    assert qwen[("ours", "25.0%")]["fastv at the nearest FLOPs"] == "65.0 (25.0%, 3 T)"
    assert qwen[("ours", "25.0%")]["Avg.(%)"] == "87.5" and qwen[("ours", "25.0%")]["FLOPs(T)"] == "2.4"
    assert qwen[("fastv", "50.0%")]["ours at the nearest FLOPs"] == "95.0 (50.0%, 4.8 T)"
    assert qwen[("fastv", "10.0%")]["ours at the nearest FLOPs"] == "72.5 (10.0%, 1 T)"  # 1.0 T (0.5 away) beats 2.4 T
    assert ("vanilla", "100.0%") not in qwen and len(qwen) == 6
    llava = {(r["Method"], r["Retention"]): r for r in md_table(sections["llava_ov (image)"])}
    assert llava[("ours", "25.0%")]["fastv at the nearest FLOPs"] == "75.0 (25.0%, 3.6 T)"
    assert llava[("ours", "25.0%")]["Avg.(%)"] == "92.0†"  # the partial average keeps its mark


def test_matched_flops_view_without_vanilla_compares_the_one_benchmark_and_needs_two_methods(tmp_path, capsys):
    root = tmp_path / "one"
    write_job(root, "qwen2vl", "fastv", 0.25, "mmstar", 30.0, 3.0, 0.3, experiment=None)
    write_job(root, "qwen2vl", "fastv", 0.5, "mmstar", 45.0, 5.0, 0.5, experiment=None)
    run_report(capsys, str(root))
    assert not (root / "matched_flops.md").exists()  # one method: nothing to match
    write_job(root, "qwen2vl", "ours", 0.5, "mmstar", 50.0, 4.8, 0.5, experiment=None)
    run_report(capsys, str(root))
    rows = {(r["Method"], r["Retention"]): r for r in md_table((root / "matched_flops.md").read_text())}
    assert rows[("ours", "50.0%")]["mmstar"] == "50.0" and rows[("ours", "50.0%")]["fastv at the nearest FLOPs"] == "45.0 (50.0%, 5 T)"
    assert rows[("fastv", "25.0%")]["ours at the nearest FLOPs"] == "50.0 (50.0%, 4.8 T)"
