"""Optional W&B logging of a report (`--wandb`): the table and plot as one run, and a W&B Report when online."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from explain_prune import tracking
from explain_prune.report.render import csv_header, csv_values
from explain_prune.report.table import Table


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
