"""The Hydra side shared by the entry points: the config folder, the schema, error reporting."""

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from traceback import walk_tb

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, OverrideParseException
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


def exit_on_user_error(error: CnnlabError | str, code: int | None = None):
    """One line on stderr, no traceback, non-zero exit (the error's `exit_code`, else 2)."""
    print(f"cnnlab: error: {error}", file=sys.stderr)
    sys.exit(code or getattr(error, "exit_code", 2))


_NOISE = ("reference_type=", "object_type=", "full_key:", "Set the environment variable")
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line composition errors, condensed to one line."""
    if isinstance(error, OverrideParseException):
        return _parse_error(error)
    text = str(error)
    if error.__cause__ is not None and str(error.__cause__) not in text:
        text += "\n" + str(error.__cause__)
    text = text.split("Config search path:")[0]
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and "not in '" in text:  # a typo: Hydra's "use +key=..." advice would add it
        close = closest_key(unknown.group(1))
        hint = f"; did you mean {close}?" if close else "; `cnnlab-train --cfg job` lists the keys"
        return f"unknown config key {unknown.group(1)}{hint}"
    lines = [line.strip() for line in text.splitlines()]
    options = [line for line in lines if line and text.count(f"\t{line}")]  # tab-indented lists
    parts = [line for line in lines if line and line not in options and not line.startswith(_NOISE)]
    line = "; ".join(parts).replace(":;", ":")
    if options:
        line += " " + ", ".join(options)
    if "is not a ListConfig" in line and (override := re.search(r"override ([^=\s]+)=", line)):
        line += f" Write a list as {override.group(1)}=[a,b]"
    key = re.search(r"Key '[^']+' not in '[^']+'\s+full_key: (\S+)", str(error.__cause__ or error))
    if key and (close := closest_key(key.group(1))):
        line += f"; did you mean {close}?"
    return line


def _parse_error(error: OverrideParseException) -> str:
    """An override the grammar rejects (`key=6,,12`, `key=[6,16`, an unclosed quote)."""
    reason = error.message.splitlines()[0]
    if reason.startswith("Error parsing override"):
        reason = error.message.splitlines()[1]
    reason = re.sub(r"^\w+Exception: .*", "unbalanced quote or bracket", reason)
    reason = reason.split(" expecting ")[0]  # the grammar's token list helps nobody
    return (
        f"cannot parse the override {error.override!r} ({reason}): sweeps are key=a,b with -m, "
        f"lists key=[a,b], quote values with commas, brackets or spaces; see {GRAMMAR}"
    )


def _check_arguments(argv: list[str]) -> None:
    """Hydra's own argparse errors print its whole usage; this says what is wrong in one line."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        if "unrecognized arguments" in message:
            flags = parser._option_string_actions
            pairs = zip(argv, argv[1:], strict=False)
            late = [(a, b) for a, b in pairs if "=" in a and b.split("=")[0] in flags]
            if late:  # argparse reads the overrides before the first flag only
                override, flag = late[0]
                message = f"{flag} must come before the overrides, not after {override}: "
                message += f"cnnlab-train {flag} {override} ..."
            else:
                message += (
                    "; overrides are key=value (e.g. train.epochs=3) and flags such as -m go "
                    "before them; cnnlab-train --help lists both"
                )
        exit_on_user_error(message)

    parser.error = error
    parser.parse_args(argv)


def _before_the_job(error: Exception, task: Callable | None) -> bool:
    """Whether `error` came from Hydra itself (reading the overrides, creating the run or sweep
    directory, its .hydra/ and log files) before the job started, not from inside the job."""
    frames = [frame.f_code for frame, _ in walk_tb(error.__traceback__)]
    return task is not None and task.__code__ not in frames


def _override_in(error: Exception) -> str:
    """The command-line override Hydra was reading when `error` was raised, or ""."""
    frames = [frame.f_locals for frame, _ in walk_tb(error.__traceback__)]
    lines = [getattr(f.get("override"), "input_line", None) for f in frames]
    return next((line for line in reversed(lines) if line), "")


def _failed_path(error: OSError) -> str:
    """The file or folder that `error` is about: its own, else the folder Hydra was writing."""
    if error.filename:
        return str(error.filename)
    frames = [frame.f_locals for frame, _ in walk_tb(error.__traceback__)]
    folders = [f.get("output_dir") or f.get("sweep_dir") for f in frames]  # Hydra's names
    return str(next((f for f in reversed(folders) if f), "the run directory"))


def hydra_errors_in_one_line(app: Callable[[], None]) -> None:
    """Run a Hydra app, turning config composition errors into one line and exit code 2.

    Hydra prints these errors over several lines with its search path; with HYDRA_FULL_ERROR=1
    it raises them instead, which is what lets this wrapper condense them. A user who sets
    HYDRA_FULL_ERROR themselves gets Hydra's full output. Also in one line: bad command-line
    arguments, overrides that Hydra rejects with a ValueError, and a run directory that Hydra
    cannot create or write.
    """
    if os.environ.get("HYDRA_FULL_ERROR"):
        return app()
    _check_arguments(sys.argv[1:])
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException) as e:
        exit_on_user_error(one_line(e))
    except (OSError, ValueError) as e:
        if not _before_the_job(e, getattr(app, "__wrapped__", None)):
            raise
        if isinstance(e, ValueError):  # e.g. model.depth=range(1,5,0) in Hydra's sweeper
            exit_on_user_error(f"cannot use the override {_override_in(e)!r}: {e}")
        exit_on_user_error(
            f"cannot create the run directory: {e.strerror or e}: {_failed_path(e)}; "
            "choose a writable folder with hydra.run.dir=... (hydra.sweep.dir=... with -m)"
        )
