"""Checkpoints with orbax: folders of arrays and JSON, no pickle, so loading one never runs code.

A run directory holds two kinds:

- `checkpoint/`: the final model alone (`save_variables`, `load_variables`), what `cnnlab-predict`
  and `checkpoint.init_from` read: the parameters tree, or for a model with batch normalization
  the Flax variables `{"params", "batch_stats"}`.
- `checkpoints/<step>/`: the whole training state (step, parameters, optimizer state, running
  statistics where the model has them) and the
  loop's position (`meta`, JSON), kept by orbax's `CheckpointManager` (`Checkpoints`). orbax
  writes each into a temporary folder and renames it once complete, so an interrupted save is
  never taken for a finished one; leftovers of such saves are deleted at the next start.

`meta` records the versions of cnnlab, jax, flax and orbax, the config (what it computes, and its
hash) and the sha256 of the state's bytes. A run resumes only with the config it was saved with;
keys added to cnnlab since count only when set off their default. Restoring recomputes the
sha256, so a truncated or altered file is caught, named with its step, and the previous
checkpoint is used instead. A non-finite state is never saved.
"""

import hashlib
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from cnnlab.config import Config, config_hash, identity, identity_changes
from cnnlab.errors import CnnlabError, ConfigError

# The layout of `meta`; raise it when the layout changes, and keep reading the older ones
# (tests/data/golden/ holds a checkpoint of each).
FORMAT = 1


def save_params(path: Path, params) -> None:
    """Write `params` (a pytree of arrays) to the directory `path`, replacing what is there."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params, force=True)


def save_variables(path: Path, model_vars: dict) -> None:
    """Write a model's Flax variables to `path`: the parameters alone where they are all there is
    (the layout every earlier cnnlab wrote), else the whole dict."""
    save_params(path, model_vars["params"] if model_vars.keys() == {"params"} else model_vars)


def load_variables(path: Path, like: dict) -> dict:
    """Read what `save_variables` wrote; `like` is the model's variables (e.g. `jax.eval_shape`
    of its init), whose collections say which layout to expect."""
    if like.keys() == {"params"}:
        return {"params": load_params(path, like["params"])}
    return load_params(path, like)


def _placed(like):
    """`like` as abstract arrays, each on its own sharding or else the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(x):
        sharding = getattr(x, "sharding", None) or device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(placed, like)


def load_params(path: Path, like):
    """Read parameters saved by `save_params`; `like` gives the tree structure, shapes and dtypes
    (e.g. `jax.eval_shape` of the model's init), and where a leaf has a `sharding`, its placement.

    Leaves without one are read onto the first local device, whatever devices trained them: a run
    on 8 GPUs is read back on a laptop.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CnnlabError(f"no checkpoint at {path}: train first, or pass the right run directory")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(path, _placed(like))
        except (ValueError, KeyError, FileNotFoundError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CnnlabError(f"cannot read the checkpoint {path}: {message}") from e


def params_source(path: Path) -> Path:
    """Where `checkpoint.init_from=<path>` finds parameters: a run directory's final
    `checkpoint/`, else the params of its newest `checkpoints/<step>/`, else `path` itself."""
    path = Path(path).expanduser().absolute()
    if (path / "checkpoint").is_dir():
        return path / "checkpoint"
    steps = sorted(ocp.utils.checkpoint_steps(path / "checkpoints")) if path.is_dir() else []
    if steps:
        return path / "checkpoints" / str(steps[-1]) / "state"
    return path


def load_init_variables(path: Path, like: dict, cfg: Config | None = None) -> dict:
    """The model variables for `checkpoint.init_from` (parameters, and running statistics where
    the model has them), checked against the model's (`like`, as `load_variables` takes it).
    Another model's checkpoint is an error that names both models: `cfg`'s and, from the
    config.yaml of the run that saved it, the checkpoint's."""
    source = params_source(path)
    if not source.is_dir():
        raise CnnlabError(f"checkpoint.init_from={path}: no run directory or checkpoint there")
    saved, wanted = _saved_variable_shapes(source), _shapes(like)
    if saved != wanted:
        raise CnnlabError(
            f"checkpoint.init_from={path} holds another model than this config's: "
            f"{_other_model(Path(path).expanduser(), cfg, saved, wanted)}"
        )
    if source.name == "state":  # a full training state: take the model's part of it
        state = load_params(source, _like_state_variables(source, like))
        return {k: state[k] for k in like}
    return load_variables(source, like)


def _like_state_variables(source: Path, like: dict):
    """A target that restores a saved training state with the model's variables as in `like`."""
    metadata = ocp.StandardCheckpointer().metadata(source).item_metadata
    tree = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(metadata))
    return {**tree, **like}


