"""`cnnlab-bench`: cnnlab against plain PyTorch eager, same networks, data, batch and threads.

For LeNet-5 on Fashion-MNIST, AlexNet-lite on the CIFAR-10 copy and FCN on the UCR archive's
OSULeaf series it measures each contender:
- steady-state training examples (images or series) per second: `--steps` steps timed after the
  first step and `--warmup` more;
- the first step's time (JAX compiles the step there, cold: no persistent cache) and the start-up
  time, from launching the process to the first step done (imports, data, model, first step);
- peak memory: the worker process's maximum resident set size;
- time to a target test accuracy: training wall time from the first step (compilation included)
  to the end of the first epoch whose test accuracy reaches the target; the tests themselves are
  timed apart and not included.

Machines here are shared and noisy, so both contenders run in this one invocation, one worker
process per measurement and never two at once, alternating cnnlab, torch, torch, cnnlab, ...
(ABBA, so that a drift in the machine's load hits both alike), every worker pinned to the same
CPUs with the same thread count; the report gives medians and the ratio cnnlab / PyTorch.

`--against REV` measures cnnlab before and after a change instead: the second contender is the
cnnlab worker of commit REV, run from that commit's files (`git archive`, in a temporary folder)
with this environment's packages, alternating with this working tree's in the same way. REV must
have this bench's worker protocol (its `experiments/bench_workers/`, from commit d77f683 on).
`--against-env NAME=VALUE` measures a setting instead: the second contender is this tree's cnnlab
worker with the environment variable NAME set to VALUE (e.g. CNNLAB_CONV=xla, XLA's own
convolutions against oneDNN's).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cnnlab.config import DataConfig, ModelConfig, OptimizerConfig
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError, ConfigError
from experiments.bench_report import CONTENDERS, METRICS, PAIR, summarize, table
from experiments.hydra_conf import (
    compose_config,
    conf_dir,
    entry_point,
    exit_on_user_error,
    to_config,
)

REPO = Path(__file__).resolve().parents[1]
WORKERS = {  # contender -> the module that measures it
    "cnnlab": "experiments.bench_workers.cnnlab_worker",
    "torch": "experiments.bench_workers.torch_worker",
    "before": "experiments.bench_workers.cnnlab_worker",  # run from the --against commit's files
    "env": "experiments.bench_workers.cnnlab_worker",  # with --against-env's variable set
}


class WorkerError(CnnlabError):
    """A worker process failed: its stderr is shown above the one-line message."""


NO_TORCH = (
    "PyTorch is not installed, and cnnlab-bench compares against it: "
    "pip install 'cnnlab[bench]' (or pip install torch==2.13.0)"
)


@dataclass(frozen=True)
class Task:
    title: str
    model: str  # conf/model preset
    data: tuple[str, ...]  # cnnlab-train's overrides that pick the data: the preset first
    batch_size: int
    steps: int  # default timed steps: 10-20 s of training per worker on 2 cores
    warmup: int  # default untimed steps after the first
    target: float  # default target test accuracy
    target_epochs: int  # default epoch budget, the learning-rate schedule's length
    target_rounds: int  # default time-to-target runs per contender (minutes each)


TASKS = {
    "lenet5_fmnist": Task(
        "LeNet-5 on Fashion-MNIST", "lenet5", ("data=fashion_mnist",), batch_size=128,
        steps=300, warmup=20, target=0.90, target_epochs=12, target_rounds=1,
    ),  # 12 epochs: the lenet5_fashion_mnist experiment, 90.66% test accuracy
    "alexnet_cifar10": Task(
        "AlexNet-lite on CIFAR-10", "alexnet_lite", ("data=cifar10",), batch_size=128,
        steps=40, warmup=5, target=0.60, target_epochs=3, target_rounds=0,
    ),  # 3 epochs gave 60.88% in 650 s with cnnlab alone, so time to target is opt-in
    # OSULeaf (427 steps) rather than a shorter set, so that a step is real work: 1.8 billion
    # multiply-adds forward for a batch of 16. All 200 training series (no hold-out, as Wang et
    # al.), in FCN's batch of min(16, N/10) = 16: 12 steps an epoch. 60 epochs of this schedule
    # gave cnnlab 97.1% test accuracy (Wang et al.: 98.8% after 2000).
    "fcn_osuleaf": Task(
        "FCN on OSULeaf", "fcn", ("data=ucr", "data.name=OSULeaf", "data.val_fraction=0"),
        batch_size=16, steps=100, warmup=5, target=0.90, target_epochs=60, target_rounds=1,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Other:
    """The second cnnlab, in PyTorch's place: `--against REV`'s or `--against-env`'s."""

    contender: str  # "before" (another commit's files) or "env" (a variable set)
    label: str  # its column in the table
    folder: Path | None = None  # "before": the commit's files, whose worker runs
    variable: tuple[str, str] | None = None  # "env": (NAME, VALUE) set in its environment


