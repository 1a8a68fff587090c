"""Weights & Biases tracking that never blocks training.

`logger.mode` (`cnnlab.config.LoggerMode`) is one of wandb's own modes. `online` falls back to
an offline run, with one warning, when there is no API key, or the server does not answer an HTTP
request within 8 s (`PROBE_SECONDS`; a closed port or a 5xx status fails at once, a port that
accepts and never replies after 8 s), or wandb.init then fails within `logger.init_timeout`
seconds (alone it would block for about 100 s, then crash). An offline run lives in
`<run_dir>/wandb/offline-run-*` and uploads later with `wandb sync <that folder>`. Every run is
finished, on every path, so each Hydra multirun job is its own W&B run.

A run directory used again (an exact resume, a SLURM requeue) continues the same W&B run:
`<run_dir>/wandb_run.json` keeps the run's id, its mode and the last step logged (never a
credential), and is replaced atomically after every log. A later attempt calls wandb.init with
that id and `resume="allow"` and drops records at steps up to that last step: the resumed attempt
recomputes them bit-identically, and W&B would refuse steps below the run's current one anyway.
(A step whose records were only partly logged when an attempt died keeps only that part.)

Offline, wandb 0.31 gives each attempt its own `offline-run-<time>-<id>` folder with the same run
id (`-1` appended to the name if two start in the same second); the later folders' run records
are marked as resumed (`resume`; `resumed` stays false offline). `wandb sync
<run_dir>/wandb/offline-run-*` uploads the folders of one id one after another, in order of
start time, into that one run (its `--help`), so the steps arrive once each, in order. To keep
that order, an attempt whose predecessor logged offline stays offline even if W&B is reachable
again: an online run first would take the later steps and W&B would then refuse the earlier ones
from the offline folders.
"""

import json
import netrc
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from cnnlab.config import LoggerConfig
from cnnlab.geometry import Layer
from cnnlab.tracking.local import write_json

# At most this long to learn whether the W&B server answers: with wandb.init's own start and
# the offline fallback, training then starts well within 15 s of its normal start.
PROBE_SECONDS = 8.0
STATE_FILE = "wandb_run.json"  # the W&B run id and last step logged, for a later attempt


def _warn(message: str) -> None:
    print(f"cnnlab: warning: {message}", file=sys.stderr)


def _drop_empty_settings() -> None:
    """Treat an empty WANDB_* variable (`WANDB_MODE= cnnlab-train ...`) as unset, as a shell user
    means it: wandb would reject it as an invalid setting, with a long traceback."""
    for name in [k for k, v in os.environ.items() if k.startswith("WANDB_") and not v]:
        del os.environ[name]


