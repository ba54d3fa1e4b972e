"""A `Table` as text: Markdown (also printed), CSV (raw numbers) and a booktabs LaTeX tabular,
all from one column list so the three formats cannot disagree."""

from __future__ import annotations

import csv
import io
import itertools
from typing import Any

from explain_prune.core import RESULTS
from explain_prune.report.table import Row, Table, avg_key

SCORE_PLACES = {"mmbench_video": 2}  # its judge's 0-3 mean score: the paper prints 2 decimals (0.41 vs 0.38)
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
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                 "{": r"\{", "}": r"\}", "×": r"$\times$", "†": r"$^\dagger$"}


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
