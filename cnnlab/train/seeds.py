"""Many seeds of one config in one program: `seeds=[0,1,...]`.

Seed s trains the model that `seed=s` alone would, into its own folder `<run_dir>/seed_<s>/` with
every file a single run writes and its own tracker (its own W&B run). Three strategies:

- `sequential`: one seed after another in this process, on data loaded once and steps compiled
  once (the shapes do not change, so nothing recompiles); each seed's results are bit-identical to
  its single run.
- `vmap`: the S models stacked along a leading axis and trained by one vmapped step (one
  `cnnlab.train.run.train_lanes` of S lanes), each with its own data order and keys; the same
  results as `sequential` up to the order of float sums. On one GPU or TPU S small models cost
  little more than one.
- `processes`: on the CPU, each seed in its own spawned process pinned to its share of this
  process's cores, as many seeds at a time as there are cores (a last, smaller wave shares all of
  them). XLA's CPU kernels use a second core far less well than a second model does, so seeds
  side by side on one core each finish sooner than one after another on all the cores
  (docs/ has the measurements). Each seed equals its single run up to the order of float sums.

`auto` picks vmap on one GPU or TPU, processes for several seeds on a CPU with several cores,
and sequential otherwise (XLA turns vmapped convolutions into grouped convolutions, which run
slower on the CPU than S models one after another).
`<run_dir>/summary.json` aggregates the seeds.

Glossary: `S` seeds (lanes).
"""

import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import jax
import numpy as np

from cnnlab import malloc
from cnnlab.config import Config, SeedsStrategy
from cnnlab.errors import ConfigError
from cnnlab.tracking import Tracker
from cnnlab.tracking.local import write_json
from cnnlab.train.loop import never
from cnnlab.train.preemption import Preemption
from cnnlab.train.run import Lane, new_summary, prepare, recording, run, train_lanes

MakeTracker = Callable[[Config, Path], Tracker]  # (a seed's config, its folder) -> its tracker


