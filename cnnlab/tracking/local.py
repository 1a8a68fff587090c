"""The run directory's own record, written whatever the W&B setting.

- `metrics.jsonl`: one JSON object per log step, `{"step": ..., "time": ..., "train/loss": ...}`,
  flushed as it is written, so a killed run keeps every record up to its last log step; a run
  resumed from a checkpoint first cuts it back to what it held at that checkpoint (`rewind`);
- `layers.txt`: the per-layer table;
- `confusion_matrix.csv`: test confusion counts, rows true class, columns predicted;
- `pictures/*.png`: drawn by `cnnlab.train.run.draw_pictures` (`logger.pictures`);
- `summary.json`: the final summary, written atomically.
"""

import csv
import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np

from cnnlab.geometry import Layer, format_table
from cnnlab.tracking import confusion_matrix


def write_json(path: Path, obj) -> None:
    """Write strict JSON atomically: a reader never sees a half-written file, and processes
    writing the same file at once (the hosts of a multi-host run) each replace it whole. A NaN or
    infinite float (no validation split: no best validation accuracy) is written as null."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class LocalTracker:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        # open for the whole run, closed by finish(); append, so a resumed run keeps its history
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.metrics.flush()

    def mark(self) -> dict:
        return {"metrics_bytes": self.metrics.tell()}

    def rewind(self, mark: dict) -> None:
        """Cut metrics.jsonl back to its length at `mark` (records after it, and any half-written
        line of a killed process, are logged again by the resumed run)."""
        self.metrics.truncate(mark["metrics_bytes"])  # append mode: writes go to the new end

    def log_layers(self, rows: list[Layer]) -> None:
        (self.run_dir / "layers.txt").write_text(format_table(rows) + "\n")

    def log_predictions(self, images, labels, probs, class_names) -> None:
        counts = confusion_matrix(labels, np.argmax(probs, -1), len(class_names))
        with open(self.run_dir / "confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *class_names])
            writer.writerows(
                [name, *row] for name, row in zip(class_names, counts.tolist(), strict=False)
            )

    def log_pictures(self, paths: dict[str, Path]) -> None:
        pass  # drawn into <run_dir>/pictures/ already

    def finish(self, summary: dict) -> None:
        self.metrics.close()
        write_json(self.run_dir / "summary.json", summary)
