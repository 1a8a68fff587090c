"""Parameters on disk with orbax: a directory of arrays and metadata, no pickle."""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cnnlab.errors import CnnlabError


def save_params(path: Path, params) -> None:
    """Write `params` (a pytree of arrays) to the directory `path`, which must not exist yet."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params)


def load_params(path: Path, like):
    """Read parameters saved by `save_params`; `like` gives the tree structure, shapes and dtypes
    (e.g. `jax.eval_shape` of the model's init), and where a leaf has a `sharding`, its placement.

    Leaves without one are read onto the first local device, whatever devices trained them: a run
    on 8 GPUs is read back on a laptop.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CnnlabError(f"no checkpoint at {path}: train first, or pass the right run directory")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(x):
        sharding = getattr(x, "sharding", None) or device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    like = jax.tree.map(placed, like)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(path, like)
        except (ValueError, KeyError, FileNotFoundError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CnnlabError(f"cannot read the checkpoint {path}: {message}") from e
