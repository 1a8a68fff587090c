"""A researcher's own Flax Linen module (`model._target_`): imported, built and checked.

Any `nn.Module` whose `__call__(x, train=False)` maps inputs [B, *S, C] to logits [B, K] trains
with cnnlab (README, "Your own module"). `model._target_` is its import path (importlib: its
package must be installed or on PYTHONPATH), `model.fields` the values of its dataclass fields,
and a field named `num_classes` gets K from the data.

JAX and Flax build zero-size feature maps and parameters without a word (a stride larger than
its map gives a 0x0 output), so `layers` evaluates the module abstractly (`jax.eval_shape`: shapes
only, nothing computed or compiled) on an input of the data's shape and refuses the first
submodule with a zero-size input, output or parameter, naming its path. Flax's
`capture_intermediates` keeps outputs only, so a method interceptor (`nn.intercept_methods`)
records each submodule call's input and output. Its rows are the per-layer table
(`cnnlab.geometry.Layer`) that the memory estimate, the pre-flight, cnnlab-inspect and layers.txt
read: one per leaf submodule (one that calls no other), with its own parameters, so that the
rows' sums are the module's.

Glossary: `B` batch, `S` spatial axes, `C` channels, `K` classes.
"""

import dataclasses
import difflib
import importlib
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import FlaxError
from flax.traverse_util import flatten_dict

from cnnlab.config import ModelConfig
from cnnlab.errors import ConfigError, GeometryError
from cnnlab.geometry import Layer

# Flax's own dataclass fields of every module, not hyper-parameters a config may set
_FLAX_FIELDS = ("parent", "name")
# The layer language's keys: a module of one's own reads none of them
_NOT_KNOBS = ("name", "layers", "_target_", "fields")
KNOBS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_KNOBS)


def module_class(target: str) -> type[nn.Module]:
    """The class that `model._target_` names; ConfigError if it cannot be imported or is not a
    Linen module."""
    where, _, attr = target.rpartition(".")
    if not where:
        raise ConfigError(
            f"model._target_={target} is not an import path: use package.module.Class"
        )
    try:
        module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(
            f"model._target_={target} cannot be imported: {e} (is its package installed or on "
            "PYTHONPATH?)"
        ) from e
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module) if n[:1] != "_"], n=1)
        hint = f"; did you mean {where}.{close[0]}?" if close else ""
        raise ConfigError(f"model._target_={target}: {where} has no {attr}{hint}")
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = f"the class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ConfigError(f"model._target_={target} is {what}, not a flax.linen.Module subclass")
    return cls


def module_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _FLAX_FIELDS}


def check_config(cfg: ModelConfig) -> type[nn.Module]:
    """The module's class, once the config's keys fit it: no knob of the layer language, every
    field known (else the closest one is named) and every field without a default given."""
    given = [k for k in KNOBS if getattr(cfg, k) is not None]
    if given:
        raise ConfigError(
            f"model.{given[0]}={getattr(cfg, given[0])!r} is a knob of the layer language, which "
            f"model._target_={cfg._target_} does not read: give the module's own fields in "
            "model.fields"
        )
    if not isinstance(cfg.fields, Mapping):
        raise ConfigError(f"model.fields must be a mapping of field names, not {cfg.fields!r}")
    cls = module_class(cfg._target_)
    known = module_fields(cls)
    for key in cfg.fields:
        if key == "num_classes":
            raise ConfigError("model.num_classes is set by cnnlab to the data's classes: remove it")
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean model.{close[0]}?" if close else ""
            if key in KNOBS:
                hint += " (a knob of the layer language, which a module of one's own does not read)"
            raise ConfigError(
                f"unknown config key model.{key}: {cls.__name__} has no field {key}{hint}; its "
                f"fields: {', '.join(known) or 'none'}"
            )
    for key, spec in known.items():
        unset = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if unset and key != "num_classes" and key not in cfg.fields:
            raise ConfigError(f"model.{key} is required by {cls.__name__}: set +model.{key}=...")
    return cls


def build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The module of `cfg` with its fields, and `num_classes` = K where it has that field."""
    cls = check_config(cfg)
    values = {key: _hashable(value) for key, value in cfg.fields.items()}
    if "num_classes" in module_fields(cls):
        values["num_classes"] = num_classes
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the module's own checks of its fields
        raise ConfigError(f"model._target_={cfg._target_} refuses its fields: {e}") from e


def _hashable(value):
    """YAML's lists as tuples: jit hashes a module (it is part of `apply`), and lists are not."""
    return tuple(map(_hashable, value)) if isinstance(value, list | tuple) else value


