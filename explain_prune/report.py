"""Render a sweep's evaluate results as the paper's tables: `python -m explain_prune.report <sweep dir>`.

    python -m explain_prune.report outputs/evaluate/sweeps/<stamp> [--out DIR] [--wandb] [--project NAME]

Reads every `results.json` under the directory (recursively), keys each job by (model, input
settings, method or experiment-arm variant, retention) from the config saved in it (a model's image and
video jobs share a row when it has one input per modality: Table 1, Figure 3), and writes
report.md (also printed), report.csv and report.tex plus preservation_vs_flops.png into the
directory (or --out).  The experiment block saved with the jobs (`experiment=<table>`)
gives the title, the column order, the layout (`kind`: scores | flops | efficiency) and the
paper's numbers, which are shown as `paper` rows under the matching `ours` rows.

Definitions (docs/report.md):
  Avg.(%)  mean over the row's benchmarks of score / score of the vanilla row of the same model and
           input × 100 (the paper's "performance preservation"); n/a without a vanilla row (or with
           a zero vanilla score), † when it misses a benchmark that other rows of its model and input have.
  Avg. <group>(%)  the same mean over one group of benchmarks: experiment.groups (Table 1's image and video
           halves, Figure 3's two averages) or, when the columns mix image and video benchmarks, one group
           per modality; the paper rows' `avg_<group>` go under it.
  FLOPs    LLM FLOPs on the visual tokens (App. C, Eq. 4), per sample, mean over the row's
           benchmarks: (T) in trillions, (×) relative to the same samples unpruned.
  *        the measured layer-averaged retention differs (at the shown precision) from the nominal
           one: multi-stage or late pruning (PDrop, FastV, DART) or per-sample rounding.
`--wandb` logs the table and plot as one run (group = experiment, job_type report; offline unless
WANDB_MODE says otherwise) and, online with wandb-workspaces installed, saves a W&B Report.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from explain_prune import tracking
from explain_prune.benchmarks.runner import RESULTS
from explain_prune.cli import task
from explain_prune.core import InputError, write_bytes_atomic

KINDS = ("scores", "flops", "efficiency")
DEFAULT_METHOD_ORDER = ("vanilla", "random", "gae", "fastv", "pdrop", "dart", "visionzip", "ours")
PLOT = "preservation_vs_flops.png"
SCORE_PLACES = {"mmbench_video": 2}  # its judge's 0-3 mean score: the paper prints 2 decimals (0.41 vs 0.38)
MIB = 2**20
# experiment.paper row keys that map onto table columns (besides model, method, retention, scores, input)
PAPER_VALUE_KEYS = (
    "avg", "flops_x", "flops_T", "layer_avg_retention", "prefill_ms", "total_ms", "kv_mib",
    "prefill_speedup", "total_speedup",
)
IDENTITY_COLUMNS = [
    ("source", "Source"), ("model", "Model"), ("input", "Input"), ("method", "Method"),
    ("retention", "Retention"), ("layer_avg_retention", "Layer-avg. retention"),
]
# kind -> (columns before the benchmarks, name of its preservation average or None)
KIND_COLUMNS = {
    "scores": ([("flops_x", "FLOPs(×)")], "Avg."),
    "flops": ([("flops_T", "FLOPs(T)"), ("flops_x", "FLOPs(×)")], "Preservation"),
    "efficiency": (
        [("flops_x", "FLOPs(×)"), ("flops_T", "FLOPs(T)"), ("prefill_ms", "Prefill (ms/sample)"),
         ("total_ms", "Total (ms/sample)"), ("kv_mib", "KV cache (MiB)"), ("prefill_speedup", "Prefill speedup"),
         ("total_speedup", "Total speedup")],
        None,
    ),
}


@dataclass
class Job:
    """One results.json."""

    path: Path
    model: str
    modality: str  # the benchmark's: the experiment's modality_of entry, else the job's modality group
    modality_of: dict[str, str]  # the experiment's benchmark -> modality map (empty outside experiments)
    settings: dict[str, Any]  # the model's input budget for that modality (pixels, frames, ...)
    method: str
    variant: str  # the experiment arm's `variant` (fastv_l1, gae_mean, ...), else the method name
    options: dict[str, Any]
    retention: float
    benchmark: str
    score: float | None
    efficiency: dict[str, Any]
    experiment: dict[str, Any] | None

    @property
    def settings_key(self) -> str:
        return json.dumps(self.settings, sort_keys=True, default=str)


@dataclass
class Row:
    source: str  # "measured" (this sweep) or "paper" (experiment.paper)
    model: str
    input: str
    method: str  # display label: the variant, plus any options that still tell its jobs apart
    method_name: str
    retention: float
    options: dict[str, Any] = field(default_factory=dict)  # method options (a paper row's tell its variants apart)
    scores: dict[str, float | None] = field(default_factory=dict)
    values: dict[str, float | None] = field(default_factory=dict)  # flops_x, avg, avg_<group>, kv_mib, ...
    # per average (avg, avg_<group>): (benchmarks averaged, benchmarks of its span its model and input have)
    avg_over: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Table:
    name: str
    title: str
    kind: str
    columns: list[str]  # benchmarks, each group's together
    groups: dict[str, list[str]]  # group name -> its benchmarks (each has an avg_<group> column)
    rows: list[Row]
    warnings: list[str]
    sweep_dir: Path
    num_jobs: int


# --- collecting --------------------------------------------------------------------------------


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:  # an interpolation that only resolves inside the job (${hydra:...})
            return OmegaConf.to_container(value, resolve=False)
    return value


def input_settings(cfg: DictConfig, modality: str) -> dict[str, Any]:
    """The scalar settings of the model's `<modality>:` block (pixel budget, frames, sampling, ...),
    with the modality group's own values winning when the group is that modality, as the model adapters
    apply them (a sweep's video group and its frame count leave its image benchmarks' input alone)."""
    block = _select(cfg, f"model.{modality}") or {}
    group = _select(cfg, "modality") or {}
    settings = {k: v for k, v in block.items() if not isinstance(v, (dict, list))}
    if group.get("name", modality) == modality:
        settings.update({k: v for k, v in group.items() if k != "name" and v is not None and not isinstance(v, (dict, list))})
    return settings


def _read_job(path: Path) -> Job:
    data = json.loads(path.read_text())
    missing = [k for k in ("model", "method", "benchmark", "retention", "score", "efficiency") if k not in data]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    config = data.get("config") or {}
    cfg = OmegaConf.create(config)
    # an experiment sweeps image and video benchmarks under one modality group (Table 1: video, whose
    # frame count image benchmarks ignore); its modality_of map says which each benchmark is
    modality_of = {str(b): str(m) for b, m in (_select(cfg, "modality_of") or {}).items()}
    group = _select(cfg, "modality.name") or (data.get("choices") or {}).get("modality") or "image"
    modality = modality_of.get(str(data["benchmark"]), str(group))
    experiment = config.get("experiment")
    return Job(
        path=path,
        model=str(data["model"]),
        modality=modality,
        modality_of=modality_of,
        settings=input_settings(cfg, modality),
        method=str(data["method"]),
        variant=str(_select(cfg, "variant") or data["method"]),
        options=dict(_select(cfg, "method.options") or {}),
        retention=float(data["retention"]),
        benchmark=str(data["benchmark"]),
        score=(data["score"] or {}).get("overall"),
        efficiency=dict(data["efficiency"]),
        experiment=dict(experiment) if isinstance(experiment, Mapping) else None,
    )


def collect(sweep_dir: str | Path, warnings: list[str]) -> list[Job]:
    """Every readable results.json under sweep_dir; unreadable ones are skipped with a warning."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise InputError(f"report: sweep dir {root} is not a directory")
    paths = sorted(root.rglob(RESULTS))
    if not paths:
        raise InputError(f"report: no {RESULTS} under {root} (pass the sweep dir of an evaluate run)")
    jobs = []
    for path in paths:
        try:
            jobs.append(_read_job(path))
        except (OSError, ValueError, TypeError, AttributeError, OmegaConfBaseException) as err:
            warnings.append(f"skipping {path}: not a readable evaluate {RESULTS} ({err})")
    if not jobs:
        raise InputError(f"report: none of the {len(paths)} {RESULTS} files under {root} is readable")
    return jobs


