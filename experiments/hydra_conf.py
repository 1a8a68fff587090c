"""The Hydra side shared by the entry points: the config folder, the schema, the conversion to
`Config`, and the command line checked before Hydra runs it.

Hydra reports its own mistakes over several lines with its search path. Rather than catch them
inside Hydra, `check_command_line` first does what Hydra is about to do, with public API only: it
parses the flags (argparse), the overrides (Hydra's override grammar), checks their keys against
the schema, composes the config and every point of a sweep (Hydra's compose API) and checks that
the run or sweep directory can be written. A mistake is one line and exit code 2; Hydra then runs
a command line that is known to compose.
"""

import argparse
import errno
import functools
import itertools
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.config import Config, ModelConfig, closest_key, from_dict
from cnnlab.errors import CnnlabError, ConfigError

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def conf_dir() -> Path:
    """`conf/` of a source checkout (editable install), or the copy packaged beside this file."""
    for candidate in (Path(__file__).parent / "conf", Path(__file__).parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("cnnlab's conf/ folder is missing from the installation")


def _model_defaults() -> dict:
    """ModelConfig's defaults as a plain mapping, without `fields` (see `HydraSchema`)."""
    return {k: v for k, v in asdict(ModelConfig()).items() if k != "fields"}


@dataclass
class HydraSchema(Config):
    """`Config` as Hydra composes it. OmegaConf refuses a key that a dataclass node lacks (even
    under open_dict; Dict-subclassing schemas are deprecated), so `model` is an untyped node with
    ModelConfig's defaults: a module of one's own brings its fields as keys beside `_target_`
    (+model.width=16, Hydra's instantiate convention). `to_config` types it, with ModelConfig's
    checks (`from_dict`), and `compose_config` still refuses a typo of a layer-language key."""

    model: Any = field(default_factory=_model_defaults)


def register_schema() -> None:
    """Make the dataclass schema the base of conf/config.yaml (its `- schema` default)."""
    ConfigStore.instance().store(name="schema", node=HydraSchema)


# The model's name where the command line writes the whole net (model.layers=[...]): the preset's
# name would title pictures and reports with a net that was not trained.
CUSTOM_MODEL = "custom"


def to_config(node: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Hydra's composed config as a `Config`, once, at the entry point. A required value left
    unset (`???`) is a ConfigError, and so is a key the schema lacks (`+key=value` adds one),
    except under a `model._target_`, whose keys are the module's fields (`module_node`).
    `overrides`, the command line's: where they replace `model.layers` whole and leave
    `model.name`, the model is named CUSTOM_MODEL (and so is the run's `name` that interpolates
    it) rather than after the preset whose layers it no longer has."""
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        raise ConfigError(f"{missing[0]} is required but unset; set it with {missing[0]}=...")
    keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    if "model.layers" in keys and "model.name" not in keys:
        node = OmegaConf.merge(node, {"model": {"name": CUSTOM_MODEL}})
    tree = OmegaConf.to_container(node, resolve=True)
    tree.pop("hydra", None)
    if isinstance(tree.get("model"), dict):
        tree["model"] = module_node(tree["model"])
    return from_dict(tree)


def module_node(model: dict) -> dict:
    """The `model` node as ModelConfig reads it. With a `_target_`, every key but `name` is the
    module's, its fields gathered into `fields`: a field may share a knob's name (stride,
    dropout), and a knob the module lacks is refused as an unknown field. The layer-language
    keys left null (the schema's defaults) are not the module's."""
    target, layers = model.get("_target_"), model.get("layers")
    if not target and layers == []:  # model=user without its module
        raise ConfigError(
            "model._target_ is required with model=user (and without model.layers): set "
            "model._target_=package.module.Class"
        )
    if not target:
        return model
    if layers:  # the default model group's layer preset, whose keys would apply too
        raise ConfigError(
            f"model._target_ is set on top of the layer preset {model.get('name')}: start from "
            f"model=user (cnnlab-train model=user model._target_={target} +model.<field>=...), "
            "or write `defaults: [user]` in a preset of your module"
        )
    schema = {f.name for f in fields(ModelConfig)}
    own = {
        key: value for key, value in model.items()
        if key not in ("name", "layers", "_target_", "fields")
        and not (key in schema and value is None)
    }  # fmt: skip
    gathered = {**(model.get("fields") or {}), **own}
    return {"name": model.get("name"), "layers": [], "_target_": target, "fields": gathered}


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep's jobs and its report run: `<name>/<timestamp>`."""
    return str(sweep_dir.relative_to(sweep_dir.parents[1]))


def entry_point(main: Callable) -> Callable:
    """A command's `main`, ending quietly with exit code 1 when the reader of its output goes away
    (`cnnlab-verify --list | head -3`) instead of in a BrokenPipeError traceback (the recipe of
    Python's `signal` documentation: stdout goes to /dev/null so the exit's flush cannot fail)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)

    return run


def exit_on_user_error(error: CnnlabError | str, code: int | None = None):
    """One line on stderr, no traceback, non-zero exit (the error's `exit_code`, else 2)."""
    print(f"cnnlab: error: {error}", file=sys.stderr)
    sys.exit(code or getattr(error, "exit_code", 2))


_NOISE = ("reference_type=", "object_type=", "full_key:", "Set the environment variable")


def one_line(error: HydraException | OmegaConfBaseException) -> str:
    """A composition error of Hydra or OmegaConf (a message of several lines, its cause's message
    and a list of options) as one line, without Hydra's search path."""
    if isinstance(error, OverrideParseException):
        return _parse_error(error.override, str(error))
    text = str(error)
    if error.__cause__ is not None and str(error.__cause__) not in text:
        text += "\n" + str(error.__cause__)
    text = text.split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines()]
    options = [line for line in lines if line and text.count(f"\t{line}")]  # tab-indented lists
    parts = [line for line in lines if line and line not in options and not line.startswith(_NOISE)]
    line = "; ".join(parts).replace(":;", ":") + (" " + ", ".join(options) if options else "")
    key = getattr(error.__cause__ or error, "full_key", "")  # OmegaConf's, on its errors
    if "is not a ListConfig" in line and key:
        line += f" Write a list as {key}=[a,b]"
    return line


def _parse_error(override: str, message: str) -> str:
    """An override the grammar rejects (`key=6,,12`, `key=[6,16`, an unclosed quote)."""
    reason = next(line for line in message.splitlines() if not line.startswith("Error parsing"))
    if "Exception: " in reason or reason.startswith("token recognition error"):
        reason = "unbalanced quote or bracket"  # the lexer's words for an unclosed quote
    reason = reason.split(" expecting ")[0]  # the grammar's token list helps nobody
    return (
        f"cannot parse the override {override!r} ({reason}): sweeps are key=a,b with -m, "
        f"lists key=[a,b], quote values with commas, brackets or spaces; see {GRAMMAR}"
    )


class UsageError(CnnlabError):
    """A mistake on the command line itself: a flag, an override, a folder."""


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's documented hook; its default prints the usage
        raise UsageError(message)


# Hydra's command-line flags (`cnnlab-train --hydra-help`): (names, argparse settings).
# tests/test_cli.py checks this list against the flags Hydra itself lists.
HYDRA_FLAGS = [
    (("--help", "-h"), {"action": "store_true"}),
    (("--hydra-help",), {"action": "store_true"}),
    (("--version",), {"action": "store_true"}),
    (("--cfg", "-c"), {"choices": ["job", "hydra", "all"]}),
    (("--resolve",), {"action": "store_true"}),
    (("--package", "-p"), {}),
    (("--run", "-r"), {"action": "store_true"}),
    (("--multirun", "-m"), {"action": "store_true"}),
    (("--shell-completion", "-sc"), {"action": "store_true"}),
    (("--config-path", "-cp"), {}),
    (("--config-name", "-cn"), {}),
    (("--config-dir", "-cd"), {}),
    (("--experimental-rerun",), {}),
    (("--info", "-i"), {"nargs": "?", "const": "all"}),
]
FLAG_NAMES = {name for names, _ in HYDRA_FLAGS for name in names}


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """Hydra's flags and the overrides, or a UsageError of one line."""
    parser = _FlagParser(add_help=False)
    for names, settings in HYDRA_FLAGS:
        parser.add_argument(*names, **settings)
    parser.add_argument("overrides", nargs="*")
    try:
        return parser.parse_args(argv)
    except UsageError as e:
        pairs = zip(argv, argv[1:], strict=False)
        late = [(a, b) for a, b in pairs if "=" in a and b.split("=")[0] in FLAG_NAMES]
        if "unrecognized arguments" in str(e) and late:  # flags go before the first override
            override, flag = late[0]
            raise UsageError(
                f"{flag} must come before the overrides, not after {override}: "
                f"cnnlab-train {flag} {override} ..."
            ) from e
        hint = "" if "unrecognized arguments" not in str(e) else (
            "; overrides are key=value (e.g. train.epochs=3) and flags such as -m go "
            "before them; cnnlab-train --help lists both"
        )  # fmt: skip
        raise UsageError(f"{e}{hint}") from e


def check_keys(overrides: list[str]) -> None:
    """A ConfigError for an override whose key the schema lacks (with or without `+`), naming the
    closest valid key. Hydra would add a `+key` silently, and for a typo without `+` advise adding
    it."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None or (conf_dir() / key).is_dir():
            continue  # Hydra's own settings, and config groups, whose options Hydra checks
        if override.is_delete():
            continue  # Hydra says itself that a key to delete does not exist
        if (known := _unknown_in(key)) is not None:
            close = closest_key(key)
            hint = f"; did you mean {close}?" if close else "; `cnnlab-train --cfg job` lists them"
            if override.is_add() and known:  # `+key=...`: what may be added there
                hint += f" (valid here: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown config key {key}{hint}")


def _unknown_in(dotted: str) -> list[str] | None:
    """None if `dotted` is a key of the schema, or a path into one of its lists or mappings
    (`model.layers.0.conv`, which OmegaConf checks against the value), else the valid keys where
    it leaves the schema."""
    schema = Config
    for part in dotted.split("."):
        if typing.get_origin(schema) in (list, dict) or schema is Any:
            return None
        kinds = {f.name: f.type for f in fields(schema)} if is_dataclass(schema) else {}
        if part not in kinds:
            return list(kinds)
        schema = kinds[part]
    return None


def compose_config(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The config of `overrides`, composed with Hydra's compose API; a mistake in them is a
    ConfigError of one line. A key under `model` that the schema lacks is a field of the module
    that `model._target_` names, or, without one, a typo named with its closest key."""
    register_schema()
    extra = _model_extras(overrides)
    check_keys([o for o in overrides if o not in extra])
    try:
        composed = _compose(overrides, hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        if extra and not any(o.startswith("model._target_=") for o in overrides):
            check_keys(extra)  # a typo's message names the closest key, not Hydra's
        raise ConfigError(one_line(e)) from e
    if extra and composed.model._target_ is None:
        check_keys(extra)  # no module of one's own: a typo of a layer-language key
    return composed


def _compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def _model_extras(overrides: list[str]) -> list[str]:
    """The overrides of keys under `model` that the schema lacks: the fields of a module of
    one's own where `model._target_` is set, else typos."""
    parsed = zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True)
    return [
        line for line, o in parsed
        if o.key_or_group.startswith("model.") and not o.is_delete()
        and _unknown_in(o.key_or_group) is not None
    ]  # fmt: skip


class ContinuousSweep(ValueError):
    """A sweep over a range (e.g. Optuna's interval): its points are chosen while it runs."""


def expand(task_overrides: list[str], params: dict[str, str]) -> list[list[str]]:
    """The jobs of a sweep as Hydra's basic sweeper makes them: every job gets all overrides, one
    value of each swept key, over the cartesian product of the sweeper's `params` and the command
    line's sweep overrides (the command line wins over `params` for the same key). A ValueError
    names the override that cannot be expanded (e.g. `range(1,5,0)`)."""
    merged = {k: f"{k}={v}" for k, v in (params or {}).items()}
    for override in OverridesParser.create().parse_overrides(task_overrides):
        merged[override.get_key_element()] = override.input_line
    axes = []
    for override in OverridesParser.create().parse_overrides(list(merged.values())):
        key = override.get_key_element()
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise ContinuousSweep(f"{key} is a range ({override.input_line}), not a list")
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else []
        except ValueError as e:
            raise ValueError(f"malformed sweep {override.input_line}: {e}") from e
        axes.append([f"{key}={v}" for v in values] if values else [override.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep_points(overrides: list[str]) -> tuple[DictConfig, list[list[str]]]:
    """The sweep's composed base config (its fixed overrides, Hydra's settings included) and its
    points, each a full list of overrides. ContinuousSweep for a sweep over a range (Optuna's)."""
    base = compose_config(_fixed(overrides), hydra_config=True)
    try:
        return base, expand(overrides, dict(base.hydra.sweeper.get("params") or {}))
    except ContinuousSweep:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _fixed(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps."""
    parser = OverridesParser.create()
    return [o for o in overrides if not parser.parse_override(o).is_sweep_override()]


def check_command_line(argv: list[str]) -> None:
    """What Hydra does first with `argv`, done here so that a mistake is one line: the flags, the
    overrides, the composed config (each sweep point's with `-m`) and the folder Hydra writes."""
    args = parse_flags(argv)
    if args.version or args.config_path or args.config_name or args.config_dir:
        return  # no config, or another config tree: Hydra reports on it itself
    if args.experimental_rerun:  # a pickled config, not these overrides
        return
    parser = OverridesParser.create()
    for override in args.overrides:
        try:
            parser.parse_override(override)
        except HydraException as e:  # the grammar's error, or a sweep that cannot be evaluated
            raise ConfigError(_parse_error(override, str(e))) from e
    writes = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)
    if not args.multirun:
        base = compose_config(args.overrides, hydra_config=True)
        if writes:
            check_writable(Path(base.hydra.run.dir), multirun=False)
        return
    try:
        base, points = sweep_points(args.overrides)
    except ContinuousSweep:  # its points are composed while it runs
        base, points = compose_config(_fixed(args.overrides), hydra_config=True), []
    for point in points:  # a point's values are validated by each job (sweep.on_invalid)
        compose_config(point)
    if writes:
        check_writable(Path(base.hydra.sweep.dir), multirun=True)


def check_writable(folder: Path, multirun: bool) -> None:
    """A UsageError unless `folder`, or the nearest folder above it that exists, can be written
    to (a probe file is written and synced there); nothing is created in its place."""
    from cnnlab.rundir import check_run_dir

    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    try:
        if not existing.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        check_run_dir(existing, need_bytes=0)
    except (OSError, CnnlabError) as e:
        reason = e.__cause__ if isinstance(e, CnnlabError) else e
        reason = reason.strerror or reason
        if multirun:
            raise UsageError(
                f"cannot write the sweep directory {folder}: {reason}; choose a writable folder "
                "with hydra.sweep.dir=..."
            ) from e
        raise UsageError(
            f"cannot create the run directory: {reason}: {folder}; choose a writable folder with "
            "hydra.run.dir=... (hydra.sweep.dir=... with -m)"
        ) from e


def run_app(task) -> None:
    """Run `task(node)` as a Hydra app of conf/config.yaml, after `check_command_line`.

    A user who sets HYDRA_FULL_ERROR gets Hydra alone, with its full error output."""
    import hydra

    register_schema()
    if not os.environ.get("HYDRA_FULL_ERROR"):
        try:
            check_command_line(sys.argv[1:])
        except CnnlabError as e:
            exit_on_user_error(e)
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)()
