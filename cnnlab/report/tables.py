"""Rows of the sweep summary: one per point (swept values except the seed), mean and standard
deviation over the seeds that finished ok, and the same rows as CSV and as Markdown."""

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from cnnlab.report.collect import REPLICATE, Inputs, Point, swept_keys

STATUSES = ("ok", "diverged", "failed", "interrupted", "invalid", "missing")
# name -> (label, read from a point, shown as a percentage); averaged over the ok seeds
AVERAGED = {
    "test_accuracy": ("test accuracy", lambda p: p.metric("test/accuracy"), True),
    "final_val_accuracy": ("final val accuracy", lambda p: p.final_val_accuracy, True),
    "best_val_accuracy": ("best val accuracy", lambda p: p.metric("val/best_accuracy"), True),
    "wall_seconds": ("wall s", lambda p: p.metric("wall_seconds"), False),
}
# fixed by the architecture: any job's value; FLOPs per input, an image's or a series'
COST = {"params": "params", "flops": "FLOPs/{example}"}


@dataclass
class Row:
    """One point of the sweep and its replicates (usually one job per seed)."""

    values: dict[str, Any]  # swept key -> value, the seed left out
    jobs: list[Point]
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)  # None with fewer than 2 seeds
    cost: dict[str, int | None] = field(default_factory=dict)  # params, flops

    @property
    def ok(self) -> list[Point]:
        return [p for p in self.jobs if p.status == "ok"]

    @property
    def n(self) -> int:
        """Number of seeds that finished ok (what the means are over)."""
        return len(self.ok)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(p.status == s for p in self.jobs) for s in STATUSES}

    @property
    def status(self) -> str:
        """e.g. "2 ok", "1 ok, 1 diverged", "2 invalid"."""
        return ", ".join(f"{c} {s}" for s, c in self.counts.items() if c)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={fmt_value(v)}" for k, v in self.values.items()) or "all jobs"


def aggregate(points: list[Point]) -> list[Row]:
    """Group jobs by every swept key except the seed, sorted by those values."""
    keys = [k for k in swept_keys(points) if k != REPLICATE]
    groups: dict[tuple, Row] = {}
    for point in points:
        values = {k: point.config.get(k) for k in keys}
        row = groups.setdefault(tuple(map(repr, values.values())), Row(values, []))
        row.jobs.append(point)
    rows = sorted(groups.values(), key=lambda r: [sort_key(v) for v in r.values.values()])
    for row in rows:
        for name, (_, read, _) in AVERAGED.items():
            found = [x for x in map(read, row.ok) if x is not None]
            row.mean[name] = statistics.fmean(found) if found else None
            row.std[name] = statistics.stdev(found) if len(found) > 1 else None
        for name in COST:
            found = [int(x) for x in (p.metric(name) for p in row.jobs) if x is not None]
            row.cost[name] = found[0] if found else None
    return rows


def problems(points: list[Point]) -> list[Point]:
    """The jobs that did not finish ok, with their errors."""
    return [p for p in points if p.status != "ok"]


def csv_rows(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    """Header and machine-readable values: accuracies as fractions, None where there is none."""
    keys = list(rows[0].values) if rows else []
    head = [*keys, "n"]
    head += [f"{m}_{s}" for m in AVERAGED for s in ("mean", "std")]
    head += [*COST, *STATUSES, "errors"]
    body = []
    for row in rows:
        line: list[Any] = [fmt_value(v) for v in row.values.values()] + [row.n]
        for m in AVERAGED:
            line += [_round(row.mean[m]), _round(row.std[m])]
        line += [row.cost[c] for c in COST]
        line += [row.counts[s] for s in STATUSES]
        line.append(" | ".join(dict.fromkeys(p.error for p in row.jobs if p.error)))
        body.append(line)
    return head, body


def to_csv(rows: list[Row]) -> str:
    """One line per point; empty cells where there is no value."""
    head, body = csv_rows(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    writer.writerows(["" if v is None else v for v in line] for line in body)
    return out.getvalue()


def table_cells(rows: list[Row], example: str) -> tuple[list[str], list[list[str]]]:
    """Header and display cells of the summary table (Markdown and HTML share them), costs per
    `example` ("image", "series": `Inputs.example`)."""
    keys = list(rows[0].values) if rows else []
    costs = [label.format(example=example) for label in COST.values()]
    head = [*keys, "n", *(label for label, _, _ in AVERAGED.values()), *costs, "status"]
    body = []
    for row in rows:
        cells = [fmt_value(v) for v in row.values.values()] + [str(row.n)]
        for m, (_, _, percent) in AVERAGED.items():
            cells.append(fmt_stat(row.mean[m], row.std[m], percent))
        cells += [f"{row.cost[c]:,}" if row.cost[c] is not None else "" for c in COST]
        body.append([*cells, row.status])
    return head, body


def to_markdown(rows: list[Row], points: list[Point], inputs: Inputs, title: str = "") -> str:
    """A GitHub Markdown table (mean ± std over seeds), then the jobs that did not finish ok."""
    head, body = table_cells(rows, inputs.example)
    lines = [f"# {title}", ""] if title else []
    lines += [f"Input: {inputs.text}.", ""] if inputs.text else []
    lines += ["Accuracies in %, mean ± standard deviation over the seeds that finished ok (n).", ""]
    lines += [_md_line(head), _md_line(["---"] * len(head)), *map(_md_line, body), ""]
    failed, keys = problems(points), swept_keys(points)
    lines += ["## Invalid and failed points", ""]
    lines += [f"- job {p.job} ({point_label(p, keys)}): **{p.status}**: {p.error}" for p in failed]
    lines += [] if failed else ["None: every job finished ok."]
    return "\n".join(lines) + "\n"


def point_label(point: Point, keys: list[str]) -> str:
    """The job's values of the swept keys, e.g. "model.depth=3 seed=1"."""
    if keys:
        return " ".join(f"{k}={fmt_value(point.config.get(k))}" for k in keys)
    return " ".join(point.overrides) or f"job {point.job}"


def fmt_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(fmt_value, value)) + "]"
    return "null" if value is None else str(value)


def fmt_stat(mean: float | None, std: float | None, percent: bool) -> str:
    if mean is None:
        return ""
    scale, digits = (100, 2) if percent else (1, 1)
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def sort_key(value: Any) -> tuple:
    """Numbers numerically, before strings and lists; None first."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, math.inf, fmt_value(value))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
