"""State: `treenn.apply`, which returns the model with updated buffers.

Layers with state (BatchNorm's running statistics) compute their new values while they
run and *record* them into the context that the enclosing `treenn.apply` call owns;
`apply` then writes them into the model it returns. Nothing is threaded through
`__call__`, and since recording is a Python side effect at trace time it works the same
eagerly and under `jit`, `grad` (with `has_aux`), `vmap` of the whole call, and so on.

An `apply` nested in another (or in `treenn.train_step`) records into the outermost
one too, so the statistics reach the model the outermost call returns.

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
    """The updates recorded during one `treenn.apply` call.

    An `apply` nested in another one (a loss calling `treenn.apply` inside
    `treenn.train_step`, an `apply` inside a model's `__call__`) shares the enclosing
    call's records when it runs at the same trace level: it returns its own updated
    model as usual, and the updates also reach the model the outermost call returns.
    """

    # key -> (module, {field: new value}); the module is kept so that the id cannot be
    # reused while the call runs.
    updates: dict[int, tuple[Any, dict[str, Any]]]
    # id(module a nested apply returned) -> (that module, key of its original)
    aliases: dict[int, tuple[Any, int]]
    # keys a nested apply wrote into the model it returned
    delivered: set[int]

    def __init__(self, outer: _Context | None) -> None:
        self.trace = _trace_state()
        self.nested = outer is not None and outer.trace == self.trace
        if outer is not None and self.nested:
            self.updates, self.aliases = outer.updates, outer.aliases
            self.delivered = outer.delivered
        else:
            self.updates, self.aliases, self.delivered = {}, {}, set()

    def key(self, module: Any) -> int:
        """The key of `module`'s records: its own id, or its original's when it is a
        module a nested `apply` returned (a second nested call updates the first's)."""
        alias = self.aliases.get(id(module))
        if alias is not None and alias[0] is module:
            return alias[1]
        return id(module)

    def entry(self, module: Any) -> tuple[int, dict[str, Any]] | None:
        key = self.key(module)
        entry = self.updates.get(key)
        if entry is None or (key == id(module) and entry[0] is not module):
            return None
        return key, entry[1]


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
        entry = stack[-1].entry(module)
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
    entry = context.updates.setdefault(context.key(module), (module, {}))
    entry[1].update({k: jax.lax.stop_gradient(v) for k, v in values.items()})


def apply(model: T, *args: Any, **kwargs: Any) -> tuple[Any, T]:
    """Call `model(*args, **kwargs)` and return `(output, model)` with updated state.

    **Arguments:**

    - `model`: the model to call (a treenn or Equinox module, or any callable pytree).
    - `*args`, `**kwargs`: passed to the model, e.g. the input and `key=`.

    **Returns:** `(output, new_model)`: `new_model` is `model` with the state that the
    call updated (BatchNorm running statistics in training mode); everything else is
    shared with `model`. Called inside another `apply` (or a loss of
    `treenn.train_step`), the updates also reach the model the outermost call returns.

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
    stack = _stack()
    context = _Context(stack[-1] if stack else None)
    stack.append(context)
    try:
        out = fn(model)
    finally:
        stack.pop()
    if not context.updates:
        return out, model
    return out, _write(model, context)


def _write(model: Any, context: _Context) -> Any:
    """`model` with the recorded updates of its modules. The outermost call also checks
    that no update is lost; a nested one leaves that to it."""
    found: dict[int, int] = {}  # id(module in model) -> key of its records

    def recorded(x: Any) -> bool:
        entry = context.entry(x)
        if entry is not None:
            found[id(x)] = entry[0]
        return entry is not None

    paths, leaves, treedef = flatten(model, recorded)
    written = set()
    for i, leaf in enumerate(leaves):
        if type(leaf) not in MARK_TYPES and id(leaf) in found:
            leaves[i] = _updated(context, leaf, found[id(leaf)])
            written.add(found[id(leaf)])
    root = recorded(model)
    if root:
        written.add(found[id(model)])
    if context.nested:
        context.delivered.update(written)
    else:
        lost = [
            m
            for key, (m, _) in context.updates.items()
            if key not in written and key not in context.delivered
        ]
        if lost:
            raise RuntimeError(
                f"{type(lost[0]).__name__} updated its state inside `treenn.apply` but is "
                "not part of the model passed to it (created or replaced during the call), "
                "so the update would be lost."
            )
    if root:
        return _updated(context, model, found[id(model)])
    return unflatten(treedef, leaves)


def _updated(context: _Context, module: Any, key: int) -> Any:
    values = context.updates[key][1]
    state = module.__dict__
    # Keep each field's status mark (a Buffer stays a Buffer).
    changes = {name: marked_like(state[name], value) for name, value in values.items()}
    new = replace_fields(module, **changes)
    if context.nested:
        context.aliases[id(new)] = (new, key)
    return new
