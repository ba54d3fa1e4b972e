"""`python -m explain_prune.report <sweep dir> [--out DIR] [--wandb] [--project NAME]` (explain_prune.report.cli)."""

from explain_prune.report.cli import main

main()
