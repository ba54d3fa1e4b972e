"""`python -m explain_prune.report <sweep dir> [--out DIR] [--wandb] [--project NAME]` (the body: explain_prune.stages.report)."""

from explain_prune.stages.report import main

main()
