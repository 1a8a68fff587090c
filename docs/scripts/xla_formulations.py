"""Time a whole training step of LeNet-5 or AlexNet-lite with each set of XLA-side CPU
formulations (`cnnlab.models.conv`) against plain XLA ops, in one process.

The cases are those where oneDNN does not apply: `--case xla` (no compiler: `CNNLAB_CONV=xla`),
`--case bf16` (bfloat16 forward and backward) and `--case devices2` (two CPU devices, the batch
split over them). Each variant's step is compiled first, then the variants run in turn, `--rounds`
times, `--steps` steps each; the report gives each variant's median step time and its ratio to
the first variant's median, as its speed-up (the rounds' spread in brackets). Synthetic images,
forward + backward + SGD update, as `cnnlab.train.step` does. docs/xla-formulations.md has the
figures; the commit it names has the version of this script that measured the deleted ones.

  .venv/bin/python docs/scripts/xla_formulations.py --net lenet5 --case xla
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

ALEXNET_LITE = {  # conf/model/alexnet_lite.yaml with the experiment presets' changes
    "name": "alexnet_lite", "depth": 24, "kernel_size": [5, 5, 3, 3, 3], "padding": "same",
    "pool_size": 3, "pool_stride": 2, "dense": [512, 512], "dropout": 0.25, "norm": "batch",
}  # fmt: skip
NETS = {  # the experiment presets' model and input: (model config keys, image shape)
    "lenet5": ({"padding": [2, 0]}, (28, 28, 1)),
    "alexnet_lite": (ALEXNET_LITE, (32, 32, 3)),
    "alexnet_lite_fmnist": (
        {**ALEXNET_LITE, "padding": [4, "same", "same", "same", "same"]},
        (28, 28, 1),
    ),
}
CASES = {"xla": "CNNLAB_CONV=xla", "bf16": "bfloat16", "devices2": "2 CPU devices"}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=NETS, default="lenet5")
    parser.add_argument("--case", choices=CASES, default="xla")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--variants", default="plain,cnnlab", help="comma-separated; see `variant` below"
    )
    return parser.parse_args()


def set_case(case: str) -> None:
    """The environment of `case`, before JAX is imported."""
    if case == "devices2":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
    os.environ["CNNLAB_CONV"] = "xla" if case == "xla" else os.environ.get("CNNLAB_CONV", "")
    os.environ["JAX_PLATFORMS"] = "cpu"


FORMULATIONS = {"taps", "written"}  # what the XLA-side CPU path still uses


@contextlib.contextmanager
def variant(name: str):
    """The models as `name` builds them: "cnnlab", the code as it is; "plain", every conv
    `lax.conv_general_dilated`; "cnnlab-X", the code without formulation X (the plain op
    instead), for X in `FORMULATIONS`; "plain+X+Y", only X and Y."""
    from cnnlab.models import conv, layers

    off = set()
    if name.startswith("cnnlab-"):
        off = {name.removeprefix("cnnlab-")}
    elif name != "cnnlab":
        off = FORMULATIONS - set(name.split("+")[1:])
    saved = {(m, k): getattr(m, k) for m, k in [(layers, "plan"), (conv, "_written")]}
    original_plan = layers.plan

    def plan(*args, **kwargs):
        how = original_plan(*args, **kwargs)
        return "xla" if "taps" in off and how == "taps" else how

    layers.plan = plan
    if "written" in off:
        conv._written = lambda y: y
    try:
        yield
    finally:
        for (module, key), value in saved.items():
            setattr(module, key, value)


def compiled_step(net: str, case: str, batch: int, name: str):
    """(the compiled step, its initial arguments) for variant `name`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from cnnlab.compiler import compiler_options
    from cnnlab.config import ModelConfig
    from cnnlab.models import build_model
    from cnnlab.parallel import batch_sharded, data_mesh, replicated

    keys, shape = NETS[net]
    model = build_model(ModelConfig(**keys), 10)
    dtype = jnp.bfloat16 if case == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    tx = optax.sgd(0.01, momentum=0.9)
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)

    def step(params, stats, opt, x, y):
        def loss(params):
            logits, updates = model.apply(
                {"params": cast(params), **({"batch_stats": stats} if stats else {})},
                x.astype(dtype), train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)},
            )  # fmt: skip
            labels = jax.nn.one_hot(y, 10)
            value = -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))
            return value, updates.get("batch_stats", {})

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, x, y

    mesh = data_mesh()
    rep, split = replicated(mesh), batch_sharded(mesh)
    params, stats = variables["params"], variables.get("batch_stats", {})
    args = jax.device_put((params, stats, tx.init(params)), rep) + jax.device_put((x, y), split)
    jitted = jax.jit(
        step, in_shardings=(rep, rep, rep, split, split),
        out_shardings=(rep, rep, rep, split, split),
        compiler_options=compiler_options(mesh), donate_argnums=(0, 1, 2),
    )  # fmt: skip
    with variant(name):
        return jitted.lower(*args).compile(), args


def main() -> None:
    args = arguments()
    set_case(args.case)
    import jax

    names = args.variants.split(",")
    compiled, state = {}, {}
    for name in names:
        begin = time.perf_counter()
        compiled[name], state[name] = compiled_step(args.net, args.case, args.batch, name)
        state[name] = compiled[name](*state[name])  # a first step, not timed
        jax.block_until_ready(state[name])
        print(f"compiled {name} in {time.perf_counter() - begin:.1f} s", file=sys.stderr)
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            begin = time.perf_counter()
            for _ in range(args.steps):
                state[name] = compiled[name](*state[name])
            jax.block_until_ready(state[name])
            times[name].append((time.perf_counter() - begin) / args.steps * 1e3)
    report(args, times)


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """One Markdown table row per variant: median ms per step [min-max], ratio to the first."""
    base = statistics.median(next(iter(times.values())))
    load = os.getloadavg()[0]
    print(f"{args.net}, {CASES[args.case]}, batch {args.batch}, {args.rounds} rounds x "
          f"{args.steps} steps, load {load:.2f}")  # fmt: skip
    for name, ms in times.items():
        median = statistics.median(ms)
        print(f"| {name} | {median:.1f} [{min(ms):.1f}-{max(ms):.1f}] | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