# --- building the table ------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _experiment(jobs: Sequence[Job]) -> dict[str, Any]:
    blocks = {json.dumps(j.experiment, sort_keys=True): j.experiment for j in jobs if j.experiment}
    names = sorted({str(b.get("name")) for b in blocks.values()})
    if len(names) > 1:
        raise InputError(f"report: the sweep mixes experiments {', '.join(names)}; pass one experiment's sweep dir")
    return next(iter(blocks.values()), None) or {}


def _varying(jobs: Sequence[Job], group_of: Callable[[Job], Any], values_of: Callable[[Job], dict]) -> dict[int, list[str]]:
    """Per job (by id): `k=v` for each key of values_of(job) whose value differs between the jobs of its group."""
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        groups.setdefault(group_of(job), []).append(job)
    out = {}
    for group in groups.values():
        keys = sorted({k for j in group for k in values_of(j)})
        varying = [k for k in keys if len({json.dumps(values_of(j).get(k), sort_keys=True) for j in group}) > 1]
        for job in group:
            out[id(job)] = [f"{k}={values_of(job).get(k)}" for k in varying]
    return out


def _labels(jobs: Sequence[Job]) -> tuple[dict[int, str], dict[int, str]]:
    """Display labels that tell apart what the sweep varies: input = the benchmark's modality (+ frames
    for video) plus the settings that differ between a model's jobs of that modality; when a model has
    one such input per modality (Table 1, Figure 3: image and video benchmarks in one sweep), its image
    and video jobs share rows under both inputs, `image; video, 8 frames`.  method = the variant (the
    method name unless an experiment arm names it, e.g. fastv_l1) plus the options that still differ
    between its jobs of one model and input (e.g. FastV at layer 2 and 4 in a plain sweep; not a
    per-model or per-modality checkpoint)."""
    settings = _varying(jobs, lambda j: (j.model, j.modality), lambda j: {k: v for k, v in j.settings.items() if k != "num_frames"})
    options = _varying(jobs, lambda j: (j.model, j.modality, j.settings_key, j.variant), lambda j: j.options)
    own, methods = {}, {}
    per_model: dict[str, dict[str, set[str]]] = {}
    for job in jobs:
        frames = [f"{job.settings['num_frames']} frames"] if job.modality == "video" and job.settings.get("num_frames") else []
        own[id(job)] = ", ".join([job.modality, *frames, *settings[id(job)]])
        per_model.setdefault(job.model, {}).setdefault(job.modality, set()).add(own[id(job)])
        methods[id(job)] = f"{job.variant} ({', '.join(options[id(job)])})" if options[id(job)] else job.variant
    inputs = {}
    for job in jobs:
        by_modality = per_model[job.model]
        shared = len(by_modality) > 1 and all(len(labels) == 1 for labels in by_modality.values())
        inputs[id(job)] = "; ".join(min(by_modality[m]) for m in sorted(by_modality)) if shared else own[id(job)]
    return inputs, methods


