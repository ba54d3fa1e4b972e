"""`python -m explain_prune.report`: arguments, then collect -> table -> files (+ plot, + W&B).

Not in `report/__main__.py`, so tests can import `main` without `-m` running an already-imported
`__main__` a second time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from explain_prune.cli import task
from explain_prune.core import write_bytes_atomic
from explain_prune.report.matched import MATCHED, render_matched
from explain_prune.report.plot import PLOT, write_plot
from explain_prune.report.render import render_csv, render_latex, render_markdown
from explain_prune.report.table import Table, build_table
from explain_prune.report.wandb_log import log_to_wandb


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
    """Write report.md/.csv/.tex and the plot for one sweep dir (bad input: one line, exit 2, via @task)."""
    args = parse_args(argv)
    table = build_table(args.sweep_dir)
    out_dir = args.out or args.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path: Path | None = out_dir / PLOT
    if not write_plot(table, plot_path):
        table.warnings.append("no row has both FLOPs and Avg.(%): no plot written")
        plot_path = None
    markdown = render_markdown(table)
    for name, text in (("report.md", markdown), ("report.csv", render_csv(table)), ("report.tex", render_latex(table))):
        write_bytes_atomic(out_dir / name, text.encode())
    matched = render_matched(table)
    if matched is not None:
        write_bytes_atomic(out_dir / MATCHED, matched.encode())
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(markdown)
    if args.wandb:
        log_to_wandb(table, out_dir, plot_path, markdown, args.project)
    print(f"report: {out_dir}/report.md, report.csv, report.tex" + (f", {PLOT}" if plot_path else "")
          + (f", {MATCHED}" if matched is not None else ""), file=sys.stderr)
    return table