OPTIMIZER = "adamw"  # cnnlab's default conf/optimizer preset; both contenders implement it
EVAL_BATCH_SIZE = 1000
SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cnnlab-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=[*TASKS, "all"], default="lenet5_fmnist")
    p.add_argument("--rounds", type=int, default=3, help="throughput runs per contender (3)")
    p.add_argument(
        "--steps", type=int, help="timed steps per throughput run (per task: 300, 40, 100)"
    )
    p.add_argument("--warmup", type=int, help="untimed steps after the first (per task: 20, 5, 5)")
    p.add_argument(
        "--target", type=float, help="test accuracy to reach (per task: 0.90, 0.60, 0.90)"
    )
    p.add_argument("--target-epochs", type=int, help="epoch budget and schedule length (12, 3, 60)")
    p.add_argument(
        "--target-rounds", type=int,
        help="time-to-target runs per contender (per task: 1, 0 for AlexNet-lite, 1)",
    )  # fmt: skip
    p.add_argument("--no-target", action="store_true", help="skip time to target")
    against = p.add_mutually_exclusive_group()
    against.add_argument(
        "--against", metavar="REV", help="compare with cnnlab at commit REV, not PyTorch"
    )
    against.add_argument(
        "--against-env", metavar="NAME=VALUE",
        help="compare with cnnlab run with the environment variable NAME=VALUE, not PyTorch",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="pin both to the first N CPUs (default: all)")
    p.add_argument("--out", type=Path, help="results JSON (default outputs/bench/<time>.json)")
    p.add_argument("--cifar10", default="../shared/data/cifar10-jpeg.zip",
                   help="the CIFAR-10 image folder or .zip (default %(default)s)")  # fmt: skip
    p.add_argument("--train-limit", type=int, help="first N training images only (smoke tests)")
    p.add_argument("--test-limit", type=int, help="first N test images only (smoke tests)")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "target_epochs", "threads", "train_limit", "test_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "target_rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.against_env is not None and not re.fullmatch(r"[A-Za-z_]\w*=.*", args.against_env):
        p.error(f"--against-env {args.against_env}: give NAME=VALUE, e.g. CNNLAB_CONV=xla")
    if args.target is not None and not 0 <= args.target <= 1:
        p.error(f"--target {args.target} is an accuracy: give a value between 0 and 1")
    return args


def pick_cpus(threads: int | None) -> list[int]:
    """The CPUs both contenders are pinned to: the first `threads` this process may use."""
    available = sorted(os.sched_getaffinity(0))
    if threads is not None and threads > len(available):
        raise ConfigError(
            f"--threads {threads}: this process may use only {len(available)} CPUs "
            f"({','.join(map(str, available))}); give at most {len(available)}"
        )
    return available[: threads or len(available)]


def preset(group: str, name: str, schema):
    """A conf/ YAML preset as its config dataclass, the values `cnnlab-train group=name` uses."""
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def data_config(task: Task, args: argparse.Namespace) -> DataConfig:
    """The task's data as `cnnlab-train <task.data>` composes it (a data preset may be global,
    as conf/data/ucr.yaml is), with the command line's CIFAR-10 copy and limits."""
    cfg = to_config(compose_config(list(task.data))).data
    if cfg.name == "cifar10":
        if not Path(args.cifar10).exists():
            raise ConfigError(
                f"--cifar10 {args.cifar10} does not exist: give the CIFAR-10 image folder or "
                ".zip, e.g. --cifar10 ../shared/data/cifar10-jpeg.zip"
            )
        cfg = replace(cfg, path=args.cifar10)
    return replace(cfg, train_limit=args.train_limit, test_limit=args.test_limit)