def _summarize(source_jobs: Sequence[Job], groups: Mapping[str, Sequence[str]]) -> dict[str, float | None]:
    """The row's efficiency values, plus flops_T_<group>: mean FLOPs(T) over that group's benchmarks (the
    plot's x for the group's average)."""
    eff = [j.efficiency for j in source_jobs]

    def mean(key: str) -> float | None:
        return _mean(e.get(key) for e in eff)

    flops = mean("flops_T")
    prefill = mean("prefill_seconds")
    decode = mean("decode_seconds")
    kv = mean("kv_cache_bytes")
    return {
        "flops_T": flops,
        "flops_x": _ratio(flops, mean("vanilla_flops_T")),
        "layer_avg_retention": mean("layer_avg_retention"),
        "prefill_ms": None if prefill is None else 1000 * prefill,
        "total_ms": None if prefill is None or decode is None else 1000 * (prefill + decode),
        "kv_mib": None if kv is None else kv / MIB,
        **{f"flops_T_{g}": _mean(j.efficiency.get("flops_T") for j in source_jobs if j.benchmark in members)
           for g, members in groups.items()},
    }


def _order(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    first = [n for n in preferred if n in names]
    return first + sorted(n for n in names if n not in first)


def avg_key(group: str | None) -> str:
    """The column of a group's preservation average (None: the row's overall Avg.)."""
    return "avg" if group is None else f"avg_{group}"


def benchmark_groups(experiment: Mapping[str, Any], jobs: Sequence[Job], columns: Sequence[str]) -> dict[str, list[str]]:
    """The table's named benchmark groups, each with its own average: experiment.groups (the image and
    video halves Table 1 prints, the two averages Figure 3 plots) or, when the columns mix image and
    video benchmarks, one group per modality (a column's modality_of entry, else its jobs')."""
    given = experiment.get("groups")
    if given is not None:
        if not isinstance(given, Mapping) or not all(isinstance(m, list) and m for m in given.values()):
            raise InputError(f"report: experiment.groups must map each group name to a list of benchmarks, got {given!r}")
        members = [str(b) for m in given.values() for b in m]
        twice = sorted({b for b in members if members.count(b) > 1})
        if twice:
            raise InputError(f"report: experiment.groups lists {', '.join(twice)} in more than one group")
        return {str(g): [str(b) for b in m] for g, m in given.items()}
    modality = {b: m for job in jobs for b, m in job.modality_of.items()}
    modality.update({job.benchmark: job.modality for job in jobs})
    groups: dict[str, list[str]] = {}
    for benchmark in columns:
        if benchmark in modality:
            groups.setdefault(modality[benchmark], []).append(benchmark)
    return groups if len(groups) > 1 else {}


def _paper_rows(experiment: Mapping[str, Any], columns: Sequence[str], groups: Mapping[str, Sequence[str]],
                warnings: list[str]) -> list[Row]:
    value_keys = (*PAPER_VALUE_KEYS, *(avg_key(g) for g in groups))
    rows = []
    unknown: set[str] = set()
    for entry in experiment.get("paper") or []:
        if not all(k in entry for k in ("model", "method", "retention")):
            warnings.append(f"experiment.paper row without model/method/retention ignored: {entry}")
            continue
        unknown |= set(entry) - {"model", "method", "retention", "scores", "input", "options", *value_keys}
        scores = dict(entry.get("scores") or {})
        unknown |= {f"scores.{b}" for b in scores if b not in columns}
        options = dict(entry.get("options") or {})
        label = str(entry["method"]) + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
        rows.append(Row(
            source="paper", model=str(entry["model"]), input=str(entry.get("input", "")), method=label,
            method_name=str(entry["method"]), retention=float(entry["retention"]), options=options,
            scores={b: scores.get(b) for b in columns}, values={k: entry.get(k) for k in value_keys},
        ))
    if unknown:
        warnings.append(f"experiment.paper keys not shown (no such column): {', '.join(sorted(unknown))}")
    return rows


def build_table(sweep_dir: str | Path) -> Table:
    warnings: list[str] = []
    jobs = collect(sweep_dir, warnings)
    experiment = _experiment(jobs)
    kind = str(experiment.get("kind") or "scores")
    if kind not in KINDS:
        raise InputError(f"report: experiment.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    columns = list(dict.fromkeys([*(experiment.get("columns") or []), *sorted({j.benchmark for j in jobs})]))
    groups = benchmark_groups(experiment, jobs, columns)
    columns = list(dict.fromkeys([*(b for members in groups.values() for b in members), *columns]))
    inputs, methods = _labels(jobs)

    cells: dict[tuple, dict[str, Job]] = {}
    for job in jobs:
        key = (job.model, inputs[id(job)], methods[id(job)], job.retention)
        previous = cells.setdefault(key, {}).get(job.benchmark)
        if previous is not None:
            keep, drop = sorted((previous, job), key=lambda j: j.path.stat().st_mtime, reverse=True)
            warnings.append(f"two results for {key[0]} {key[2]} r={key[3]:g} on {job.benchmark}: using {keep.path}, ignoring {drop.path}")
            job = keep
        cells[key][job.benchmark] = job

    paper = _paper_rows(experiment, columns, groups, warnings)
    method_order = _order([r.method_name for r in paper], DEFAULT_METHOD_ORDER)
    method_rank = {m: i for i, m in enumerate(_order([j.method for j in jobs], method_order))}
    model_order = _order([k[0] for k in cells], [r.model for r in paper])

    method_of = {key: next(iter(by_bench.values())).method for key, by_bench in cells.items()}
    ours: list[Row] = []
    for key in sorted(cells, key=lambda k: (model_order.index(k[0]), k[1], method_of[k] != "vanilla", -k[3],
                                            method_rank[method_of[k]], k[2])):
        by_bench = cells[key]
        ours.append(Row(
            source="measured", model=key[0], input=key[1], method=key[2], method_name=method_of[key], retention=key[3],
            options=next(iter(by_bench.values())).options,
            scores={b: by_bench[b].score if b in by_bench else None for b in columns},
            values=_summarize(list(by_bench.values()), groups),
        ))
    _preservation(ours, columns, groups, warnings)
    return Table(
        name=str(experiment.get("name") or Path(sweep_dir).resolve().name),
        title=str(experiment.get("title") or f"Sweep {sweep_dir}"),
        kind=kind, columns=columns, groups=groups, rows=_interleave(ours, paper), warnings=warnings,
        sweep_dir=Path(sweep_dir), num_jobs=len(jobs),
    )


def _preservation(rows: list[Row], columns: Sequence[str], groups: Mapping[str, Sequence[str]], warnings: list[str]) -> None:
    """Avg.(%), each group's Avg. and the speedups against the vanilla row of the same (model, input).
    A row's benchmarks are those its (model, input) group has any score for, so image rows of a table
    that also has video columns are not counted as partial."""
    spans = {avg_key(None): list(columns), **{avg_key(g): list(members) for g, members in groups.items()}}
    vanilla = {(r.model, r.input): r for r in rows if r.method_name == "vanilla"}
    benchmarks: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        benchmarks.setdefault((row.model, row.input), set()).update(b for b in columns if row.scores.get(b) is not None)
    for group in benchmarks:
        if group not in vanilla:
            count = sum((r.model, r.input) == group for r in rows)
            warnings.append(f"no vanilla row for {group[0]} ({group[1]}): Avg.(%) and speedups are n/a for its {count} rows")
    for row in rows:
        base = vanilla.get((row.model, row.input))
        if base is None:
            row.values.update(dict.fromkeys([*spans, "prefill_speedup", "total_speedup"]))
            continue
        have = benchmarks[(row.model, row.input)]
        used = {b for b in have if row.scores.get(b) is not None and base.scores.get(b)}
        for key, span in spans.items():
            expected = [b for b in span if b in have]
            kept = [b for b in expected if b in used]
            row.values[key] = _mean(100.0 * row.scores[b] / base.scores[b] for b in kept)
            row.avg_over[key] = (len(kept), len(expected))
        row.values["prefill_speedup"] = _ratio(base.values.get("prefill_ms"), row.values.get("prefill_ms"))
        row.values["total_speedup"] = _ratio(base.values.get("total_ms"), row.values.get("total_ms"))
        missing = [b for b in columns if b in have and b not in used]
        if missing:
            warnings.append(
                f"{row.model} ({row.input}) {row.method} r={row.retention:g}: Avg.(%) over {len(used)} of "
                f"{len(have)} benchmarks (no score or no non-zero vanilla score: {', '.join(missing)})"
            )


def _matches(ours: Row, paper: Row) -> bool:
    """Same model, method and retention, and the paper row's options (if any) are those of our row."""
    return (
        (ours.model, ours.method_name) == (paper.model, paper.method_name)
        and abs(ours.retention - paper.retention) < 1e-6
        and all(json.dumps(ours.options.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in paper.options.items())
    )


def _interleave(ours: list[Row], paper: list[Row]) -> list[Row]:
    """Each paper row right after the last of our rows it matches; unmatched ones at the end."""
    after: dict[int, list[Row]] = {}
    unmatched = []
    for row in paper:
        hits = [i for i, r in enumerate(ours) if _matches(r, row)]
        (after.setdefault(hits[-1], []) if hits else unmatched).append(row)
    out = []
    for i, row in enumerate(ours):
        out += [row, *after.get(i, [])]
    return out + unmatched


# --- rendering ---------------------------------------------------------------------------------


def _columns(table: Table) -> list[tuple[str, str, str]]:
    """(key, header, group or "") per column: each group's benchmarks, closed by its average as Table 1
    prints them, then the other benchmarks and the row's overall average."""
    before, avg = KIND_COLUMNS[table.kind]
    group_of = {b: g for g, members in table.groups.items() for b in members}
    out = [(key, header, "") for key, header in [*IDENTITY_COLUMNS, *before]]
    for benchmark in table.columns:
        group = group_of.get(benchmark, "")
        out.append((benchmark, benchmark, group))
        if avg and group and benchmark == table.groups[group][-1]:
            out.append((avg_key(group), f"{avg} {group}(%)", group))
    return out + ([(avg_key(None), f"{avg}(%)", "")] if avg else [])


def table_columns(table: Table) -> list[tuple[str, str]]:
    return [(key, header) for key, header, _ in _columns(table)]


def layer_star(row: Row) -> bool:
    """True when the layer-averaged retention differs from the nominal one at the shown precision."""
    layer = row.values.get("layer_avg_retention")
    return layer is not None and f"{100 * layer:.1f}" != f"{100 * row.retention:.1f}"


def _num(value: float, places: int) -> str:
    if value != 0 and abs(value) < 10**-places:
        return f"{value:.2g}"
    return f"{value:.{places}f}"


def cell(row: Row, key: str) -> str:
    """The displayed text of one cell (Markdown; LaTeX escapes it)."""
    if key in ("source", "model", "input", "method"):
        return str(getattr(row, key))
    if key == "retention":
        return f"{100 * row.retention:.1f}%"
    value = row.scores[key] if key in row.scores else row.values.get(key)
    if value is None:
        return "n/a"
    value = float(value)
    if key == "layer_avg_retention":
        return f"{100 * value:.1f}%" + ("*" if layer_star(row) else "")
    if key in ("flops_x", "prefill_speedup", "total_speedup"):
        return f"{value:.2f}×"
    if key in row.scores:
        return _num(value, SCORE_PLACES.get(key, 1))
    if key in row.avg_over:
        used, expected = row.avg_over[key]
        return _num(value, 1) + ("†" if used < expected else "")
    return _num(value, 2 if key == "kv_mib" else 1)


def notes(table: Table) -> list[str]:
    lines = [
        (f"measured = this sweep ({table.num_jobs} {RESULTS} files under {table.sweep_dir}); "
         "paper = the numbers the paper reports (experiment block), not measured here."),
        ("Avg.(%) / Preservation(%): mean over the row's benchmarks of score / vanilla score of the same model "
         "and input × 100; † = over fewer benchmarks than that model and input have results for; n/a = no "
         "vanilla row (or no non-zero vanilla score)."),
        ("FLOPs: LLM FLOPs on the visual tokens per sample (App. C), mean over the row's benchmarks; "
         "(×) relative to the same samples unpruned."),
        "Layer-avg. retention: kept visual tokens averaged over the LLM layers; * = differs from the nominal retention.",
    ]
    avg = KIND_COLUMNS[table.kind][1]
    if table.groups and avg:
        lines.append(
            ", ".join(f"{avg} {g}(%)" for g in table.groups) + ": the same mean over that group's benchmarks only ("
            + "; ".join(f"{g}: {', '.join(members)}" for g, members in table.groups.items())
            + "), each with its own † and n/a; on paper rows, the paper's " + ", ".join(avg_key(g) for g in table.groups) + "."
        )
    if table.kind == "efficiency":
        lines.append("Times are per sample (prefill, prefill + decode); speedups are the vanilla row's time / this row's.")
    return lines


def render_markdown(table: Table) -> str:
    cols = table_columns(table)
    out = [f"# {table.title}", ""]
    out.append("| " + " | ".join(header for _, header in cols) + " |")
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for row in table.rows:
        out.append("| " + " | ".join(cell(row, key) for key, _ in cols) + " |")
    out.append("")
    out += [f"- {line}" for line in notes(table)]
    if table.warnings:
        out += ["", "Warnings:"] + [f"- {w}" for w in table.warnings]
    return "\n".join(out) + "\n"


def _over_columns(table: Table) -> dict[str, str]:
    """CSV column `<average>_over` -> its average's key, for each average column of the table."""
    averages = {avg_key(None), *(avg_key(g) for g in table.groups)}
    return {f"{key}_over": key for key, _ in table_columns(table) if key in averages}


def csv_header(table: Table) -> list[str]:
    keys = [key for key, _ in table_columns(table)]
    keys.insert(keys.index("layer_avg_retention") + 1, "layer_avg_star")
    return keys + list(_over_columns(table))


def csv_values(table: Table, row: Row) -> list[Any]:
    """Raw numbers (full precision; None for n/a), `*` in layer_avg_star, `k/n` in avg_over (and
    avg_<group>_over)."""
    over = _over_columns(table)
    values = []
    for key in csv_header(table):
        if key in ("source", "model", "input", "method", "retention"):
            values.append(getattr(row, key))
        elif key == "layer_avg_star":
            values.append("*" if layer_star(row) else "")
        elif key in over:
            counts = row.avg_over.get(over[key])
            values.append(f"{counts[0]}/{counts[1]}" if counts else "")
        else:
            values.append(row.scores[key] if key in row.scores else row.values.get(key))
    return values


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(table))
    for row in table.rows:
        writer.writerow(["" if v is None else v for v in csv_values(table, row)])
    return buf.getvalue()


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                 "{": r"\{", "}": r"\}", "×": r"$\times$", "†": r"$^\dagger$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def _latex_band(table: Table) -> list[str]:
    """The header band over each group's columns (Table 1's "Image Benchmark" / "Video Benchmark")."""
    band, rules, start = [], [], 1
    for group, span in itertools.groupby(group for _, _, group in _columns(table)):
        width = len(list(span))
        if group:
            band.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(group)} benchmarks}}")
            rules.append(f"\\cmidrule(lr){{{start}-{start + width - 1}}}")
        else:
            band += [""] * width
        start += width
    return [" & ".join(band) + " \\\\", " ".join(rules)]


