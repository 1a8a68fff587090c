"""Exact resume the hard way: `cnnlab-train` killed with SIGKILL again and again, at random
observed steps and in the middle of checkpoint saves, rerun in the same run directory each time,
ends with the parameters and the metrics history of a run that was never interrupted. SIGTERM and
SIGUSR1 (SLURM's warnings) make it save and stop within seconds, and the rerun goes on from there.

The test proves it can fail: every kill comes after the first checkpoint and every rerun says
it resumed, and a deliberately broken resume (the data order not restored) is reported as a
mismatch by the same comparison.
"""

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from tests.conftest import REPO, final_params, history, needs_fashion_mnist

pytestmark = needs_fashion_mnist

STEPS = 62  # 2 epochs of 31 batches of 32
ARGS = [
    "logger.mode=disabled", "logger.pictures=false", "model.padding=[2,0]", "model.dropout=0.2",
    "data.train_limit=1000",
    "data.test_limit=500", "train.epochs=2", "train.batch_size=32", "train.log_every_steps=1",
    "checkpoint.every_steps=3", "checkpoint.keep=2",
]  # fmt: skip
# A resume that loses the data order: the resumed process visits each epoch unshuffled.
BROKEN = (
    "import numpy as np, cnnlab.train.loop as loop;"
    "loop.epoch_order = lambda seed, epoch, n: np.arange(n, dtype=np.int32);"
    "import sys; sys.argv[0] = 'cnnlab-train';"
    "from experiments.train import main; main()"
)


def start(run_dir: Path, broken: bool = False) -> subprocess.Popen:
    program = ["-c", BROKEN] if broken else ["-m", "experiments.train"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.Popen(
        [sys.executable, *program, *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[-3:] if line.endswith("}")]
    return max(steps, default=0)


def saved_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )


def saving(run_dir: Path) -> bool:
    """Whether a save is under way: orbax writes into a temporary folder and renames it."""
    return any((run_dir / "checkpoints").glob("*tmp*"))


def kill_point(run_dir: Path, last: int, target: int | None) -> bool:
    """Whether to kill now: this attempt is training (past the killed attempt's `last` logged
    step; its start also removed any cut save), and it reached `target` or, for None, a save is
    under way."""
    if last_step(run_dir) <= last or not saved_steps(run_dir):
        return False
    return saving(run_dir) if target is None else last_step(run_dir) >= target


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            proc.kill()
            proc.communicate()
            return True
        assert time.monotonic() < deadline, "the run neither reached the kill point nor ended"
        time.sleep(0.002)
    return False


def interrupted_run(run_dir: Path, kills: int, rng: random.Random, broken: bool = False):
    """Kill a run `kills` times (every third kill during a save), then let it finish. Returns how
    many kills landed during a save and the last rerun's output."""
    during_save = 0
    for k in range(kills):
        last = last_step(run_dir)  # metrics.jsonl of the killed attempt, rewound on resume
        proc = start(run_dir, broken=broken and k > 0)
        # every third kill in the middle of a save, the others at a random step a little further
        target = None if k % 3 == 2 else rng.randint(last + 1, min(STEPS - 2, last + 8))
        if not kill_when(proc, functools.partial(kill_point, run_dir, last, target)):
            pytest.fail(f"kill {k}: the run ended before it could be killed\n{proc.stderr.read()}")
        during_save += saving(run_dir)  # the temporary folder of the cut save is still there
    proc = start(run_dir, broken=broken)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return during_save, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("kill") / "whole"
    proc = start(run_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return run_dir


def test_sigkill_at_random_steps_and_during_saves_resumes_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    during_save, out = interrupted_run(run_dir, kills=10, rng=random.Random(5))
    assert during_save >= 3, "too few kills landed in the middle of a save"
    assert "cnnlab: resuming from step" in out
    chex.assert_trees_all_equal(final_params(run_dir), final_params(uninterrupted))
    assert history(run_dir) == history(uninterrupted)  # no record twice, none missing
    summary = json.loads((run_dir / "summary.json").read_text())
    whole = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["test/accuracy"] == whole["test/accuracy"]
    assert summary["steps"] == STEPS and summary["resumed_from_step"] >= 3


def test_the_comparison_catches_a_resume_that_loses_the_data_order(tmp_path, uninterrupted):
    run_dir = tmp_path / "broken"
    _, out = interrupted_run(run_dir, kills=2, rng=random.Random(1), broken=True)
    assert "cnnlab: resuming from step" in out
    same = jax.tree.map(np.array_equal, final_params(run_dir), final_params(uninterrupted))
    assert not all(jax.tree.leaves(same)), "a broken resume went unnoticed"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_saves_and_stops_within_seconds_and_the_rerun_resumes(
    tmp_path, uninterrupted, signum
):
    run_dir = tmp_path / "signalled"
    proc = start(run_dir)
    while last_step(run_dir) < 10:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + signum, err[-3000:]  # as the signal itself would exit
    assert seconds < 20, f"took {seconds:.1f} s to stop"  # SLURM waits 30 s or more to kill
    assert f"cnnlab: {signum.name}: saving a checkpoint and stopping" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] in saved_steps(run_dir)
    assert "Traceback" not in err
    proc = start(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"cnnlab: resuming from step {summary['steps']} " in out
    chex.assert_trees_all_equal(final_params(run_dir), final_params(uninterrupted))
    assert history(run_dir) == history(uninterrupted)
