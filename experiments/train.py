"""`cnnlab-train [overrides]`: train one configuration, or a sweep with `-m`.

Each job writes its run directory (Hydra's `hydra.run.dir`, or `hydra.sweep.dir/<job number>`):
config.yaml, dataset.json, layers.txt, metrics.jsonl, confusion_matrix.csv, summary.json,
checkpoint/ and, unless W&B is disabled, wandb/.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnlab.config import from_omegaconf
from cnnlab.errors import CnnlabError
from cnnlab.tracking import Trackers
from cnnlab.tracking.local import LocalTracker
from cnnlab.tracking.wandb_run import WandbTracker
from cnnlab.train.run import run
from cnnlab.validate import validate
from experiments.hydra_conf import (
    conf_dir,
    exit_on_user_error,
    hydra_errors_in_one_line,
    register_schema,
)


def train(node: DictConfig) -> float | None:
    """One Hydra job. Returns the validation accuracy (the objective for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = from_omegaconf(node)
        validate(cfg)  # before W&B starts: a bad value must not leave a W&B run behind
        config = OmegaConf.to_container(node, resolve=True)
        wandb = None
        if cfg.logger.mode != "disabled":
            name = str(run_dir.relative_to(run_dir.parents[1]))
            wandb = WandbTracker(cfg.logger, run_dir, config, name)
        summary = run(cfg, run_dir, Trackers(LocalTracker(run_dir), wandb))
    except CnnlabError as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # one bad point must not stop the sweep
            print(f"cnnlab: error in job {hydra_cfg.job.num}: {e}", file=sys.stderr)
            return None
        exit_on_user_error(e)
    if summary["status"] != "ok":
        print(f"cnnlab: {summary['status']}: {summary['error']} ({run_dir})", file=sys.stderr)
        if hydra_cfg.mode == RunMode.RUN:
            sys.exit(1)
        return None
    accuracy, seconds = summary["test/accuracy"], summary["wall_seconds"]
    print(f"cnnlab: ok: test accuracy {accuracy:.4f} in {seconds:.0f}s, run directory {run_dir}")
    return summary["val/best_accuracy"]


def main() -> None:
    register_schema()
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    hydra_errors_in_one_line(app(train))


if __name__ == "__main__":
    main()
