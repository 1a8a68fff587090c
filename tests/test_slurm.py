"""A real sweep on SLURM: `cnnlab-train -m hydra/launcher=slurm` submits its jobs to a running
cluster (CI starts a one-node one with `.ci/slurm-cluster start` and sets SLURM_CONF), waits for
them, and each job's run directory, the submitit logs and Hydra's job ids show that the training
ran inside a SLURM job.

Where no cluster answers (`sinfo` missing or failing) the test is skipped; with
CNNLAB_SLURM_REQUIRED=1 (CI) it fails instead, so a cluster that did not come up cannot hide.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli, needs_fashion_mnist

pytestmark = pytest.mark.slurm

SWEEP_TIMEOUT_S = 240  # two LeNet-5 jobs of a few seconds each, plus JAX's start-up in each job
READY_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


def why_no_slurm() -> str | None:
    """Why this machine cannot run a SLURM sweep, or None when it can."""
    try:
        plugin = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher")
    except ModuleNotFoundError:
        plugin = None
    if plugin is None:
        return "hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)"
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no SLURM here (no sinfo); start a test cluster with `.ci/slurm-cluster start`"
    hint = "" if os.environ.get("SLURM_CONF") else " (SLURM_CONF is not set)"
    # `scontrol ping` answers at once when the controller is down; sinfo retries for 10 s
    for command in (["scontrol", "ping"], ["sinfo", "-h", "-o", "%t"]):
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"no SLURM cluster answers{hint}: {' '.join(command)} timed out"
        if answer.returncode != 0:
            output = f"{answer.stdout}\n{answer.stderr}".strip().splitlines()
            first = (output or ["no output"])[0].strip()
            return f"no SLURM cluster answers{hint}: {' '.join(command)}: {first}"
    states = answer.stdout.split()
    if not READY_STATES & set(states):
        return f"no SLURM node is up (sinfo states: {' '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    reason = why_no_slurm()
    if reason is None:
        return
    if os.environ.get("CNNLAB_SLURM_REQUIRED") == "1":
        pytest.fail(f"CNNLAB_SLURM_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def slurm_report(sweep: Path, name: str) -> str:
    """The queue and the jobs' logs, for a failure message."""
    queue = subprocess.run(["squeue", "--name", name], capture_output=True, text=True).stdout
    logs = [
        f"--- {log}\n{log.read_text()[-1500:]}" for log in sorted(sweep.glob(".submitit/*/*_log.*"))
    ]
    return f"squeue:\n{queue}\n" + "\n".join(logs)


