"""Weights & Biases tracking that never blocks training.

`logger.mode=online` falls back to an offline run, with one warning, when there is no API key or
the server does not answer within `logger.init_timeout` seconds (wandb.init alone would block for
about 100 s, then crash). An offline run lives in `<run_dir>/wandb/offline-run-*` and uploads
later with `wandb sync <that folder>`. Every run is finished, on every path, so each Hydra
multirun job is its own W&B run.
"""

import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from cnnlab.config import LoggerConfig
from cnnlab.geometry import Layer

MODES = ("online", "offline", "disabled")


def _warn(message: str) -> None:
    print(f"cnnlab: warning: {message}", file=sys.stderr)


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
    """Whether a TCP connection to the server opens within `timeout` seconds (DNS included)."""
    url = urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = threading.Event()

    def connect():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return ok.is_set()


class WandbTracker:
    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str, concurrent: bool = False
    ):
        """`concurrent`: other runs of this process stay open beside this one (the seeds of a
        vmapped program); otherwise a run still open is finished first."""
        import wandb

        self.wandb = wandb
        self.num_samples = cfg.num_sample_predictions
        mode = cfg.mode
        if mode == "online":
            base = _base_url()
            if not has_api_key(base):
                _warn(
                    "no W&B API key (set WANDB_API_KEY or run `wandb login`); logging offline, "
                    "upload later with `wandb sync <run dir>/wandb/offline-run-*`"
                )
                mode = "offline"
            elif not reachable(base, min(cfg.init_timeout, 10.0)):
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
        try:
            self.run = wandb.init(mode=mode, **init)
        except Exception as e:  # wandb raises several types on network failures
            if mode != "online":
                raise
            _warn(f"W&B did not start online ({type(e).__name__}: {e}); logging offline")
            self.run = wandb.init(mode="offline", **init)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_layers(self, rows: list[Layer]) -> None:
        columns = ["layer", "type", "output", "params", "mult_adds", "receptive_field"]
        data = [
            [r.name, f"{r.kind} {r.detail}".strip(), r.shape_text, r.params, r.macs,
             "all" if r.receptive_field is None else f"{r.receptive_field}x{r.receptive_field}"]
            for r in rows
        ]  # fmt: skip
        self.run.log({"model/layers": self.wandb.Table(columns=columns, data=data)}, step=0)

    def log_predictions(self, images, labels, probs, class_names) -> None:
        preds = np.argmax(probs, -1)
        names = list(class_names)
        chart = self.wandb.plot.confusion_matrix(
            y_true=labels.tolist(), preds=preds.tolist(), class_names=names
        )
        picks = np.linspace(0, len(labels) - 1, min(self.num_samples, len(labels))).astype(int)
        table = self.wandb.Table(columns=["image", "label", "prediction", "confidence", "correct"])
        for i in picks:
            image = images[i][..., 0] if images.shape[-1] == 1 else images[i]  # [H, W(, C)]
            table.add_data(
                self.wandb.Image(image), names[labels[i]], names[preds[i]],
                float(probs[i, preds[i]]), bool(preds[i] == labels[i]),
            )  # fmt: skip
        self.run.log({"test/confusion_matrix": chart, "test/predictions": table})

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary.get("status") == "ok" else 1)
