"""`report.html`: one self-contained page (inline CSS, PNGs as base64 data URIs, no scripts)."""

import base64
import html
from pathlib import Path

from cnnlab.report.collect import Inputs, Point, swept_keys
from cnnlab.report.tables import Row, point_label, problems, table_cells

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
code, pre { font: 13px/1.35 ui-monospace, monospace; background: #f5f5f5; }
pre { padding: 0.6em; overflow-x: auto; } pre.cmd { white-space: pre-wrap; }
code { padding: 0 0.2em; }
table { border-collapse: collapse; font-size: 13px; } .wide { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #eee; } td.key { text-align: left; font-weight: 600; }
tr.bad td { background: #f1f1f1; color: #777; }
img { max-width: 100%; display: block; margin: 0.8em 0 1.6em; }
li { margin: 0.3em 0; } .status { font-weight: 600; }
details { margin: 0.4em 0; } summary { cursor: pointer; }
"""


def render(
    sweep_dir: Path,
    command: list[str],
    points: list[Point],
    rows: list[Row],
    plots: dict[str, Path],
    inputs: Inputs,
) -> str:
    """The whole page as a string."""
    e = html.escape
    names = sorted({str(p.config.get("name")) for p in points if p.config.get("name")})
    title = f"Sweep report: {', '.join(names) or sweep_dir.name}"
    # the nets by their model.name ("custom" where the command line wrote the layers), which the
    # sweep's name, set by its preset, may not say
    models = sorted({str(p.config["model.name"]) for p in points if p.config.get("model.name")})
    counts = {}
    for p in points:
        counts[p.status] = counts.get(p.status, 0) + 1
    totals = ", ".join(f"{c} {s}" for s, c in counts.items()) or "no jobs yet"
    parts = [
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Sweep directory: <code>{e(str(sweep_dir.resolve()))}</code><br>",
        f"{len(points)} jobs ({e(totals)}) in {len(rows)} points.",
        f"<br>Model: {e(', '.join(models))}." if models else "",
        f"<br>Input: {e(inputs.text)}.</p>" if inputs.text else "</p>",
    ]
    if command:
        parts.append(
            f"<p>Command:</p><pre class='cmd'>{e('cnnlab-train -m ' + ' '.join(command))}</pre>"
        )
    parts += ["<h2>Summary</h2>", _table(rows, inputs.example)]
    parts += ["<h2>Plots</h2>"]
    parts += [f"<img alt='{e(name)}' src='{_data_uri(path)}'>" for name, path in plots.items()]
    parts += ["<h2>Invalid and failed points</h2>", _problems(points)]
    parts += ["<h2>Architectures</h2>", *map(_architecture, rows), "</body></html>\n"]
    return "\n".join(parts)


def _table(rows: list[Row], example: str) -> str:
    e = html.escape
    head, body = table_cells(rows, example)
    n_keys = len(rows[0].values) if rows else 0
    lines = ["<p>Accuracies in %, mean ± standard deviation over the seeds that finished ok (n)."]
    lines += ["<div class='wide'><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for row, cells in zip(rows, body, strict=True):
        cls = "" if row.n else " class='bad'"
        tds = [
            f"<td class='key'>{e(c)}</td>" if i < n_keys else f"<td>{e(c)}</td>"
            for i, c in enumerate(cells)
        ]
        lines.append(f"<tr{cls}>{''.join(tds)}</tr>")
    return "\n".join([*lines, "</table></div>"])


def _problems(points: list[Point]) -> str:
    e = html.escape
    failed, keys = problems(points), swept_keys(points)
    if not failed:
        return "<p>None: every job finished ok.</p>"
    items = [
        f"<li>job {e(p.job)} (<code>{e(point_label(p, keys))}</code>): "
        f"<span class='status'>{e(p.status)}</span>: {e(p.error)}</li>"
        for p in failed
    ]
    return "<ul>\n" + "\n".join(items) + "\n</ul>"


def _architecture(row: Row) -> str:
    e = html.escape
    layers = next((p.layers for p in row.jobs if p.layers), "")
    body = f"<pre>{e(layers)}</pre>" if layers else f"<p>No layers.txt ({e(row.status)}).</p>"
    return f"<details><summary>{e(row.label)}</summary>\n{body}\n</details>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
