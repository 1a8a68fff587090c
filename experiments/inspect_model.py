"""`cnnlab-inspect [overrides]`: print the per-layer table of a configuration without training.

Takes the same overrides as cnnlab-train, e.g.
    cnnlab-inspect model=alexnet_lite data=cifar10 model.stride=2
and prints each layer's output H x W x C, parameters, multiply-adds and receptive field, and the
memory of a training step (cnnlab.memory), or the table up to the layer whose feature map would
be empty, and the one-line reason (exit code 2). A configuration whose training step would not
fit this machine's memory is refused with the figures (exit code 2). A module of one's own
(`model=user model._target_=...`) gets a row per submodule, from its abstract evaluation
(`cnnlab.models.user`), up to the first one with a zero-size shape.
"""

import argparse

from cnnlab import geometry, memory
from cnnlab.data import data_shape, load_dataset
from cnnlab.errors import CnnlabError, GeometryError
from cnnlab.validate import validate
from experiments.hydra_conf import compose_config, entry_point, exit_on_user_error, to_config


def table(overrides: list[str]) -> str:
    cfg = to_config(compose_config(overrides), overrides)
    known = data_shape(cfg.data)
    if known is not None:
        shape, num_classes = known.example_shape, known.num_classes
        held = memory.dataset_bytes(cfg.data, known)
    else:  # a user's own data: its shape and size are known only by reading it
        data = load_dataset(cfg.data)
        shape, num_classes = data.image_shape, data.num_classes
        held = memory.loaded_bytes(data)
    inputs = geometry.input_text(shape)
    title = f"{cfg.model.name} on {cfg.data.name} ({inputs}, {num_classes} classes)"
    try:
        validate(cfg)
        rows = geometry.layers(cfg.model, shape, num_classes)
    except GeometryError as e:  # show where the feature map collapses, then the error
        print(geometry.format_table(e.rows, title, totals=False))
        raise
    est = memory.estimate(cfg, rows, held)
    memory.check(est, memory.host_available())  # a user's own data: not checked by validate
    totals = geometry.summarize(rows)
    example = geometry.example_name(len(shape) - 1)
    footer = f"forward FLOPs per {example}: {totals['flops']:,} (2 per multiply-add)"
    return f"{geometry.format_table(rows, title)}\n{footer}\n{est.text()}"


@entry_point
def main() -> None:
    parser = argparse.ArgumentParser(
        prog="cnnlab-inspect", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for cnnlab-train")
    args = parser.parse_args()
    try:
        print(table(args.overrides))
    except CnnlabError as e:
        exit_on_user_error(e)


if __name__ == "__main__":
    main()