def _base_url() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def has_api_key(base_url: str) -> bool:
    """An API key in the environment, or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        path = os.environ.get("NETRC") or Path.home() / ".netrc"
        return netrc.netrc(path).authenticators(urlparse(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(base_url: str, timeout: float) -> bool:
    """Whether the server answers an HTTP request within `timeout` seconds, DNS included, with
    a status below 500. Not a closed port, nor one that accepts connections and never replies,
    nor a server failing with 5xx (an outage behind a load balancer): with those wandb.init
    would retry for all of `logger.init_timeout`."""
    import urllib.error
    import urllib.request

    ok = threading.Event()

    def probe():
        try:
            urllib.request.urlopen(base_url, timeout=timeout).close()
            ok.set()
        except urllib.error.HTTPError as e:  # an answer all the same (401, 404, ...)
            if e.code < 500:
                ok.set()
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return ok.is_set()


class WandbTracker:
    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str, concurrent: bool = False
    ):
        """`concurrent`: other runs of this process stay open beside this one (the seeds of a
        vmapped program); otherwise a run still open is finished first."""
        _drop_empty_settings()
        import wandb

        self.wandb = wandb
        self.num_samples = cfg.num_sample_predictions
        self.state_path = Path(run_dir) / STATE_FILE
        earlier = json.loads(self.state_path.read_text()) if self.state_path.is_file() else None
        # steps up to this one were logged by an earlier attempt of this run: skipped (-1: none)
        self.resumed_step = earlier["last_step"] if earlier else -1
        mode = cfg.mode
        if mode == "online" and earlier and earlier["mode"] == "offline":
            _warn(
                "an earlier attempt of this run logged to W&B offline; continuing offline so that "
                f"`wandb sync {run_dir}/wandb/offline-run-*` uploads the attempts in order"
            )
            mode = "offline"
        if mode == "online":
            base = _base_url()
            if not has_api_key(base):
                _warn(
                    "no W&B API key (set WANDB_API_KEY or run `wandb login`); logging offline, "
                    "upload later with `wandb sync <run dir>/wandb/offline-run-*`"
                )
                mode = "offline"
            elif not reachable(base, min(cfg.init_timeout, PROBE_SECONDS)):
                _warn(f"W&B server {base} is unreachable; logging offline")
                mode = "offline"
        init = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=name,
            config=config,
            dir=str(run_dir),
            reinit="create_new" if concurrent else "finish_previous",
            settings=wandb.Settings(init_timeout=cfg.init_timeout),
        )
        if earlier:
            init.update(id=earlier["id"], resume="allow")
        try:
            self.run = self._init(mode, init)
        except Exception as e:  # wandb raises several types on network failures
            if mode != "online":
                raise
            _warn(f"W&B did not start online ({type(e).__name__}: {e}); logging offline")
            mode = "offline"
            self.run = self._init(mode, init)
        self.state = {"id": self.run.id, "mode": mode, "last_step": self.resumed_step}
        write_json(self.state_path, self.state)

    def _init(self, mode: str, init: dict):
        if mode == "offline":
            # Process-wide offline too: wandb's own usage analytics follow the global mode, not
            # the run's, and would post to the server anyway, delaying the exit of a process by
            # 10 s or more when the server accepts connections but never answers.
            self.wandb.setup(self.wandb.Settings(mode="offline"))
        return self.wandb.init(mode=mode, **init)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.resumed_step:
            return
        self.run.log(metrics, step=step)
        if step > self.state["last_step"]:
            self.state["last_step"] = step
            write_json(self.state_path, self.state)

    def log_layers(self, rows: list[Layer]) -> None:
        columns = ["layer", "type", "output", "params", "mult_adds", "receptive_field"]
        data = [
            [r.name, f"{r.kind} {r.detail}".strip(), r.shape_text, r.params, r.macs,
             "all" if r.receptive_field is None else f"{r.receptive_field}x{r.receptive_field}"]
            for r in rows
        ]  # fmt: skip
        self.log({"model/layers": self.wandb.Table(columns=columns, data=data)}, step=0)

    def log_predictions(self, images, labels, probs, class_names) -> None:
        preds = np.argmax(probs, -1)
        names = list(class_names)
        chart = self.wandb.plot.confusion_matrix(
            y_true=labels.tolist(), preds=preds.tolist(), class_names=names
        )
        picks = np.linspace(0, len(labels) - 1, min(self.num_samples, len(labels))).astype(int)
        series = images.ndim == 3  # [N, L, C]: no image to show, the rest of each row is kept
        columns = ["label", "prediction", "confidence", "correct"]
        table = self.wandb.Table(columns=columns if series else ["image", *columns])
        for i in picks:
            row = [names[labels[i]], names[preds[i]], float(probs[i, preds[i]]),
                   bool(preds[i] == labels[i])]  # fmt: skip
            if not series:
                image = images[i][..., 0] if images.shape[-1] == 1 else images[i]  # [H, W(, C)]
                row.insert(0, self.wandb.Image(image))
            table.add_data(*row)
        self.run.log({"test/confusion_matrix": chart, "test/predictions": table})

    def log_pictures(self, paths: dict[str, Path]) -> None:
        """One image panel per picture, `pictures/<name>`, in the run's media."""
        self.run.log(
            {f"pictures/{name}": self.wandb.Image(str(path)) for name, path in paths.items()}
        )

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary.get("status") == "ok" else 1)