def render_latex(table: Table) -> str:
    cols = table_columns(table)
    out = [
        f"% {table.title} -- python -m explain_prune.report {table.sweep_dir} (needs \\usepackage{{booktabs}})",
        "\\begin{tabular}{" + "l" * len(IDENTITY_COLUMNS) + "r" * (len(cols) - len(IDENTITY_COLUMNS)) + "}",
        "\\toprule",
        *(_latex_band(table) if table.groups else []),
        " & ".join(latex_escape(h) for _, h in cols) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(latex_escape(cell(row, key)) for key, _ in cols) + " \\\\" for row in table.rows]
    out += ["\\bottomrule", "\\end{tabular}"]
    out += [f"% {latex_escape(line)}" for line in notes(table)]
    return "\n".join(out) + "\n"


def plot_points(table: Table) -> dict[tuple[str, str, str], dict[str, list[tuple[float, float, float]]]]:
    """(model, input, group) -> method -> [(FLOPs(T), preservation %, retention)] over our rows.  Without
    groups (group ""): the row's Avg. against its mean FLOPs(T).  With groups: per group, the group's
    Avg. against the mean FLOPs(T) of that group's benchmarks only, as an image and a video job of one
    row differ in FLOPs by an order of magnitude and the row's overall mean would place neither.
    Points whose average misses a benchmark (†) are left out, as they are not comparable."""
    series = [(g, f"flops_T_{g}", avg_key(g)) for g in table.groups] or [("", "flops_T", avg_key(None))]
    points: dict[tuple[str, str, str], dict[str, list[tuple[float, float, float]]]] = {}
    for row in table.rows:
        for group, x_key, y_key in series:
            flops, avg, counts = row.values.get(x_key), row.values.get(y_key), row.avg_over.get(y_key)
            if row.source == "measured" and flops is not None and avg is not None and counts and counts[0] == counts[1]:
                points.setdefault((row.model, row.input, group), {}).setdefault(row.method, []).append((flops, avg, row.retention))
    return points


