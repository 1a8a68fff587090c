"""`cnnlab-verify [NAME ...] [--tier quick|full] [key=value ...]`: reproduce the baselines.

The baselines are declared in experiments/baselines/<name>.yaml (cnnlab.baselines), one file per
experiment preset of the same name. Runs each baseline's tier with cnnlab-train, one model per
seed of its band, compares the mean test accuracy with the band and prints PASS or FAIL; exits 1
if any failed. No NAME: every baseline. key=value overrides go to every run; `--data
cifar10=PATH` gives the baselines on one dataset a local copy (data.path), e.g. the CIFAR-10 JPEG
zip.

Each tier trains in `<out>/<name>/<tier>/` (default outputs/verify/): run again, it resumes an
interrupted tier from its checkpoints and reuses a finished one of the same config; a tier whose
config changed is moved aside to `<tier>.<time>/` and trained afresh. A baseline whose data is not
on this machine (MNIST through TFDS, offline) is reported UNAVAILABLE and does not fail.

`--record` writes each result to experiments/results/<name>-<tier>.json, copies the first seed's
pictures to docs/baselines/<name>/ and regenerates the README's results table from every recorded
result (`--readme` does only the last).
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cnnlab import baselines
from cnnlab.baselines import Baseline, Result
from cnnlab.errors import CnnlabError, ConfigError, DataError
from experiments.hydra_conf import entry_point, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
BASELINES = Path(__file__).resolve().parent / "baselines"  # <name>.yaml: what each must reproduce
RESULTS = REPO / baselines.RECORDS
PICTURES = REPO / "docs" / "baselines"
README = REPO / "README.md"
TRAINED = "verify_trained.json"  # in a tier's folder: the commit and machine that trained it


def commit() -> str:
    """The checkout's commit (`-dirty` with uncommitted changes), else cnnlab's version."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"cnnlab {version('cnnlab')}"


