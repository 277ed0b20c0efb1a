"""State: `treenn.apply`, which returns the model with updated buffers.

Layers with state (BatchNorm's running statistics) compute their new values while they
run and *record* them into the context that the enclosing `treenn.apply` call owns;
`apply` then writes them into the model it returns. Nothing is threaded through
`__call__`, and since recording is a Python side effect at trace time it works the same
eagerly and under `jit`, `grad` (with `has_aux`), `vmap` of the whole call, and so on.

A recording that could not reach the returned model is an error, never a silent loss:
no enclosing `apply`, or a JAX transform (`lax.scan`, `vmap`, `checkpoint`...) opened
inside the model, whose values cannot leave it as a side effect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.extend.core as jex

from ._status import MARK_TYPES, marked_like
from ._tree import check_model, flatten, replace_fields, unflatten

T = TypeVar("T")


def _trace_state() -> Any:
    return jex.get_opaque_trace_state(convention="nnx")


class _Context:
    """The updates recorded during one `treenn.apply` call."""

    def __init__(self) -> None:
        self.trace = _trace_state()
        # id(module) -> (module, {field: new value}); the module is kept so the id
        # cannot be reused while the call runs.
        self.updates: dict[int, tuple[Any, dict[str, Any]]] = {}


_local = threading.local()


def _stack() -> list[_Context]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_value(module: Any, name: str, default: Any) -> Any:
    """The value `name` has so far in this `apply` call: a module called twice (weight
    sharing) updates from its first call's result, as in PyTorch."""
    stack = _stack()
    if stack:
        entry = stack[-1].updates.get(id(module))
        if entry is not None and name in entry[1]:
            return entry[1][name]
    return default


def record(module: Any, what: str, **values: Any) -> None:
    """Record new values for `module`'s state fields, to be written by `treenn.apply`.

    `what` names the module in errors (e.g. `"nn.BatchNorm(16)"`).
    """
    stack = _stack()
    if not stack:
        raise RuntimeError(
            f"{what} ran in training mode outside `treenn.apply`, so its updated running "
            "statistics would be lost. Call the model as `out, model = treenn.apply(model, "
            "x, key=key)`, or switch the layer to evaluation mode with `nn.eval_mode`."
        )
    context = stack[-1]
    if _trace_state() != context.trace:
        raise RuntimeError(
            f"{what} ran in training mode inside a JAX transform (lax.scan, vmap, "
            "checkpoint, cond...) opened inside the model; its running statistics cannot "
            "leave that transform and would be lost. Keep the layer outside the transform, "
            "apply the transform outside `treenn.apply`, or use `nn.eval_mode`."
        )
    entry = context.updates.setdefault(id(module), (module, {}))
    entry[1].update({k: jax.lax.stop_gradient(v) for k, v in values.items()})


def apply(model: T, *args: Any, **kwargs: Any) -> tuple[Any, T]:
    """Call `model(*args, **kwargs)` and return `(output, model)` with updated state.

    **Arguments:**

    - `model`: the model to call (a treenn or Equinox module, or any callable pytree).
    - `*args`, `**kwargs`: passed to the model, e.g. the input and `key=`.

    **Returns:** `(output, new_model)`: `new_model` is `model` with the state that the
    call updated (BatchNorm running statistics in training mode); everything else is
    shared with `model`.

    !!! Example

        ```python
        def loss_fn(model, x, y, key):
            logits, model = treenn.apply(model, x, key=key)
            return cross_entropy(logits, y), model

        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y, key)
        ```
    """
    check_model(model, "treenn.apply")
    if not callable(model):
        raise TypeError(
            f"treenn.apply: the model ({type(model).__name__}) is not callable; pass the "
            "model first, then its inputs: `treenn.apply(model, x, key=key)`"
        )
    return run(lambda m: m(*args, **kwargs), model)


def run(fn: Callable[[T], Any], model: T) -> tuple[Any, T]:
    """`fn(model)` with state collection: `(output, model with updated state)`.

    `treenn.apply` is `run(lambda m: m(x), model)`; `treenn.train_step` runs a whole
    loss function this way, so that a loss calling `model(x)` directly updates state.
    """
    context = _Context()
    stack = _stack()
    stack.append(context)
    try:
        out = fn(model)
    finally:
        stack.pop()
    if not context.updates:
        return out, model
    return out, _write(model, context.updates)


def _write(model: Any, updates: dict[int, tuple[Any, dict[str, Any]]]) -> Any:
    recorded = lambda x: id(x) in updates and updates[id(x)][0] is x  # noqa: E731
    paths, leaves, treedef = flatten(model, recorded)
    written = set()
    for i, leaf in enumerate(leaves):
        if type(leaf) not in MARK_TYPES and recorded(leaf):
            leaves[i] = _updated(leaf, updates[id(leaf)][1])
            written.add(id(leaf))
    root = id(model) in updates and updates[id(model)][0] is model
    if root:
        written.add(id(model))
    lost = [m for key, (m, _) in updates.items() if key not in written]
    if lost:
        raise RuntimeError(
            f"{type(lost[0]).__name__} updated its state inside `treenn.apply` but is not "
            "part of the model passed to it (created or replaced during the call), so the "
            "update would be lost."
        )
    if root:
        return _updated(model, updates[id(model)][1])
    return unflatten(treedef, leaves)


def _updated(module: Any, values: dict[str, Any]) -> Any:
    state = module.__dict__
    # Keep each field's status mark (a Buffer stays a Buffer).
    changes = {name: marked_like(state[name], value) for name, value in values.items()}
    return replace_fields(module, **changes)
