"""Hydra callbacks around a multirun: the pre-flight before any job starts, the report after.

Registered in conf/config.yaml under `hydra.callbacks`.
"""

from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cnnlab.config import LoggerConfig
from experiments.hydra_conf import ContinuousSweep, exit_on_user_error, expand, sweep_group
from experiments.preflight import check, report


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Check every point, write preflight.txt, and refuse to start if asked to."""
        loader = GlobalHydra.instance().config_loader()

        def job_config(overrides: list[str]) -> DictConfig:
            node = loader.load_sweep_config(config, overrides)
            with read_write(node), open_dict(node):
                node.pop("hydra")
            return node

        params = dict(config.hydra.sweeper.get("params") or {})
        # Hydra turns a callback's exceptions into warnings; only an exit stops the sweep.
        try:
            jobs = expand(list(config.hydra.overrides.task), params)
        except ContinuousSweep as e:  # e.g. Optuna: every job validates itself when it starts
            print(f"cnnlab: pre-flight skipped: {e}")
            return
        except ValueError as e:  # e.g. range(1,5,0), from a sweep preset's params
            exit_on_user_error(e)
        points = check(jobs, job_config)
        sweep_dir = Path(config.hydra.sweep.dir)
        text = report(points)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / "preflight.txt").write_text(text + "\n")
        except OSError as e:
            exit_on_user_error(
                f"cannot write the sweep directory {sweep_dir}: {e.strerror or e}; choose a "
                "writable folder with hydra.sweep.dir=..."
            )
        invalid = [p for p in points if p.error]
        print(f"cnnlab: pre-flight: {text.splitlines()[-1]} (details: {sweep_dir}/preflight.txt)")
        for point in invalid:
            print(f"cnnlab: invalid: {point.label}: {point.error}")
        if invalid and config.sweep.on_invalid == "refuse":
            exit_on_user_error(
                f"{len(invalid)} of {len(points)} sweep points are invalid and "
                "sweep.on_invalid=refuse; fix them or use sweep.on_invalid=skip"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """The sweep report (summary.csv/.md, plots, report.html), also to W&B when it is on."""
        from cnnlab.report import write_report  # matplotlib: loaded only when a sweep ends
        from cnnlab.tracking.wandb_run import WandbTracker

        sweep_dir = Path(config.hydra.sweep.dir)
        logger = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(LoggerConfig), config.logger)
        )
        tracker = None
        if logger.mode != "disabled":
            logger.group = logger.group or sweep_group(sweep_dir)
            name = f"{logger.group}/report"
            tracker = WandbTracker(logger, sweep_dir, {"sweep_dir": str(sweep_dir)}, name)
        try:
            paths = write_report(sweep_dir, tracker.run if tracker else None)
        finally:
            if tracker is not None:
                tracker.finish({"status": "ok"})
        print(f"cnnlab: sweep report: {paths['html']} (summary.csv, summary.md, plots beside it)")