def choose_strategy(
    strategy: str, backend: str, num_devices: int, num_seeds: int = 1, num_cores: int = 1
) -> SeedsStrategy:
    """`seeds_strategy` resolved for this runtime: `auto` is vmap on one GPU or TPU, processes
    for several seeds on one CPU device with several cores, else sequential. vmap runs on one
    device (the lanes are not split over a mesh); processes on one CPU device in one process,
    and not in a daemonic process (a multiprocessing pool's worker), which may start none."""
    one = num_devices == 1 and jax.process_count() == 1
    daemon = multiprocessing.current_process().daemon
    strategy = SeedsStrategy(strategy)
    if strategy == SeedsStrategy.auto:
        if backend != "cpu":
            return SeedsStrategy.vmap if one else SeedsStrategy.sequential
        several = num_seeds > 1 and num_cores > 1
        parallel = one and several and not daemon
        return SeedsStrategy.processes if parallel else SeedsStrategy.sequential
    if strategy == SeedsStrategy.processes and daemon:
        raise ConfigError(
            "seeds_strategy=processes cannot start the seeds' processes from this daemonic "
            "process (a launcher's pool worker); use seeds_strategy=auto or sequential"
        )
    if strategy == SeedsStrategy.vmap and num_devices > 1:
        raise ConfigError(
            f"seeds_strategy=vmap trains on one device, not {num_devices}; use "
            "seeds_strategy=sequential (or auto), or one device (e.g. CUDA_VISIBLE_DEVICES=0)"
        )
    if strategy == SeedsStrategy.processes and (backend != "cpu" or not one):
        where = backend if backend != "cpu" else f"{num_devices} devices"
        raise ConfigError(
            f"seeds_strategy=processes splits one CPU's cores between the seeds, not {where}; "
            "use seeds_strategy=auto"
        )
    return strategy


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one seed: what `seed=<seed>` alone would train."""
    return dataclasses.replace(cfg, seed=seed, seeds=[])


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed_{seed}"


def run_seeds(
    cfg: Config, run_dir: Path, make_tracker: MakeTracker, stop: Callable[[], bool] = never
) -> dict:
    """Train every seed of `cfg.seeds`; returns the aggregate written to `<run_dir>/summary.json`
    (written whatever happens, like a single run's). `stop` as in `cnnlab.train.run.run`: with
    the sequential strategy each seed resumes from its own checkpoints, with vmap the stacked
    models from `<run_dir>/checkpoints/`, when the job runs again."""
    run_dir = Path(run_dir)
    summary = {"status": "failed", "seeds": list(cfg.seeds), "model": cfg.model.name}
    summary.update(dataset=cfg.data.name, backend=jax.default_backend())

    def finish(summary: dict) -> None:
        if jax.process_index() == 0:
            write_json(run_dir / "summary.json", summary)

    with recording(summary, finish):
        strategy = choose_strategy(
            cfg.seeds_strategy, jax.default_backend(), jax.device_count(), len(cfg.seeds),
            len(usable_cores()),
        )  # fmt: skip
        summary["strategy"] = strategy
        summary.update(aggregate(STRATEGIES[strategy](cfg, run_dir, make_tracker, stop)))
    return summary


def _sequential(cfg: Config, run_dir: Path, make_tracker: MakeTracker, stop) -> dict[int, dict]:
    prepared = prepare(cfg)
    summaries = {}
    for seed in cfg.seeds:
        one, folder = seed_config(cfg, seed), seed_dir(run_dir, seed)
        folder.mkdir(parents=True, exist_ok=True)
        tracker = make_tracker(one, folder)
        summaries[seed] = run(one, folder, tracker, prepared=prepared, stop=stop)
        if summaries[seed]["status"] == "preempted":
            break  # the seeds after it start when the job runs again
    return summaries


# jax.config settings that a seed's process takes from this one (cnnlab-train sets them)
INHERITED_JAX_CONFIG = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def _processes(cfg: Config, run_dir: Path, make_tracker: MakeTracker, stop) -> dict[int, dict]:
    """Each seed in a spawned process with its share of the cores, in waves of at most one seed
    a core. `make_tracker` must pickle (a module-level function or class). A signal that `stop`
    caught goes on to the seeds' processes as SIGTERM: each saves a checkpoint and stops, and
    the seeds of later waves start when the job runs again."""
    cores = usable_cores()
    settings = {name: getattr(jax.config, name) for name in INHERITED_JAX_CONFIG}
    context = multiprocessing.get_context("spawn")  # a fork of a process running XLA hangs
    spawner = _Spawner(context, cfg, run_dir, make_tracker, settings)
    summaries: dict[int, dict] = {}
    pending = list(cfg.seeds)
    while pending:
        if stop() or any(s["status"] == "preempted" for s in summaries.values()):
            error = "stopped before this seed started; it starts when the job runs again"
            summaries.update({s: {"status": "preempted", "error": error} for s in pending})
            break
        wave, pending = pending[: len(cores)], pending[len(cores) :]
        shares = [cores[i :: len(wave)] for i in range(len(wave))]
        outcomes = _run_wave(spawner, wave, shares, stop)
        for seed in wave:
            kind, value = outcomes[seed]
            if kind == "raised":
                raise value  # as the sequential strategy would: the seed's own record has it
            summaries[seed] = value
    return summaries


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity: a SLURM job's share, `taskset`)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass
class _Spawner:
    """What every seed process of `_processes` starts from."""

    context: multiprocessing.context.BaseContext
    cfg: Config
    run_dir: Path
    make_tracker: MakeTracker
    settings: dict  # INHERITED_JAX_CONFIG's values


def _run_wave(spawner: _Spawner, wave: list[int], shares: list[list[int]], stop) -> dict:
    """Start one process per seed of `wave` on its share of the cores, wait for all of them, and
    return each one's `("summary", summary)` or `("raised", exception)`."""
    processes, receivers, outcomes = {}, {}, {}
    context = spawner.context
    try:
        for seed, share in zip(wave, shares, strict=True):
            receive, send = context.Pipe(duplex=False)
            one, folder = seed_config(spawner.cfg, seed), seed_dir(spawner.run_dir, seed)
            args = (one, folder, spawner.make_tracker, share, spawner.settings, send)
            processes[seed] = context.Process(
                target=_seed_process, args=args, name=f"cnnlab-seed{seed}"
            )
            processes[seed].start()
            send.close()  # the child holds the only writing end: its exit ends the pipe
            receivers[receive] = seed
        forwarded = False
        while receivers:
            for receive in wait(list(receivers), timeout=1.0):
                seed = receivers.pop(receive)
                try:
                    outcomes[seed] = receive.recv()
                except EOFError:  # killed (out of memory?) or exited before it could answer
                    processes[seed].join()
                    code = processes[seed].exitcode
                    error = f"the process of seed {seed} ended with exit code {code}"
                    outcomes[seed] = ("summary", {"status": "failed", "seed": seed, "error": error})
            if stop() and not forwarded:
                forwarded = True
                for process in processes.values():
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGTERM)
    finally:  # after an answer a process only exits; after Ctrl-C it stops as this one does
        for process in processes.values():
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join()
    return outcomes


