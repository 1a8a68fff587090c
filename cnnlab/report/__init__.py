"""The report of a Hydra sweep: what depth, stride and padding (or whatever was swept) did to
accuracy and cost.

`write_report(sweep_dir)` reads every job folder of `multirun/<name>/<timestamp>/` and writes,
beside them, `summary.csv` and `summary.md` (one row per point, mean ± std over seeds),
`accuracy.png`, `heatmap.png`, `accuracy_vs_flops.png` and a self-contained `report.html`.
Jobs that diverged, failed, were rejected as invalid or left no summary are listed with their
error and kept out of the means.
"""

from pathlib import Path

import yaml

from cnnlab.report.collect import Point, check_sweep_dir, collect, inputs, swept_keys
from cnnlab.report.html import render
from cnnlab.report.plots import write_plots
from cnnlab.report.tables import Row, aggregate, csv_rows, to_csv, to_markdown


def write_report(sweep_dir: Path, wandb_run=None) -> dict[str, Path]:
    """Write the report files at the root of `sweep_dir`; returns name -> path.

    With `wandb_run` (a `wandb` Run) the table is also logged as `sweep/summary` and each plot
    as `sweep/<plot name>`.
    """
    sweep_dir = Path(sweep_dir)
    points = collect(sweep_dir)
    rows, seen = aggregate(points), inputs(points)
    paths = {"csv": sweep_dir / "summary.csv", "markdown": sweep_dir / "summary.md"}
    paths["csv"].write_text(to_csv(rows))
    paths["markdown"].write_text(to_markdown(rows, points, seen, f"Sweep {sweep_dir}"))
    plots = write_plots(rows, seen, sweep_dir)
    paths["html"] = sweep_dir / "report.html"
    page = render(sweep_dir, command(sweep_dir), points, rows, plots, seen)
    paths["html"].write_text(page)
    if wandb_run is not None:
        log_to_wandb(wandb_run, rows, plots)
    return {**paths, **plots}


def command(sweep_dir: Path) -> list[str]:
    """The sweep's task overrides from multirun.yaml (`hydra.overrides.task`), if recorded."""
    path = Path(sweep_dir) / "multirun.yaml"
    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else None
        task = tree["hydra"]["overrides"]["task"]
    except (yaml.YAMLError, KeyError, TypeError):
        return []
    return [str(t) for t in task] if isinstance(task, list) else []


def log_to_wandb(run, rows: list[Row], plots: dict[str, Path]) -> None:
    import wandb

    head, body = csv_rows(rows)
    images = {f"sweep/{name}": wandb.Image(str(path)) for name, path in plots.items()}
    run.log({"sweep/summary": wandb.Table(columns=head, data=body), **images})


__all__ = ["Point", "Row", "aggregate", "check_sweep_dir", "collect", "swept_keys", "write_report"]
