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
        self.bar = (
            tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True)
            if self.interactive
            else None
        )

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Show the latest logged metrics: in the bar, or as one line."""
        shown = {k.split("/", 1)[-1] if k.startswith("train/") else k: v for k, v in metrics.items()}
        text = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}")
            self.bar.set_postfix_str(text, refresh=False)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"epoch {epoch} step {step}/{self.total} {text} [{elapsed:.0f}s]", file=self.stream)
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
