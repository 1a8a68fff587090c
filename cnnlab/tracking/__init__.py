"""Where a run's results go: local files always, Weights & Biases when enabled.

The training code only sees the `Tracker` interface; `Trackers` fans out to several.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cnnlab.config import Config, LoggerConfig
from cnnlab.geometry import Layer


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_layers(self, rows: list[Layer]) -> None: ...

    def log_predictions(
        self, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: tuple
    ) -> None:
        """Test images [N, H, W, C] uint8, labels [N] and softmax outputs [N, K]."""

    def log_pictures(self, paths: dict[str, Path]) -> None:
        """PNG files already written into the run directory, by picture name."""

    def finish(self, summary: dict) -> None: ...

    def mark(self) -> dict:
        """Where the history stands now, saved with a checkpoint (JSON)."""

    def rewind(self, mark: dict) -> None:
        """Drop the history after `mark`: a run resumed from that checkpoint logs it again."""


class Trackers:
    """Several trackers behind one interface; `finish` reaches every one even if another fails."""

    def __init__(self, *trackers: Tracker):
        self.trackers = [t for t in trackers if t is not None]

    def log(self, metrics, step):
        for t in self.trackers:
            t.log(metrics, step)

    def log_layers(self, rows):
        for t in self.trackers:
            t.log_layers(rows)

    def log_predictions(self, images, labels, probs, class_names):
        for t in self.trackers:
            t.log_predictions(images, labels, probs, class_names)

    def log_pictures(self, paths):
        for t in self.trackers:
            t.log_pictures(paths)

    def mark(self):
        return {k: v for t in self.trackers if hasattr(t, "mark") for k, v in t.mark().items()}

    def rewind(self, mark):
        for t in self.trackers:
            if hasattr(t, "rewind"):
                t.rewind(mark)

    def finish(self, summary):
        errors = []
        for t in self.trackers:
            try:
                t.finish(summary)
            except Exception as e:  # finish the others, then re-raise the first failure
                errors.append(e)
        if errors:
            raise errors[0]


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


@dataclass
class MakeTrackers:
    """`(a run's config, its folder) -> its trackers`: the local files, and a W&B run unless W&B
    is disabled; none on a process of a multi-host run other than the first, which keeps the
    record. With `seeds`, each seed's W&B run is `<name>-seed<s>`, open beside the others. A
    class, not a closure, so that it pickles into the seeds' processes."""

    logger: LoggerConfig
    config: dict  # the job's resolved config, for W&B
    name: str  # the W&B run's name
    primary: bool = True
    seeds: bool = False

    def __call__(self, cfg: Config, folder: Path) -> Trackers:
        from cnnlab.tracking.local import LocalTracker

        if not self.primary:
            return Trackers()
        if self.logger.mode == "disabled":
            return Trackers(LocalTracker(folder))
        from cnnlab.tracking.wandb_run import WandbTracker

        config, name = self.config, self.name
        if self.seeds:
            config, name = {**config, "seed": cfg.seed, "seeds": []}, f"{name}-seed{cfg.seed}"
        wandb = WandbTracker(self.logger, folder, config, name, concurrent=self.seeds)
        return Trackers(LocalTracker(folder), wandb)
