"""The sweep's jobs as table rows: labels, averages against vanilla, and the paper's rows beside ours."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from explain_prune.core import InputError
from explain_prune.report.collect import Job, collect_jobs

KINDS = ("scores", "flops", "efficiency")
DEFAULT_METHOD_ORDER = ("vanilla", "random", "gae", "fastv", "pdrop", "dart", "visionzip", "ours")
MIB = 2**20
# experiment.paper row keys that map onto table columns (besides model, method, retention, scores, input)
PAPER_VALUE_KEYS = (
    "avg", "flops_x", "flops_T", "layer_avg_retention", "prefill_ms", "total_ms", "kv_mib",
    "prefill_speedup", "total_speedup",
)


@dataclass
class Row:
    """One line of the table: this sweep's jobs of one (model, input, method label, retention), or a paper row."""

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
    """All that the renderers and the plot read; warnings go into report.md and onto stderr."""

    name: str
    title: str
    kind: str
    columns: list[str]  # benchmarks, each group's together
    groups: dict[str, list[str]]  # group name -> its benchmarks (each has an avg_<group> column)
    rows: list[Row]
    warnings: list[str]
    sweep_dir: Path
    num_jobs: int


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
    """The sweep's rows: one per (model, input, method label, retention), vanilla first within each
    (model, input), then by falling retention and method order; each paper row follows the last row it matches."""
    warnings: list[str] = []
    jobs = collect_jobs(sweep_dir, warnings)
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
