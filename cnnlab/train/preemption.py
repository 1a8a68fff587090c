"""Stopping cleanly when asked: SIGTERM, SIGUSR1 or SIGUSR2 during training.

SLURM sends SIGTERM before it preempts or cancels a job, and the signal named by `--signal`
before its time limit (USR2 from submitit, which Hydra's SLURM launcher uses; USR1 by a common
convention). `Preemption` turns each into a request that the training loop polls after every
step: the loop saves a checkpoint and returns, and the run ends with status `preempted`, its
records complete. `finish` then passes the signal on to the handler that was there before
(submitit's requeues the job, which resumes in the same run directory) or exits with status
128 + the signal's number, as the signal itself would have.
"""

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption:
    """`with Preemption() as stop:` catches SIGNALS inside the block; `stop()` tells whether one
    arrived. Signal handlers belong to the main thread: elsewhere it catches nothing."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __call__(self) -> bool:
        return self.received is not None

    def _catch(self, signum: int, frame) -> None:
        if self.received is None:
            name = signal.Signals(signum).name
            print(f"cnnlab: {name}: saving a checkpoint and stopping", file=sys.stderr, flush=True)
        self.received = signum

    def finish(self) -> None:
        """Hand the caught signal to the handler that was there before, else exit as it would."""
        signum = self.received
        if signum is None:
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)  # submitit's: requeue the job, then exit
        sys.exit(128 + signum)
