"""Render a sweep's evaluate results as the paper's tables: `python -m explain_prune.report <sweep dir>`.

    python -m explain_prune.report outputs/evaluate/multiruns/<stamp> [--out DIR] [--wandb] [--project NAME]

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

Modules, in the order the CLI uses them: collect (results.json -> Job), table (Jobs -> Table of Rows),
render (Markdown / CSV / LaTeX), plot (the PNG), wandb_log (--wandb); the command itself is
explain_prune.stages.report (main).
"""

from explain_prune.report.collect import Job, collect_jobs, input_settings
from explain_prune.report.plot import PLOT, plot_points, write_plot
from explain_prune.report.render import (
    cell,
    csv_header,
    csv_values,
    latex_escape,
    layer_star,
    notes,
    render_csv,
    render_latex,
    render_markdown,
    table_columns,
)
from explain_prune.report.table import (
    DEFAULT_METHOD_ORDER,
    KINDS,
    PAPER_VALUE_KEYS,
    Row,
    Table,
    avg_key,
    benchmark_groups,
    build_table,
)
from explain_prune.report.wandb_log import log_to_wandb, workspace_report

__all__ = [
    "DEFAULT_METHOD_ORDER", "KINDS", "PAPER_VALUE_KEYS", "PLOT", "Job", "Row", "Table", "avg_key",
    "benchmark_groups", "build_table", "cell", "collect_jobs", "csv_header", "csv_values", "input_settings",
    "latex_escape", "layer_star", "log_to_wandb", "notes", "plot_points", "render_csv",
    "render_latex", "render_markdown", "table_columns", "workspace_report", "write_plot",
]