class _Prefixed:
    """A text stream that starts each line with `prefix`: the seeds' processes share a terminal."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False  # plain progress lines, not a progress bar per process


def _seed_process(one: Config, folder: Path, make_tracker, cores, settings, send) -> None:
    """A seed's process: pinned to `cores` and its allocator set before XLA sizes its thread
    pools, then one run."""
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the seeds share every core
        os.sched_setaffinity(0, cores)
    malloc.limit_arenas(one.malloc_arenas)
    for name, value in settings.items():
        jax.config.update(name, value)
    sys.stdout = _Prefixed(sys.stdout, f"[seed {one.seed}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[seed {one.seed}] ")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with Preemption() as stop:
            outcome = ("summary", run(one, folder, make_tracker(one, folder), stop=stop))
    except Exception as e:
        outcome = ("raised", e)
    except KeyboardInterrupt:  # Ctrl-C reaches every process: the parent reports it, once
        sys.exit(130)
    send.send(outcome)


def _vmapped(cfg: Config, run_dir: Path, make_tracker: MakeTracker, stop) -> dict[int, dict]:
    """The seeds as the stacked lanes of one `train_lanes`, their checkpoints (one stacked state)
    in `<run_dir>/checkpoints/`, beside the seeds' folders."""
    if cfg.checkpoint.init_from:
        raise ConfigError(
            "checkpoint.init_from starts one model, not a stack of them: use "
            "seeds_strategy=sequential with it"
        )
    prepared = prepare(cfg, lanes=True)
    lanes = []
    with ExitStack() as stack:  # every seed's tracker is finished with its summary, on every path
        for seed in cfg.seeds:
            one, folder = seed_config(cfg, seed), seed_dir(run_dir, seed)
            folder.mkdir(parents=True, exist_ok=True)
            tracker = make_tracker(one, folder)
            summary = stack.enter_context(recording(new_summary(one), tracker.finish))
            lanes.append(Lane(one, folder, tracker, summary))
        train_lanes(cfg, run_dir, lanes, prepared, stop)
    return {lane.cfg.seed: lane.summary for lane in lanes}


# Each strategy but `auto`, which `choose_strategy` resolves to one of these
STRATEGIES = {
    SeedsStrategy.sequential: _sequential,
    SeedsStrategy.vmap: _vmapped,
    SeedsStrategy.processes: _processes,
}


def aggregate(summaries: dict[int, dict]) -> dict:
    """The seeds together: `ok` if every seed is, else the first other status with its error;
    the mean and the sample standard deviation of test/accuracy and val/best_accuracy over the
    seeds that finished; each seed's status and accuracies under `per_seed`."""
    out: dict = {"status": "ok"}
    for seed, s in summaries.items():
        if s["status"] != "ok":
            out.update(status=s["status"], error=f"seed {seed}: {s.get('error', s['status'])}")
            break
    ok = [s for s in summaries.values() if s["status"] == "ok"]
    for key in ("test/accuracy", "val/best_accuracy"):
        values = np.array([s[key] for s in ok], dtype=float)
        out[key] = float(values.mean()) if len(values) else float("nan")
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    first = next(iter(summaries.values()), {})
    out.update({k: first[k] for k in ("params", "macs", "flops", "devices") if k in first})
    out["per_seed"] = {
        str(seed): {k: s.get(k) for k in ("status", "test/accuracy", "val/best_accuracy")}
        for seed, s in summaries.items()
    }
    return out
