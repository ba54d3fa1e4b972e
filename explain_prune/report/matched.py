"""The matched-FLOPs view of a sweep (`matched_flops.md`): every measured row beside each other
method's row of the nearest FLOPs, same model and input — the comparison at equal cost that the
paper makes in Tables 9/10 and Figure 3, where equal *retention* can hide unequal compute (a method
that prunes after layer K spends the first K layers on every token).

The compared value is the row's Avg.(%) when the sweep has a vanilla row, else the score of a
one-benchmark sweep; FLOPs are `flops_T` (LLM FLOPs on the visual tokens per sample, App. C).
Ties in distance go to the cheaper row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from explain_prune.report.render import cell
from explain_prune.report.table import Row, Table, avg_key

MATCHED = "matched_flops.md"


@dataclass
class Match:
    row: Row
    others: dict[str, Row]  # method label -> its row with the FLOPs nearest this row's


def headline(table: Table) -> str | None:
    """The key of the value compared: Avg.(%) when any row has it, else a one-benchmark sweep's score."""
    if any(r.values.get(avg_key(None)) is not None for r in table.rows if r.source == "measured"):
        return avg_key(None)
    return table.columns[0] if len(table.columns) == 1 else None


def matched_flops(table: Table) -> list[Match]:
    """One Match per measured pruned row with FLOPs, in table order."""
    rows = [r for r in table.rows
            if r.source == "measured" and r.method_name != "vanilla" and r.values.get("flops_T") is not None]
    out = []
    for row in rows:
        flops = float(row.values["flops_T"])
        by_method: dict[str, list[Row]] = {}
        for peer in rows:
            if (peer.model, peer.input) == (row.model, row.input) and peer.method != row.method:
                by_method.setdefault(peer.method, []).append(peer)
        others = {method: min(peers, key=lambda p: (abs(float(p.values["flops_T"]) - flops), float(p.values["flops_T"])))
                  for method, peers in by_method.items()}
        if others:
            out.append(Match(row, others))
    return out


def render_matched(table: Table, matches: Sequence[Match] | None = None) -> str | None:
    """Markdown of the view, one table per (model, input); None when nothing can be matched."""
    key = headline(table)
    matches = matched_flops(table) if matches is None else list(matches)
    if key is None or not matches:
        return None
    name = "Avg.(%)" if key == avg_key(None) else key
    out = [f"# {table.title}: at matched FLOPs", ""]
    groups: dict[tuple[str, str], list[Match]] = {}
    for match in matches:
        groups.setdefault((match.row.model, match.row.input), []).append(match)
    for (model, input_), group in groups.items():
        methods = list(dict.fromkeys(m for match in group for m in match.others))
        out += [f"## {model} ({input_})", ""]
        out.append("| Method | Retention | FLOPs(T) | " + name + " | " + " | ".join(f"{m} at the nearest FLOPs" for m in methods) + " |")
        out.append("|" + "|".join("---" for _ in range(4 + len(methods))) + "|")
        for match in group:
            row = match.row
            cells = [row.method, cell(row, "retention"), f"{float(row.values['flops_T']):.3g}", cell(row, key)]
            for method in methods:
                other = match.others.get(method)
                cells.append("–" if other is None else
                             f"{cell(other, key)} ({cell(other, 'retention')}, {float(other.values['flops_T']):.3g} T)")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(f"- {name} of each row, and of each other method's row whose FLOPs(T) are nearest (ties: the "
               "cheaper), with that row's retention and FLOPs; same model and input only.")
    return "\n".join(out) + "\n"
