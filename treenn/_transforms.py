"""Transforms: partition/combine, gradients and updates over trainable arrays only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.tree_util as jtu

from ._caches import Cache
from ._edit import fit_classes
from ._selectors import few
from ._status import ARRAY_TYPES, Pinned, Status, status_of
from ._tree import (
    by_type,
    check_model,
    dotted,
    flatten,
    leaves,
    modules,
    state_of,
    static_fields,
)

T = TypeVar("T")


def _is_none(x: Any) -> bool:
    return x is None


# Leaves of a partition: `None`, status marks (by_type stops there) and pins, so that a
# pin is one non-trainable leaf and the trainable half's structure ignores it.
_PARTS = by_type(lambda kind: kind is type(None) or kind is Pinned)

_CANONICAL: dict[Any, Any] = Cache(maxsize=1024)


def _canonical(treedef: Any) -> Any:
    """`treedef` with each plain Equinox class that was given an unwrapping subclass
    (it holds a mark: a frozen array, a pin) back to its own class: the structure of a
    trainable half, which holds no mark. Optimiser states made from it do not depend on
    what is frozen or pinned elsewhere in a module, nor on modes. Cached per structure."""
    canonical = _CANONICAL.get(treedef)
    if canonical is None:
        template = treedef.unflatten([None] * treedef.num_leaves)
        canonical = _CANONICAL[treedef] = leaves(fit_classes(template), _PARTS)[1]
    return canonical


def partition(model: T) -> tuple[Any, Any]:
    """Split a model into its trainable arrays and everything else.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** `(trainable, rest)`, both with the model's structure: `trainable` holds
    the trainable floating-point arrays and `None` elsewhere; `rest` holds everything
    else (frozen arrays, buffers, non-array leaves) and `None` where `trainable` has an
    array. `treenn.combine(trainable, rest)` rebuilds the model.

    Modes and pins are not trainable: `trainable` holds `None` there, so an optimiser
    state made from it (and gradients) fit the model whatever its modes and pins are
    later. Rebuild with `treenn.combine`. (For Equinox's own `eqx.partition`/`combine`,
    use `treenn.filter_spec`.)

    !!! Example

        ```python
        params, rest = treenn.partition(model)
        opt_state = optax.adam(1e-3).init(params)
        ```
    """
    check_model(model, "treenn.partition")
    flat, treedef = leaves(model, _PARTS)
    train: list[Any] = []
    rest: list[Any] = []
    for leaf in flat:
        if status_of(leaf) is Status.TRAINABLE:
            train.append(leaf)
            rest.append(None)
        else:
            train.append(None)
            rest.append(leaf)
    return _canonical(treedef).unflatten(train), treedef.unflatten(rest)


def trainable(model: T) -> Any:
    """The trainable arrays of a model, `None` elsewhere: `treenn.partition(model)[0]`.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** a pytree with the model's structure, for optax:
    `opt_state = tx.init(treenn.trainable(model))`.

    !!! Example

        ```python
        opt_state = optax.adam(1e-3).init(treenn.trainable(model))
        ```
    """
    return partition(model)[0]


def combine(trainable: Any, rest: Any) -> Any:
    """Rebuild a model from `treenn.partition`'s two halves.

    **Arguments:**

    - `trainable`: the first half (or updated arrays of the same structure).
    - `rest`: the second half.

    **Returns:** the model. Raises `ValueError` naming the first differing path if the
    halves do not come from the same model structure.

    !!! Example

        ```python
        model = treenn.combine(*treenn.partition(model))
        ```
    """
    t_leaves, t_def = leaves(trainable, _PARTS)
    r_leaves, r_def = leaves(rest, _PARTS)
    if t_def != r_def and t_def != _canonical(r_def):
        raise ValueError("combine: " + structure_mismatch(trainable, rest, "trainable", "rest"))
    both = [
        i for i, (t, r) in enumerate(zip(t_leaves, r_leaves)) if t is not None and r is not None
    ]
    if both:
        paths = flatten(rest, _PARTS)[0]
        raise ValueError(
            f"combine: both halves hold a value at {few([dotted(paths[i]) for i in both], 5)}; "
            "pass the two halves of one `treenn.partition`"
        )
    return jtu.tree_unflatten(r_def, [r if t is None else t for t, r in zip(t_leaves, r_leaves)])


def structure_mismatch(a: Any, b: Any, a_name: str, b_name: str) -> str:
    """Describe where two trees' structures first differ, by dotted path."""
    a_paths, a_leaves, _ = flatten(a, _is_none)
    b_paths, b_leaves, _ = flatten(b, _is_none)
    a_names = [dotted(p) for p in a_paths]
    b_names = [dotted(p) for p in b_paths]
    only_a = sorted(set(a_names) - set(b_names))
    only_b = sorted(set(b_names) - set(a_names))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"paths only in {a_name}: {few(only_a, 5)}")
        if only_b:
            parts.append(f"paths only in {b_name}: {few(only_b, 5)}")
        return "structures differ; " + "; ".join(parts)
    return _first_static_difference(a, b, a_name, b_name)