@needs_fashion_mnist
def test_sweep_runs_each_point_as_a_slurm_job(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    name = f"cnnlab-test-{os.getpid()}-{time.time_ns() % 10**6}"  # to find (or cancel) our jobs
    args = [
        "train", "-m", "hydra/launcher=slurm", "model.depth=3,6", "logger.pictures=false",
        "data.train_limit=600", "data.test_limit=300", "train.epochs=1", "train.batch_size=64",
        "logger.mode=offline", f"hydra.sweep.dir={sweep}",
        # both jobs at once on a 2-core node, each in a small allocation, and a job name to find
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=5", f"hydra.launcher.name={name}",
    ]  # fmt: skip
    start = time.monotonic()
    try:
        done = cli(*args, timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report = slurm_report(sweep, name)
        subprocess.run(["scancel", "--name", name], capture_output=True)
        pytest.fail(f"the sweep did not finish in {SWEEP_TIMEOUT_S} s\n{report}")
    seconds = time.monotonic() - start
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{slurm_report(sweep, name)}"

    # The submitting side: Hydra submitted one job array through sbatch with our resources.
    # submitit's folders: <array id>/ with the sbatch script, <array id>_<index>/ for each job
    folders = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir())
    array = folders[0]
    job_ids = [f"{array}_0", f"{array}_1"]
    assert folders == [array, *job_ids], folders
    script = (sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    for line in (
        f"#SBATCH --job-name={name}",
        "#SBATCH --array=0-1%2",  # array_parallelism (16), at most the number of jobs
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=2GB",
        "#SBATCH --time=5",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script.splitlines(), f"{line!r} not in\n{script}"

    for num, (depth, job_id) in enumerate(zip((3, 6), job_ids, strict=True)):
        run_dir = sweep / str(num)
        # Each point trained to the end in its own run directory ...
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "ok", summary.get("error")
        assert 0 < summary["test/accuracy"] <= 1
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["depth"] == depth
        # ... inside SLURM job <array>_<num>: the submitit launcher gives Hydra the job id it
        # reads from SLURM's environment (SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID); the basic
        # launcher would have written "job_id_for_<num>".
        hydra_job = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]
        assert hydra_job["id"] == job_id and hydra_job["num"] == num
        # SLURM's output files of the job (srun's --output and --error): submitit's own log
        # names the job and the node, then the training's lines follow
        folder = sweep / ".submitit" / job_id
        log = "".join((folder / f"{job_id}_0_log.{x}").read_text() for x in ("out", "err"))
        assert re.search(rf"Starting with JobEnvironment\(job_id={job_id}, hostname=\S+", log), log
        assert f"cnnlab: ok: test accuracy {summary['test/accuracy']:.4f}" in log, log
        assert "Job completed successfully" in log, log
        assert (folder / f"{job_id}_0_result.pkl").is_file()

    # The jobs leave the queue: submitit returns as soon as the results are written, while each
    # job's Python and srun are still exiting.
    deadline = time.monotonic() + 60
    while True:
        queue = subprocess.run(
            ["squeue", "-h", "--name", name, "-o", "%i %t"], capture_output=True, text=True
        )
        assert queue.returncode == 0, queue.stderr
        if not queue.stdout.strip() or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert queue.stdout.strip() == "", f"jobs still queued a minute later:\n{queue.stdout}"
    print(f"SLURM sweep of 2 jobs: {seconds:.0f} s")


def _job_state(name: str) -> tuple[str, str] | None:
    """(job id, state) of our job in the queue, or None once it has left it."""
    queue = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i %t"], capture_output=True, text=True
    ).stdout.split()
    return (queue[0], queue[1]) if queue else None


@needs_fashion_mnist
def test_a_requeued_job_resumes_in_its_run_directory_and_w_and_b_run(slurm_cluster, tmp_path):
    """SLURM's warning signal before the time limit (USR2, submitit's) makes the job save a
    checkpoint and requeue itself; the requeued job resumes in the same run directory and the
    same W&B run, and no step is logged twice or lost."""
    sweep = tmp_path / "sweep"
    name = f"cnnlab-requeue-{os.getpid()}-{time.time_ns() % 10**6}"
    args = [
        "train", "-m", "hydra/launcher=slurm", "logger.pictures=false", "data.train_limit=12000",
        "data.test_limit=300",
        "train.epochs=2", "train.batch_size=16", "train.log_every_steps=10",
        "checkpoint.every_steps=5000", "logger.mode=offline", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4",
        "hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=2",
        f"hydra.launcher.name={name}",
    ]  # fmt: skip
    sweeping = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *args[1:]], cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run_dir = sweep / "0"
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        # early in the first epoch (750 steps, some 5 s here): the signal must come before its
        # end, or the epoch end's checkpoint would be the one the requeued job resumes from
        while _logged_steps(run_dir)[-1:] < [30]:
            assert time.monotonic() < deadline, slurm_report(sweep, name)
            time.sleep(0.1)
        job, _ = _job_state(name)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        # SLURM holds a requeued job back for a while (BeginTime); an operator may start it now
        while (state := _job_state(name)) is None or state[1] != "PD":
            assert time.monotonic() < deadline, slurm_report(sweep, name)
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        out, _ = sweeping.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if sweeping.poll() is None:
            sweeping.kill()
            subprocess.run(["scancel", "--name", name], capture_output=True)
    assert sweeping.returncode == 0, f"{out[-3000:]}\n{slurm_report(sweep, name)}"

    # the requeued attempt's log (it replaces the first one's): it went on from the step where
    # the signal came, whose checkpoint only the signal wrote (none is due every 5000 steps, and
    # the epochs end at steps 750 and 1500)
    log = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    resumed = re.search(r"cnnlab: resuming from step (\d+) ", log)
    assert resumed, log
    step = int(resumed.group(1))
    assert step >= 30 and step not in (750, 1500), step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from_step"] == step
    # metrics.jsonl: every train record once, in order; the same steps went to W&B
    steps = _logged_steps(run_dir)
    total = summary["steps"]  # 2 epochs
    assert steps == sorted(set(range(10, total + 1, 10)) | {total // 2, total}), steps
    from tests.wandb_records import run_record, summary_and_history

    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders  # one per attempt, the same W&B run
    files = [next(folder.glob("run-*.wandb")) for folder in folders]
    assert len({run_record(f).run_id for f in files}) == 1
    rows = [row for f in files for row in summary_and_history(f)[1] if "train/loss" in row]
    assert [row["_step"] for row in rows] == steps


def _logged_steps(run_dir: Path) -> list[int]:
    """The steps of the train records in a run's metrics.jsonl so far."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in lines if line.endswith("}")]
    return [r["step"] for r in records if "train/loss" in r]
