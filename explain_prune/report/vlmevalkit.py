"""An evaluate run's predictions in the file layout VLMEvalKit's evaluation reads, so that any run can be
re-scored with the official toolkit (`python -m explain_prune.export <run dir> --format vlmevalkit`).

VLMEvalKit (e8e78f05) scores `<work dir>/<model>/<model>_<dataset>.<PRED_FORMAT>`: the dataset's rows
with the model's answer in a `prediction` column (`vlmeval/inference.py`, `run.py`; `PRED_FORMAT=tsv`
selects TSV, read by `vlmeval/smp/file.py` `load`).  The columns each dataset's `evaluate` reads:

| benchmark | dataset | columns |
|---|---|---|
| mme | MME | index, question, answer, category, image_path (the pair key of MME_rating) |
| mmstar / seedbench | MMStar / SEEDBench_IMG | index, question, hint, A-E, answer (letter), category, l2-category, split |
| pope | POPE | index, question, answer (Yes / No), category |
| mmvet | MMVet | index, question, answer, category |
| videomme | Video-MME | index, video, question, candidates, answer (letter), duration, domain, sub_category, task_type |
| mvbench | MVBench | index (0..n-1: its evaluate writes scores by row label), task_type, question, candidates, answer (text) |
| mmbench_video | MMBench-Video | index, video, question, answer, dimensions |

Every row also carries `explain_prune_id` (the sample id).  NExT-QA and ActivityNet-QA are lmms-eval
tasks, not VLMEvalKit datasets; the synthetic benchmark is the project's own: they are refused.
Samples the run skipped (counted errors) have no prediction and are left out, as a partial inference.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from explain_prune.core import InputError, write_bytes_atomic

DATASETS = {
    "mme": "MME", "mmstar": "MMStar", "seedbench": "SEEDBench_IMG", "pope": "POPE", "mmvet": "MMVet",
    "videomme": "Video-MME", "mvbench": "MVBench", "mmbench_video": "MMBench-Video",
}
LETTERS = "ABCDEFGHIJ"


def _mme_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**_image_row(row), "image_path": row["meta"].get("image_key")}


def _image_row(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or {}
    out = {"index": meta.get("index", row["id"]), "question": meta.get("question"), "answer": row.get("answer")}
    for key in ("hint", "category", "l2-category", "split"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    for letter, text in (meta.get("options") or {}).items():
        out[letter] = text
    return out


def _videomme_row(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {"index": row["id"], "video": meta.get("videoID"), "question": meta.get("question"),
            "candidates": repr(list(meta.get("options") or [])), "answer": row.get("answer"),
            **{k: meta.get(k) for k in ("duration", "domain", "sub_category", "task_type")}}


def _mvbench_row(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {"task_type": meta.get("task_name", meta.get("task")), "question": meta.get("question"),
            "candidates": repr(list(meta.get("candidates") or [])), "answer": meta.get("answer_text")}


def _mmbench_video_row(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {"index": meta.get("index", row["id"]), "video": meta.get("video"), "question": meta.get("question"),
            "answer": row.get("answer"), "dimensions": repr(list(meta.get("dimensions") or []))}


ROW_BUILDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mme": _mme_row, "mmstar": _image_row, "seedbench": _image_row, "pope": _image_row, "mmvet": _image_row,
    "videomme": _videomme_row, "mvbench": _mvbench_row, "mmbench_video": _mmbench_video_row,
}


def predictions(path: Path) -> Iterator[dict[str, Any]]:
    """The prediction rows of a run's predictions.jsonl (read only: a partial last line of a running job is skipped)."""
    raw = path.read_bytes()
    for lineno, line in enumerate(raw[: raw.rfind(b"\n") + 1].split(b"\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} line {lineno}: not JSON ({err})") from None
        if isinstance(row, dict) and "prediction" in row and "error" not in row:
            yield row


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, model: str | None = None) -> Path:
    """Write `<out>/<model>/<model>_<dataset>.tsv` for one evaluate run dir; returns the file."""
    run_dir = Path(run_dir)
    results_path, predictions_path = run_dir / "results.json", run_dir / "predictions.jsonl"
    for path in (results_path, predictions_path):
        if not path.is_file():
            raise InputError(f"{run_dir} is not an evaluate run dir: {path.name} is missing")
    results = json.loads(results_path.read_text())
    benchmark = results.get("benchmark")
    if benchmark not in DATASETS:
        raise InputError(
            f"{run_dir}: benchmark {benchmark!r} has no VLMEvalKit dataset (exportable: {', '.join(DATASETS)}; "
            "NExT-QA and ActivityNet-QA are lmms-eval tasks)"
        )
    if model is None:
        model, method = str(results.get("model") or "model"), results.get("method")
        if method and method != "vanilla":  # one VLMEvalKit "model" per pruning setting
            model = f"{model}_{method}_{results.get('retention')}"
    build = ROW_BUILDERS[benchmark]
    rows = []
    for position, row in enumerate(predictions(predictions_path)):
        out = build(row)
        if benchmark == "mvbench":
            out = {"index": position, **out}
        rows.append({**out, "prediction": row["prediction"], "explain_prune_id": row["id"]})
    if not rows:
        raise InputError(f"{predictions_path} holds no predictions to export")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    target = Path(out_dir or run_dir / "vlmevalkit") / model / f"{model}_{DATASETS[benchmark]}.tsv"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, buffer.getvalue().encode())
    return target