def machine() -> str:
    """What trained: `cpu, 2 cores` or `gpu: NVIDIA H200`."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        from cnnlab.train.seeds import usable_cores

        return f"cpu, {len(usable_cores())} cores"
    return f"{backend}: {jax.devices()[0].device_kind}"


def compose(overrides: list[str]):
    """The `Config` that cnnlab-train composes from `overrides`."""
    from experiments.hydra_conf import compose_config, to_config

    return to_config(compose_config(overrides))


def saved_hash(run_dir: Path) -> str | None:
    """The config hash of the run that `run_dir` holds (its Hydra config), if any."""
    from omegaconf import OmegaConf

    from cnnlab.config import Config, config_hash
    from experiments.hydra_conf import to_config

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return config_hash(to_config(node))


def train(overrides: list[str]) -> tuple[int, str]:
    """cnnlab-train with `overrides`, its output passed through; (exit code, last stderr line)."""
    command = [sys.executable, "-m", "experiments.train", *overrides]
    process = subprocess.Popen(command, cwd=Path.cwd(), stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(process.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    code = process.wait()
    lines = [line for line in tail.decode(errors="replace").splitlines() if line.strip()]
    return code, (lines[-1] if lines else "")


def verify(
    baseline: Baseline, tier: str, out: Path, extra: list[str], paths: dict[str, str]
) -> Result:
    """Run (or reuse) one tier of one baseline and judge it; `paths` maps a dataset name to the
    local copy (data.path) that its baselines read."""
    from cnnlab.config import config_hash

    band = baseline.tiers[tier]
    run_dir = out / baseline.name / tier
    seeds = ",".join(map(str, band.seeds))
    overrides = [f"experiment={baseline.name}", f"seeds=[{seeds}]", *band.overrides, *extra]
    cfg = compose(overrides)
    if cfg.data.name in paths:
        overrides.append(f"data.path={paths[cfg.data.name]}")
        cfg = compose(overrides)
    result = Result(baseline.name, tier, "error", _band_json(band), run_dir=str(run_dir))
    wanted = config_hash(cfg)
    previous = saved_hash(run_dir)
    if previous is not None and previous != wanted:  # the preset or cnnlab's defaults changed
        aside = run_dir.with_name(f"{tier}.{time.strftime('%Y-%m-%d_%H-%M-%S')}")
        print(f"cnnlab-verify: {run_dir} holds another config; moved to {aside}", file=sys.stderr)
        run_dir.rename(aside)
    summary_path = run_dir / "summary.json"
    finished = summary_path.is_file() and json.loads(summary_path.read_text())["status"] == "ok"
    if finished:
        print(f"cnnlab-verify: {baseline.name} ({tier}) already finished in {run_dir}")
    else:
        trained = run_dir / TRAINED
        if not trained.is_file():  # a resumed tier keeps where it started
            run_dir.mkdir(parents=True, exist_ok=True)
            trained.write_text(json.dumps({"commit": commit(), "machine": machine()}) + "\n")
        code, last = train([*overrides, f"hydra.run.dir={run_dir}"])
        if code == DataError.exit_code:
            result.status, result.message = "unavailable", last.removeprefix("cnnlab: error: ")
            return result
        if code != 0 or not summary_path.is_file():
            result.message = f"cnnlab-train exited with {code}: {last}"
            return result
    return judged(result, band, run_dir)


def judged(result: Result, band: baselines.Band, run_dir: Path) -> Result:
    """`result` filled in from the finished tier in `run_dir` (its summary.json) and judged
    against `band`; the record is also written to `run_dir/verify.json`."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    if summary["status"] != "ok":
        result.message = f"{summary['status']}: {summary.get('error', '')}"
        return result
    accuracies = {
        int(seed): 100 * s["test/accuracy"]
        for seed, s in summary["per_seed"].items()
        if s["status"] == "ok"
    }
    result.status, result.mean, result.std = baselines.judge(band, accuracies)
    result.accuracies = {str(s): round(a, 3) for s, a in sorted(accuracies.items())}
    result.wall_seconds = round(summary["wall_seconds"], 1)
    result.date = datetime.datetime.fromtimestamp(
        summary_path.stat().st_mtime, datetime.timezone.utc
    ).isoformat(timespec="seconds")
    trained = run_dir / TRAINED  # absent for a tier trained by an older cnnlab-verify
    where = json.loads(trained.read_text()) if trained.is_file() else {}
    result.commit = where.get("commit") or commit()
    result.machine = where.get("machine") or machine()
    (run_dir / "verify.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _band_json(band: baselines.Band) -> dict:
    return {"mean": band.mean, "tol": band.tol, "seeds": list(band.seeds)}


def record(result: Result) -> None:
    """Keep a result in the repository: its JSON, and the first seed's pictures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result.baseline}-{result.tier}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    first = next(iter(result.accuracies), None)
    pictures = Path(result.run_dir) / f"seed_{first}" / "pictures"
    if result.tier == "full" and pictures.is_dir():
        target = PICTURES / result.baseline
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pictures, target)
    print(f"cnnlab-verify: recorded {path}")


def recorded() -> list[Result]:
    return [Result(**json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]


def write_readme(registry: dict[str, Baseline]) -> None:
    table = baselines.results_table(recorded(), registry)
    README.write_text(baselines.replace_table(README.read_text(), table))
    print(f"cnnlab-verify: wrote the results table of {README}")


def print_registry(registry: dict[str, Baseline]) -> None:
    """`cnnlab-verify --list`: each baseline's title, bands, compute and source."""
    for b in registry.values():
        print(f"{b.name}: {b.title}")
        print(f"  full:  {b.tiers['full']}\n  quick: {b.tiers['quick']}")
        print(f"  compute: {b.compute}\n  source: {b.source}")


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnlab-verify",
        description="Reproduce cnnlab's baselines and check them against their bands.",
    )
    parser.add_argument("args", nargs="*", help="baseline names and key=value overrides")
    parser.add_argument("--tier", choices=baselines.TIERS, default="quick")
    parser.add_argument("--out", type=Path, default=Path("outputs/verify"))
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a local copy of dataset NAME for the baselines that use it, "
        "e.g. cifar10=../shared/data/cifar10-jpeg.zip (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the baselines and stop")
    parser.add_argument("--record", action="store_true", help="record results and the README")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README table")
    args = parser.parse_intermixed_args(argv)  # names, overrides and options in any order
    try:
        registry = baselines.registry(BASELINES)
        names = [a for a in args.args if "=" not in a] or list(registry)
        paths = dict(item.split("=", 1) for item in args.data if "=" in item)
        if len(paths) != len(args.data):
            raise ConfigError(
                f"--data takes NAME=PATH, e.g. cifar10=/data/cifar10.zip: {args.data}"
            )
        extra = [a for a in args.args if "=" in a]
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ConfigError(
                f"no baseline {unknown[0]!r}; the baselines are: {', '.join(registry)}"
            )
        if args.list:
            print_registry(registry)
            return
        if args.readme:
            write_readme(registry)
            return
        results = []
        for name in names:
            results.append(verify(registry[name], args.tier, args.out, extra, paths))
            if args.record and results[-1].status in ("pass", "fail"):
                record(results[-1])
    except CnnlabError as e:
        exit_on_user_error(e)
    except KeyboardInterrupt:
        exit_on_user_error("interrupted; run the same command again to resume", 130)
    print()
    for result in results:
        print(baselines.describe(result))
    if args.record:
        write_readme(registry)
    if any(r.status in ("fail", "error") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