def plan(rounds: int, target_rounds: int, pair: tuple[str, str] = PAIR) -> list[tuple[str, str]]:
    """(mode, contender) in run order: pairs alternate which contender goes first (ABBA...)."""
    modes = ["throughput"] * rounds + ["target"] * target_rounds
    pairs = [pair if k % 2 == 0 else pair[::-1] for k in range(len(modes))]
    return [(mode, c) for mode, ab in zip(modes, pairs, strict=True) for c in ab]


def git(*cmd: str) -> str:
    """A git command's output in this repository, or "" where git fails."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@contextlib.contextmanager
def checkout(rev: str):
    """(full commit, folder): the files of commit `rev`, in a temporary folder while in use."""
    commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not commit:
        raise ConfigError(f"--against {rev}: not a commit of {REPO}")
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-before-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True, timeout=120)
        if not (Path(tmp) / WORKERS["before"].replace(".", "/")).with_suffix(".py").is_file():
            raise ConfigError(f"--against {rev}: that commit has no cnnlab bench worker")
        yield commit, Path(tmp)


def write_data(data, folder: Path) -> None:
    """The splits as .npy files, which both kinds of worker read the same way."""
    if data.train.lengths is not None or data.test.lengths is not None:
        raise ValueError(f"{data.name}: the bench's workers take series of one length only")
    arrays = {
        "train_images": data.train.images, "train_labels": data.train.labels,
        "test_images": data.test.images, "test_labels": data.test.labels,
        "mean": data.mean, "std": data.std,
    }  # fmt: skip
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)


def run_worker(
    contender: str, spec: dict, cpus: list[int], folder: Path, k: int, other: Other | None = None
) -> dict:
    """One measurement in a fresh process pinned to `cpus` before it starts; the `other`
    contender's process runs the files in its folder, or with its variable set."""
    threads = str(len(cpus))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.update(OPENBLAS_NUM_THREADS=threads, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    before = other.folder if other and contender == "before" else None
    if before:  # its cnnlab and experiments packages come first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(before), env.get("PYTHONPATH")]))
    if other and other.variable and contender == "env":
        env[other.variable[0]] = other.variable[1]
    result = folder / f"run{k}-{spec['mode']}-{contender}.json"
    load = os.getloadavg()[0]  # other processes competing for the CPUs, for the record
    spec = dict(spec, threads=len(cpus), result=str(result), launched_at=time.time())
    done = subprocess.run(
        [sys.executable, "-m", WORKERS[contender], json.dumps(spec)],
        env=env, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        cwd=before,
    )  # fmt: skip
    if done.returncode != 0 or not result.is_file():
        sys.stderr.write(done.stderr[-4000:])
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise WorkerError(
            f"the {contender} worker ({spec['task']}, {spec['mode']}) failed with exit code "
            f"{done.returncode}: {last}"
        )
    return {**json.loads(result.read_text()), "contender": contender, "load_average": load}


def bench_task(
    name: str, task: Task, args: argparse.Namespace, cpus: list[int], other: Other | None = None
) -> dict:
    """Every run of one task, in ABBA order, with medians and ratios; against PyTorch, or the
    `other` cnnlab (`Other`: another commit's files, or an environment variable set)."""
    pair = ("cnnlab", other.contender) if other else PAIR
    data_cfg = data_config(task, args)
    print(f"{name}: loading {data_cfg.name} ...", flush=True)
    data = load_dataset(data_cfg)
    if len(data.train) < task.batch_size:
        raise ConfigError(
            f"--train-limit {args.train_limit} is below {name}'s batch size {task.batch_size}"
        )
    target_rounds = 0 if args.no_target else _given(args.target_rounds, task.target_rounds)
    settings = {
        "title": task.title, "model": asdict(preset("model", task.model, ModelConfig)),
        "optimizer": asdict(preset("optimizer", OPTIMIZER, OptimizerConfig)),
        "augment": asdict(data_cfg.augment), "batch_size": task.batch_size,
        "eval_batch_size": EVAL_BATCH_SIZE, "seed": SEED,
        # series [N, L, C] or images [N, H, W, C]: what the counts and speeds are of
        "unit": "series" if data.train.images.ndim == 3 else "images",
        "train_images": len(data.train), "test_images": len(data.test),
        "steps": _given(args.steps, task.steps), "warmup": _given(args.warmup, task.warmup),
        "target": _given(args.target, task.target),
        "epochs": _given(args.target_epochs, task.target_epochs),
        "rounds": args.rounds, "target_rounds": target_rounds,
    }  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
        write_data(data, Path(tmp))
        del data
        shared = ("model", "optimizer", "augment", "batch_size", "eval_batch_size", "seed")
        shared += ("epochs", "warmup", "steps", "target")
        spec = {k: settings[k] for k in shared} | {"task": name, "data_dir": tmp}
        order = plan(args.rounds, target_rounds, pair)
        for k, (mode, contender) in enumerate(order, start=1):
            run = run_worker(contender, dict(spec, mode=mode), cpus, Path(tmp), k, other)
            run["order"] = k
            runs.append(run)
            print(f"{name} {k}/{len(order)} {_progress(run, settings['unit'])}", flush=True)
    return {"settings": settings, "runs": runs, **summarize(runs, pair)}


def _given(value, default):
    return default if value is None else value


def _progress(run: dict, unit: str) -> str:
    line = f"{run['mode']:<10} {run['contender']:<6} (load {run['load_average']:.1f})"
    if run["mode"] == "throughput":
        return (
            f"{line} {run['images_per_second']:8,.0f} {unit}/s, first step "
            f"{run['first_step_seconds']:.2f} s, start-up {run['startup_seconds']:.2f} s, "
            f"{run['peak_rss_mb']:,.0f} MB"
        )
    epochs = len(run["history"])
    if run["time_to_target_seconds"] is None:
        return f"{line} {run['test_accuracy']:.2%} after {epochs} epochs: target not reached"
    return (
        f"{line} {run['test_accuracy']:.2%} after {epochs} epochs, "
        f"{run['time_to_target_seconds']:.1f} s of training"
    )


def provenance(argv: list[str], cpus: list[int]) -> dict:
    """What produced the numbers: command, commit, machine, versions and the thread pinning."""
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown",
    )  # fmt: skip
    packages = ("jax", "jaxlib", "flax", "optax", "torch", "numpy")
    return {
        "command": shlex.join(["cnnlab-bench", *argv]),
        "commit": git("rev-parse", "HEAD") or None,
        "uncommitted_changes": bool(git("status", "--porcelain")),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model,
            "cpus_online": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "versions": {"python": sys.version.split()[0], **{p: _version(p) for p in packages}},
        "pinning": {
            "cpus": cpus,
            "threads": len(cpus),
            "how": "every worker starts with sched_setaffinity to these CPUs (set by the parent "
            "before exec) and OMP/MKL/OPENBLAS_NUM_THREADS=threads; PyTorch: "
            "torch.set_num_threads(threads); JAX: XLA's CPU thread pool sizes itself from the "
            "affinity; JAX_PLATFORMS=cpu",
        },
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@entry_point
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if (args.against, args.against_env) == (None, None) and not importlib.util.find_spec("torch"):
        exit_on_user_error(NO_TORCH)
    started = time.perf_counter()
    out = args.out or Path("outputs/bench") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    try:
        cpus = pick_cpus(args.threads)
        report = {**provenance(argv, cpus), "metrics": METRICS, "tasks": {}}
        with contextlib.ExitStack() as stack:
            labels, other = dict(CONTENDERS), None
            if args.against is not None:
                commit, folder = stack.enter_context(checkout(args.against))
                report["against"] = {"rev": args.against, "commit": commit}
                other = Other("before", f"cnnlab at {commit[:7]}", folder=folder)
            elif args.against_env is not None:
                variable, value = args.against_env.split("=", 1)
                report["against_env"] = {variable: value}
                other = Other("env", f"cnnlab {args.against_env}", variable=(variable, value))
            if other:
                labels[other.contender] = other.label
            print(f"cnnlab-bench: both pinned to CPUs {cpus}, {len(cpus)} threads", flush=True)
            for name in list(TASKS) if args.task == "all" else [args.task]:
                report["tasks"][name] = bench_task(name, TASKS[name], args, cpus, other)
                report["wall_seconds"] = round(time.perf_counter() - started, 1)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2) + "\n")
                print("\n" + table(name, report["tasks"][name], cpus, labels) + "\n", flush=True)
    except WorkerError as e:
        exit_on_user_error(e, 1)
    except CnnlabError as e:
        exit_on_user_error(e)
    except KeyboardInterrupt:
        exit_on_user_error("interrupted", 130)
    print(f"results: {out} ({report['wall_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