def _shapes(tree) -> dict[str, tuple]:
    """`{"params/conv1/kernel": shape, ...}` of a tree of arrays or of array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }


def _saved_variable_shapes(source: Path) -> dict[str, tuple]:
    """The shapes of the model variables saved in `source`, keyed as `_shapes` of
    `{"params": ..., "batch_stats": ...}` (whichever layout `save_variables` chose)."""
    tree = dict(ocp.StandardCheckpointer().metadata(source).item_metadata)
    if source.name == "state" or set(tree) <= {"params", "batch_stats"}:
        return _shapes({k: tree[k] for k in ("params", "batch_stats") if k in tree})
    return _shapes({"params": tree})


def _other_model(path: Path, cfg: Config | None, saved: dict, wanted: dict) -> str:
    """In the user's words, how the checkpoint's model differs from the config's: the model keys
    (and dataset) of the run that saved it, else the first parameter whose shape differs."""
    run_config = next(
        (d / "config.yaml" for d in (path, path.parent) if (d / "config.yaml").is_file()), None
    )
    if cfg is not None and run_config is not None:
        theirs = yaml.safe_load(run_config.read_text()) or {}
        ours = {"model": asdict(cfg.model), "data": {"name": cfg.data.name}}
        changed = [
            (f"{group}.{key}", theirs.get(group, {}).get(key), value)
            for group in ("model", "data")
            for key, value in ours[group].items()
            if key in theirs.get(group, {}) and theirs[group][key] != value
        ]
        if changed:
            word = lambda value: "null" if value is None else value  # as the user writes it
            there = ", ".join(f"{key}={word(old)}" for key, old, _ in changed)
            here = ", ".join(f"{key}={word(new)}" for key, _, new in changed)
            name = theirs.get("model", {}).get("name")
            return (
                f"its run ({run_config}) trained {name} with {there}; this config asks for "
                f"{cfg.model.name} with {here}. Start from a run of this model, or set those "
                "keys as that run had them"
            )
    key = next(k for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k))
    there = list(saved[key]) if key in saved else "none"
    here = list(wanted[key]) if key in wanted else "none"
    return (
        f"its parameter {key} has shape {there}, this model's {here} (another model, or another "
        "dataset's image size or classes)"
    )


def versions() -> dict[str, str]:
    """What wrote a checkpoint."""
    names = {"cnnlab": "cnnlab", "jax": "jax", "flax": "flax", "orbax": "orbax-checkpoint"}
    return {key: version(dist) for key, dist in names.items()}


def tree_sha256(tree) -> str:
    """sha256 of a tree's leaves (paths, dtypes, shapes and bytes, in the tree's order)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _finite(tree, lanes: list[int] | None) -> bool:
    """Every float leaf finite (only lanes `lanes` of a stacked tree, when given)."""
    for leaf in jax.tree.leaves(tree):
        if np.issubdtype(leaf.dtype, np.floating):
            values = leaf if lanes is None else leaf[lanes]
            if not np.isfinite(values).all():
                return False
    return True


def _host_copy(x) -> np.ndarray:
    """A host copy of a replicated array (this process's copy of it, in a multi-host run)."""
    if isinstance(x, jax.Array):
        x = x.addressable_data(0)
    return np.array(x, copy=True)


def _warn(message: str) -> None:
    print(f"cnnlab: warning: {message}", file=sys.stderr)


@dataclass
class Restored:
    step: int
    state: dict  # {"step", "params", "opt_state"} as host arrays, shaped like the target
    meta: dict  # the loop's position and whatever the caller saved with it


class Checkpoints:
    """The training states of one run, in `directory` (its `checkpoints/`).

    `save` copies the state to the host (the train step donates the device buffers right after)
    and writes it in the background; `restore` takes the newest checkpoint that reads back whole.
    """

    def __init__(self, directory: Path, keep: int, cfg: Config, primary: bool = True):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.primary = primary  # the processes of a multi-host run hold the same state
        if primary:
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            cleanup_tmp_directories=True,
            create=False,  # orbax cannot create it with `active_processes` set
            # one writer: every process of a multi-host run would write the same replicated state
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=None, active_processes={jax.process_index()}
            )
            if jax.process_count() > 1
            else ocp.options.MultiprocessingOptions(),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict, lanes: list[int] | None = None) -> bool:
        """Save `state` (a tree of arrays) and `meta` (JSON) as step `step`; False, and nothing
        written, when a float in the state (of `lanes`, for stacked models) is not finite."""
        host = jax.tree.map(_host_copy, state)  # now: the next step donates the device buffers
        if not _finite(host, lanes):
            return False
        if not self.primary or step in self.manager.all_steps():
            return True
        meta = {
            **meta,
            "step": step,
            "format": FORMAT,
            "versions": versions(),
            "config_hash": config_hash(self.cfg),
            "config": identity(self.cfg),
            "state_sha256": tree_sha256(host),
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        return True

    def restore(self, like: dict) -> Restored | None:
        """The newest checkpoint that reads back whole, as host arrays shaped like `like`; None if
        there is none. One that does not read back (truncated, altered) is skipped with a
        warning."""
        steps = self.steps()
        for i, step in reversed(list(enumerate(steps))):
            try:
                return self._restore(step, like)
            except ConfigError:
                raise
            except CnnlabError as e:
                if i == 0:
                    raise
                _warn(f"{e}; resuming from the previous checkpoint, step {steps[i - 1]}")
        return None

    def _restore(self, step: int, like: dict) -> Restored:
        folder = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta.meta)
        except Exception as e:  # orbax and tensorstore raise many types for a damaged file
            reason = _first(e)
            raise CnnlabError(
                f"checkpoint step {step} is unreadable: {folder}/meta: {reason}"
            ) from e
        changes = identity_changes(meta["config"], self.cfg)
        if changes:
            raise ConfigError(
                f"{self.directory} holds the checkpoints of another config ({changes[0]}"
                f"{f' and {len(changes) - 1} more' if len(changes) > 1 else ''}): rerun with "
                "that config, or give this one a new run directory (hydra.run.dir=...)"
            )
        try:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(_placed(shapes)))
            state = jax.device_get(self.manager.restore(step, args=args).state)
        except Exception as e:
            reason = _first(e)
            raise CnnlabError(
                f"checkpoint step {step} is unreadable: {folder}/state: {reason}"
            ) from e
        if tree_sha256(state) != meta.get("state_sha256"):
            raise CnnlabError(
                f"checkpoint step {step} is damaged: the arrays in {folder}/state do not match "
                "the sha256 saved with them"
            )
        return Restored(step, state, meta)

    def wait(self) -> None:
        """Block until the background writes have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _first(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
