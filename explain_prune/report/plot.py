"""The Figure-3-style preservation-vs-FLOPs plot of a `Table`."""

from __future__ import annotations

import io
from pathlib import Path

from explain_prune.core import write_bytes_atomic
from explain_prune.report.table import Table, avg_key

PLOT = "preservation_vs_flops.png"


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


def write_plot(table: Table, path: Path) -> bool:
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
