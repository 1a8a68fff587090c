"""The Hydra side shared by the entry points: the config folder, the schema, error reporting."""

import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

from cnnlab.config import Config
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


def exit_on_user_error(error: CnnlabError, code: int = 2):
    """One line on stderr, no traceback, non-zero exit."""
    print(f"cnnlab: error: {error}", file=sys.stderr)
    sys.exit(code)