def _text(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _shapes(tree) -> list[tuple[int, ...]]:
    """The shapes of the arrays in `tree` without their batch axis."""
    return [tuple(leaf.shape[1:]) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")]


@dataclasses.dataclass
class _Recorder:
    """Each submodule call's row, in the order the calls begin; stops at the first zero size."""

    calls: list = dataclasses.field(default_factory=list)  # [path, row or None while running]
    seen: set = dataclasses.field(default_factory=set)  # paths whose parameters are counted

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        path = "/".join(module.path)
        slot = len(self.calls)
        self.calls.append([path, None])
        try:
            out = next_fun(*args, **kwargs)
        except (TypeError, ValueError, ArithmeticError) as e:  # e.g. a shape an operation refuses
            what = f"submodule {path} ({type(module).__name__})" if path else "the module"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _Refused(f"{what} fails on a {_shape_list(args)} input: {first}") from None
        self.calls[slot][1], problem = self._row(module, path, args, out)
        if problem:  # after its row is in: the table shows the submodule that fails
            raise _Refused(problem)
        return out

    def _row(self, module: nn.Module, path: str, args, out) -> tuple[Layer, str]:
        """The call's row, and why its shapes are impossible ("" if they are not)."""
        own = {}
        if path not in self.seen:  # a shared submodule's parameters count once
            params = module.variables.get("params", {})
            own = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
            self.seen.add(path)
        outs = _shapes(out)
        kind = type(module).__name__
        params = sum(math.prod(v.shape) for v in own.values())
        macs = 0
        if isinstance(module, nn.Conv | nn.Dense) and "kernel" in own:  # at every output position
            macs = math.prod(own["kernel"].shape) * math.prod(outs[0][:-1] if outs else ())
        row = Layer(path or kind, "module", kind, outs[0] if outs else (), params, macs, None)
        zero = [f"{k} {_text(v.shape)}" for k, v in own.items() if 0 in v.shape]
        if not zero and not any(0 in shape for shape in [*_shapes(args), *outs]):
            return row, ""
        also = f", parameter {zero[0]}" if zero else ""
        empty = "feature map" if any(0 in shape for shape in outs) or not zero else "parameter"
        return row, (
            f"submodule {path or kind} ({kind}) gets a {_shape_list(args)} input and would "
            f"output {', '.join(map(_text, outs))}{also}: a zero-size {empty}, which JAX and "
            "Flax build without a word; change the fields that shrink it (stride, kernel, "
            "pooling) or use larger inputs"
        )

    def rows(self) -> list[Layer]:
        """The finished calls of leaf submodules and of modules with parameters of their own."""
        paths = [path for path, _ in self.calls]
        leaf = lambda p: not any(q != p and q.startswith(f"{p}/" if p else "") for q in paths)
        return [row for path, row in self.calls if row and (leaf(path) or row.params)]


def _shape_list(args) -> str:
    return ", ".join(_text(s) for s in _shapes(args)) or "no array"


class _Refused(Exception):
    """A submodule's zero-size shape or failure, raised while the module is traced."""


def layers(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[Layer]:
    """The table of the module of `cfg` on inputs of `input_shape` (*S, C): an input row, then
    one row per leaf submodule call. GeometryError, with the rows so far, for a zero-size shape,
    a call that fails, or an output other than the logits [B, K]."""
    module = build(cfg, num_classes)
    recorder = _Recorder()
    rows = [Layer("input", "input", "", tuple(input_shape), 0, 0, 1)]
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    key = jax.random.key(0)

    def init(x):  # as cnnlab.train.step.make_init calls it
        with nn.intercept_methods(recorder):
            return module.init(key, x)

    def train(variables, x):  # as the train step calls it
        return module.apply(
            variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )

    try:
        variables = jax.eval_shape(init, x)
        logits, _ = jax.eval_shape(train, variables, x)
    except _Refused as e:
        raise GeometryError(f"model._target_={cfg._target_}: {e}", rows + recorder.rows()) from None
    except (TypeError, FlaxError) as e:  # a __call__ without `train`, a missing PRNG key, ...
        raise ConfigError(
            f"model._target_={cfg._target_} cannot be called as cnnlab calls it (init(key, x), "
            f"apply(variables, x, train=True)): {str(e).strip().splitlines()[0]}; its __call__ "
            "must take (x, train=False)"
        ) from None
    if tuple(logits.shape) != (1, num_classes):
        raise GeometryError(
            f"model._target_={cfg._target_} outputs {_text(logits.shape)} for one "
            f"{_text(input_shape)} input, not the logits [B, K] = 1x{num_classes}",
            rows + recorder.rows(),
        )
    return rows + recorder.rows()


def one_image(module: nn.Module, variables: dict, x: jax.Array) -> list[tuple[str, np.ndarray]]:
    """(path, output) of every submodule call on one image x [1, *S, C], in the order they end."""
    _, state = module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    flat = flatten_dict(state["intermediates"])  # (*path, "__call__") -> (output, ...)
    return [("/".join(k[:-1]), np.asarray(out)) for k, outs in flat.items() for out in outs
            if k[:-1] and hasattr(out, "shape")]  # fmt: skip


def conv_kernels(params: Mapping) -> dict[str, np.ndarray]:
    """path -> the 4-D kernel [kh, kw, C, F] of each submodule that has one (a 2-D conv's)."""
    flat = flatten_dict(dict(params))
    return {
        "/".join(k[:-1]): np.asarray(v)
        for k, v in flat.items()
        if k[-1] == "kernel" and v.ndim == 4
    }


__all__ = ["build", "check_config", "conv_kernels", "layers", "module_class", "one_image"]
