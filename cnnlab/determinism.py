"""`deterministic=true`: XLA's flags for GPU runs that repeat bit for bit, and what they cannot do.

On the CPU the same config trains bit-identical parameters without any setting: every random
number comes from the seed, and XLA's CPU kernels sum in a fixed order (summary.json's
`params_sha256` is equal; tested). On a GPU, XLA may pick kernels that sum in a
different order from run to run (scatter, autotuned convolutions and GEMMs); `deterministic=true`
sets XLA's flags that switch them to deterministic, slower implementations. One operation has
none: select-and-scatter, the gradient of `nn.max_pool`, which XLA then refuses to compile
("does not have a deterministic implementation"). Average pooling's gradient has one.
"""

from cnnlab.architecture import Pool, PoolKind, resolve, walk
from cnnlab.config import ModelConfig

# XLA's flags (xla/debug_options_flags.cc; both known to the CPU backend too, where they change
# nothing): deterministic GPU kernels, and compilation errors for ops that have none.
XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def with_xla_flags(current: str) -> str:
    """`current` XLA_FLAGS with the determinism flags added, each once."""
    flags = current.split()
    return " ".join([*flags, *(f for f in XLA_FLAGS if f not in flags)])


def warning(backend: str, model: ModelConfig) -> str | None:
    """What `deterministic=true` cannot do for this model on this JAX backend, or None."""
    pools = [layer.kind for layer in walk(resolve(model).layers) if isinstance(layer, Pool)]
    if backend in GPU_BACKENDS and PoolKind.max in pools:
        return (
            "deterministic=true: max pooling's gradient (select-and-scatter) has no deterministic "
            "GPU implementation, so XLA will refuse to compile the training step; use "
            "average pooling instead: model.pool=avg"
        )
    return None
