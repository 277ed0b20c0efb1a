"""The one fill path of every loader: `treenn.load`, `treenn.load_pretrained` and
`treenn.load_torch` put arrays into a model through `fill`, so they place, mark and fill
abstract models (`jax.eval_shape`) alike, and settle an abstract model's modes alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._edit import each_mode_bearing
from ._modes import with_mode
from ._safetensors import CheckpointError
from ._selectors import few
from ._status import Pinned, is_array_leaf, marked_like, unmarked
from ._tree import dotted, is_mode_bearing, modules, state_of


def is_slot(leaf: Any) -> bool:
    """An array position of a model a loader fills: an array, a marked one, or an
    abstract one (`jax.eval_shape`'s `ShapeDtypeStruct`)."""
    return is_array_leaf(leaf) or isinstance(unmarked(leaf), jax.ShapeDtypeStruct)


def is_abstract(leaf: Any) -> bool:
    return isinstance(unmarked(leaf), jax.ShapeDtypeStruct)


def is_key_dtype(dtype: Any) -> bool:
    return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def layout(leaf: Any) -> tuple[tuple[int, ...], np.dtype[Any], str | None]:
    """What a slot holds as stored: `(shape, dtype, key implementation or None)`; a PRNG
    key as its raw data (`jax.random.key_data`)."""
    array = unmarked(leaf)
    if is_key_dtype(array.dtype):
        data = jax.eval_shape(jax.random.key_data, array)
        return tuple(data.shape), np.dtype(data.dtype), array.dtype._impl.name
    return tuple(array.shape), np.dtype(array.dtype), None


def describe(leaf: Any) -> str:
    shape, dtype, impl = layout(leaf)
    return f"key<{impl}>{list(shape)}" if impl else f"{dtype}{list(shape)}"


def _is_numpy(leaf: Any) -> bool:
    # NumPy leaves stay NumPy (jnp.asarray would truncate 64-bit values without x64).
    return isinstance(unmarked(leaf), (np.ndarray, np.generic))


_AS_LIKE = object()


def fill(leaf: Any, value: np.ndarray, *, impl: str | None = None, mark: Any = _AS_LIKE) -> Any:
    """`value` (a host array the caller owns) put where the model's `leaf` was.

    NumPy where the model held NumPy; otherwise a JAX array on `leaf`'s devices (its
    sharding, also an abstract leaf's when it has one); a PRNG key of implementation
    `impl` where given. `mark`: the status mark to wrap it in (`Frozen`, `Buffer` or
    `None`); by default `leaf`'s own.
    """
    array = unmarked(leaf)
    new: Any
    if _is_numpy(leaf):
        new = value
    elif isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
        new = jax.device_put(value, array.sharding)
    elif isinstance(array, jax.ShapeDtypeStruct) and array.sharding is not None:
        new = jax.device_put(value, array.sharding)
    else:
        new = jnp.asarray(value)
    if impl is not None:
        new = jax.random.wrap_key_data(new, impl=impl)
    if mark is _AS_LIKE:
        return marked_like(leaf, new)
    return new if mark is None else mark(new)


def array_slots(model: Any, paths: list[Any], leaves: list[Any]) -> list[str | None]:
    """The dotted path of each leaf a loader fills with an array, `None` for the others
    (an abstract model's `inference` flags included: modes are no arrays)."""
    modes = mode_paths(model)
    names: list[str | None] = []
    for p, leaf in zip(paths, leaves):
        name = dotted(p) if is_slot(leaf) else None
        names.append(None if name in modes else name)
    return names


def check_filled(fn: str, label: str, names: list[str | None], new: list[Any]) -> None:
    """An abstract model must come out whole: no `ShapeDtypeStruct` left in an array
    slot (`names`, from `array_slots`)."""
    unfilled = [n for n, x in zip(names, new) if n is not None and is_abstract(x)]
    if unfilled:
        raise CheckpointError(
            f"{fn}: the model is abstract (jax.eval_shape) and {label} does not fill "
            f"{len(unfilled)} of its arrays: {few(unfilled)}"
        )


def has_mode(module: Any) -> bool:
    # An optimiser state's copy of a mode-bearing module holds `None` (trainable()
    # leaves no bool): it has no mode to save or restore.
    return state_of(module).get("inference") is not None


def modal(model: Any) -> list[tuple[Any, Any]]:
    """`(path, module)` of every mode-bearing module holding a mode."""
    return [
        (p, m) for p, m, _ in modules(model) if m is not None and is_mode_bearing(m) and has_mode(m)
    ]


def mode_paths(model: Any) -> set[str]:
    """Dotted paths of the `inference` fields of mode-bearing modules: the metadata's
    modes carry them, not the scalars."""
    return {(f"{dotted(p)}.inference" if p else "inference") for p, _ in modal(model)}


def settle_modes(model: Any) -> Any:
    """An abstract model's modes made concrete, for the loaders that have no modes to
    give (`load_pretrained`, `load_torch`).

    `jax.eval_shape` turns each `inference` bool into a `ShapeDtypeStruct`, losing its
    value. An unpinned module comes back in training mode, as every layer is built (and
    as `train_step`/`eval_step` switch it anyway); a pinned one is an error, since its
    pinned mode is lost (`eqx.filter_eval_shape` keeps it).
    """
    lost = []

    def settle(p: Any, module: Any) -> Any:
        raw = state_of(module).get("inference")
        pinned = type(raw) is Pinned
        value = raw.value if type(raw) is Pinned else raw  # (mypy narrows only here)
        if not isinstance(value, jax.ShapeDtypeStruct):
            return module
        if pinned:
            lost.append(dotted(p))
        return with_mode(module, False, pinned)

    model = each_mode_bearing(model, settle)
    if lost:
        raise CheckpointError(
            f"the model is abstract and pins {few(lost)}, whose pinned modes "
            "jax.eval_shape lost; build it with eqx.filter_eval_shape, or pin after loading"
        )
    return model


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `treenn.load_pretrained` (or `treenn.load_torch(..., report=True)`) matched,
    like PyTorch's `load_state_dict(strict=False)`. Made by those loaders, not by users;
    every list holds dotted paths.

    **Arguments:** (its fields)

    - `loaded`: paths filled from the file.
    - `missing`: paths of the model the file lacks (kept as initialised: a new head).
    - `unexpected`: paths of the file the model lacks (ignored: an old head).
    - `skipped`: paths in both whose shape or dtype differ (kept as initialised), when
        `skip_mismatched=True`.

    **Returns:** a frozen dataclass with those four fields.

    !!! Example

        ```python
        model, report = treenn.load_pretrained(
            "pretrained.safetensors", new_model, skip_mismatched=True
        )
        print(report.skipped)  # ['layers.2.weight', 'layers.2.bias']: a new head size
        assert not report.missing and not report.unexpected
        ```
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[str]
