"""Progress output: a tqdm bar on a terminal, plain periodic lines elsewhere (SLURM logs, CI)."""

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, interactive: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.total = total_steps
        self.start = time.perf_counter()
        self.bar = None
        if self.interactive:
            self.bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Train metrics go into the bar (or a line); validation results always get a line."""
        shown = {k.removeprefix("train/"): v for k, v in metrics.items() if k != "epoch"}
        text = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if self.bar is not None and not any(k.startswith("val/") for k in metrics):
            self.bar.set_description(f"epoch {epoch}")
            self.bar.set_postfix_str(text, refresh=False)
            return
        elapsed = time.perf_counter() - self.start
        line = f"epoch {epoch} step {step}/{self.total} {text} [{elapsed:.0f}s]"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
