"""The Hydra side shared by the entry points: the config folder, the schema, error reporting."""

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cnnlab.config import Config, closest_key
from cnnlab.errors import CnnlabError


def conf_dir() -> Path:
    """`conf/` of a source checkout (editable install), or the copy packaged beside this file."""
    for candidate in (Path(__file__).parent / "conf", Path(__file__).parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("cnnlab's conf/ folder is missing from the installation")


def register_schema() -> None:
    """Make the dataclass schema the base of conf/config.yaml (its `- schema` default)."""
    ConfigStore.instance().store(name="schema", node=Config)


def exit_on_user_error(error: CnnlabError | str, code: int = 2):
    """One line on stderr, no traceback, non-zero exit."""
    print(f"cnnlab: error: {error}", file=sys.stderr)
    sys.exit(code)


_NOISE = ("reference_type=", "object_type=", "full_key:", "Set the environment variable")


def one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line composition errors, condensed to one line."""
    text = str(error)
    if error.__cause__ is not None and str(error.__cause__) not in text:
        text += "\n" + str(error.__cause__)
    text = text.split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines()]
    options = [line for line in lines if line and text.count(f"\t{line}")]  # tab-indented lists
    parts = [line for line in lines if line and line not in options and not line.startswith(_NOISE)]
    line = "; ".join(parts).replace(":;", ":")
    if options:
        line += " " + ", ".join(options)
    key = re.search(r"Key '[^']+' not in '[^']+'\s+full_key: (\S+)", str(error.__cause__ or error))
    if key and (close := closest_key(key.group(1))):
        line += f"; did you mean {close}?"
    return line


def hydra_errors_in_one_line(app: Callable[[], None]) -> None:
    """Run a Hydra app, turning config composition errors into one line and exit code 2.

    Hydra prints these errors over several lines with its search path; with HYDRA_FULL_ERROR=1
    it raises them instead, which is what lets this wrapper condense them. A user who sets
    HYDRA_FULL_ERROR themselves gets Hydra's full output.
    """
    if os.environ.get("HYDRA_FULL_ERROR"):
        return app()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException) as e:
        exit_on_user_error(one_line(e))
