"""Export an evaluate run for re-scoring by the official toolkit:

    python -m explain_prune.export <run dir> --format vlmevalkit [--out DIR] [--model NAME]

writes `<out>/<model>/<model>_<dataset>.tsv` (default out: `<run dir>/vlmevalkit`), the layout
VLMEvalKit's `run.py --mode eval` reads with `PRED_FORMAT=tsv` (explain_prune.report.vlmevalkit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from explain_prune.cli import task
from explain_prune.report.vlmevalkit import export_run

FORMATS = ("vlmevalkit",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m explain_prune.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an evaluate run dir (results.json + predictions.jsonl)")
    parser.add_argument("--format", choices=FORMATS, default="vlmevalkit", help="the toolkit's file layout")
    parser.add_argument("--out", type=Path, default=None, help="work dir to write into (default: <run dir>/vlmevalkit)")
    parser.add_argument("--model", default=None, help="model name in the file name (default: the run's model[_method_retention])")
    return parser.parse_args(argv)


@task
def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    path = export_run(args.run_dir, args.out, args.model)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