def plot(table: Table, path: Path) -> bool:
    """Figure-3-style preservation vs FLOPs(T) (plot_points): one panel per (model, input) or, with
    groups, per (model, input, group); one line per method over its retentions, vanilla as a star.
    False (no file) when nothing is plottable."""
    points = plot_points(table)
    if not points:
        return False
    from matplotlib import colormaps
    from matplotlib.figure import (
        Figure,  # no pyplot: an Agg canvas, no global backend state
    )

    methods = list(dict.fromkeys(m for series in points.values() for m in series))
    colors = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    fig = Figure(figsize=(5 * len(points), 4))
    axes = fig.subplots(1, len(points), squeeze=False)
    for ax, ((model, inputs, benchmarks), series) in zip(axes[0], points.items()):
        for method, pts in series.items():
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if method == "vanilla":
                ax.scatter(xs, ys, marker="*", s=150, color=colors[method], label=method, zorder=3)
                continue
            ax.plot(xs, ys, marker="o", color=colors[method], label=method)
            for x, y, r in pts:
                ax.annotate(f"{100 * r:.0f}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"{model} ({inputs})" + (f": {benchmarks} benchmarks" if benchmarks else ""), fontsize=9)
        ax.set_xlabel(f"FLOPs (T), mean over the {benchmarks} benchmarks" if benchmarks else "FLOPs (T)")
        ax.set_ylabel(f"Avg. {benchmarks} preservation (%)" if benchmarks else "Avg. preservation (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_bytes_atomic(path, png.getvalue())
    return True


# --- W&B -----------------------------------------------------------------------------------------


def log_to_wandb(table: Table, out_dir: Path, plot_path: Path | None, markdown: str, project: str) -> None:
    """One comparison run (group = experiment, job_type report) with the table and the plot; a W&B
    Report of the group's runs when online and wandb-workspaces is importable."""
    mode = os.environ.get("WANDB_MODE", "offline")
    run = tracking.start_wandb(
        mode=mode, project=project, group=table.name, job_type="report", name=f"report-{table.name}",
        tags=[table.kind], config={"experiment": table.name, "kind": table.kind, "sweep_dir": str(table.sweep_dir),
                                   "num_jobs": table.num_jobs, "benchmarks": table.columns},
        directory=out_dir,
    )
    if run is None:
        print("warning: WANDB_MODE=disabled: nothing logged to W&B", file=sys.stderr)
        return
    import wandb

    payload: dict[str, Any] = {"table": wandb.Table(columns=csv_header(table), data=[csv_values(table, r) for r in table.rows])}
    if plot_path is not None:
        payload["preservation_vs_flops"] = wandb.Image(str(plot_path))
    run.log(payload)
    if mode == "online":
        url = workspace_report(project, table.name, table.title, markdown)
        if url:
            print(f"W&B report: {url}", file=sys.stderr)
    run.finish()


def workspace_report(project: str, group: str, title: str, markdown: str) -> str | None:
    """Save a W&B Report comparing the runs of `group` (needs an account, network and
    wandb-workspaces; not exercised by the tests, which run offline)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        print("warning: wandb-workspaces is not installed: no W&B Report built", file=sys.stderr)
        return None
    report = wr.Report(
        project=project,
        title=title,
        description=f"explain_prune evaluate runs of group {group}",
        blocks=[
            wr.MarkdownBlock(text=markdown),
            wr.PanelGrid(
                runsets=[wr.Runset(project=project, name=group, filters=f"Metric('Group') == {group!r}")],
                panels=[wr.ScatterPlot(x="efficiency/flops_T", y="score/overall"), wr.BarPlot(metrics=["score/overall"])],
            ),
        ],
    )
    report.save()
    return report.url


# --- CLI -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m explain_prune.report",
        description="Render the results.json files of an evaluate sweep as the paper's table (Markdown, CSV, LaTeX) and plot.",
    )
    parser.add_argument("sweep_dir", type=Path, help="directory searched recursively for results.json")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/.csv/.tex and the plot go (default: sweep_dir)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot as a W&B run (offline unless WANDB_MODE)")
    parser.add_argument("--project", default="explain_prune", help="W&B project (default: explain_prune)")
    return parser.parse_args(argv)


@task
def main(argv: Sequence[str] | None = None) -> Table:
    args = parse_args(argv)
    table = build_table(args.sweep_dir)
    out_dir = args.out or args.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path: Path | None = out_dir / PLOT
    if not plot(table, plot_path):
        table.warnings.append("no row has both FLOPs and Avg.(%): no plot written")
        plot_path = None
    markdown = render_markdown(table)
    for name, text in (("report.md", markdown), ("report.csv", render_csv(table)), ("report.tex", render_latex(table))):
        write_bytes_atomic(out_dir / name, text.encode())
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(markdown)
    if args.wandb:
        log_to_wandb(table, out_dir, plot_path, markdown, args.project)
    print(f"report: {out_dir}/report.md, report.csv, report.tex" + (f", {PLOT}" if plot_path else ""), file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
