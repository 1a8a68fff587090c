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
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli, needs_fashion_mnist

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
        "train", "-m", "hydra/launcher=slurm", "model.depth=3,6",
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