def _first_static_difference(a: Any, b: Any, a_name: str, b_name: str) -> str:
    for (path, ma, _), (_, mb, _) in zip(modules(a), modules(b)):
        where = repr(dotted(path))
        if type(ma) is not type(mb):
            return f"at {where}: {a_name} has {type(ma).__name__}, {b_name} {type(mb).__name__}"
        if ma is None:
            continue
        for name in static_fields(type(ma)):
            va, vb = state_of(ma).get(name), state_of(mb).get(name)
            if va is not vb and va != vb:
                return f"at {where}: {name} is {va!r} in {a_name}, {vb!r} in {b_name}"
    return f"{a_name} and {b_name} have the same paths but different node types"


def apply_updates(model: T, updates: Any) -> T:
    """Add optimiser updates to a model's trainable arrays.

    **Arguments:**

    - `model`: the model being trained.
    - `updates`: updates with the structure of `treenn.trainable(model)`, as returned by
        `tx.update(grads, opt_state, treenn.trainable(model))`; `None` leaves leave
        their array unchanged.

    **Returns:** the updated model; frozen arrays, buffers and modes are unchanged and
    each array keeps its dtype.

    !!! Example

        ```python
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        model = treenn.apply_updates(model, updates)
        ```
    """
    params, rest = partition(model)
    p_leaves, p_def = leaves(params, _PARTS)
    u_leaves, u_def = leaves(updates, _PARTS)
    if p_def != u_def:
        raise ValueError(
            "apply_updates: updates do not match the model's trainable arrays; "
            + structure_mismatch(params, updates, "model", "updates")
        )
    paths = None
    new = []
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if p is None or u is None:
            new.append(p)
            continue
        if not isinstance(u, ARRAY_TYPES) or getattr(u, "shape", None) != p.shape:
            paths = paths or flatten(params, _PARTS)[0]
            raise ValueError(
                f"apply_updates: update for {dotted(paths[i])!r} has shape "
                f"{getattr(u, 'shape', type(u).__name__)}, the array has shape {p.shape}"
            )
        new.append((p + u).astype(p.dtype))
    return combine(jtu.tree_unflatten(p_def, new), rest)


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Like `jax.value_and_grad`, with respect to the trainable arrays of the first
    argument only.

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)` returning a scalar, or `(scalar, aux)` with
        `has_aux=True`. `aux` may hold anything, models included.
    - `has_aux`: whether `fn` returns auxiliary data.

    **Returns:** a function returning `(value, grads)`, or `((value, aux), grads)`;
    `grads` has the structure of `treenn.trainable(model)`. Frozen arrays and buffers
    get no gradient computed at all.

    !!! Example

        ```python
        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        ```
    """

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        params, rest = partition(model)
        static: list[Any] = []

        def differentiable(params: Any) -> Any:
            out = fn(combine(params, rest), *args, **kwargs)
            if not has_aux:
                return out
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{_name(fn)} was differentiated with has_aux=True, so it must return "
                    f"a pair (value, aux); it returned {type(out).__name__}"
                )
            value, aux = out
            # JAX's aux must be arrays: hand the rest back beside the transform.
            leaves, treedef = jtu.tree_flatten(aux)
            arrays = [x if isinstance(x, ARRAY_TYPES) else None for x in leaves]
            static.append((treedef, [None if isinstance(x, ARRAY_TYPES) else x for x in leaves]))
            return value, arrays

        result, grads = jax.value_and_grad(differentiable, has_aux=has_aux)(params)
        if not has_aux:
            return result, grads
        value, arrays = result
        treedef, others = static[-1]
        aux = jtu.tree_unflatten(treedef, [a if o is None else o for a, o in zip(arrays, others)])
        return (value, aux), grads

    return wrapper


def grad(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """Like `jax.grad`, with respect to the trainable arrays of the first argument only.

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)` returning a scalar, or `(scalar, aux)`.
    - `has_aux`: whether `fn` returns auxiliary data (anything, models included).

    **Returns:** a function returning `grads`, or `(grads, aux)` with `has_aux=True`, as
    in JAX; `grads` has the structure of `treenn.trainable(model)`.

    !!! Example

        ```python
        grads = treenn.grad(loss_fn)(model, x, y)
        ```
    """
    value_and_grad_fn = value_and_grad(fn, has_aux=has_aux)

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        value, grads = value_and_grad_fn(model, *args, **kwargs)
        if has_aux:
            return grads, value[1]
        return grads

    return wrapper


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
