"""Training and evaluation steps that set modes themselves.

`treenn.train_step` runs the model's unpinned mode-bearing modules in training mode and
`treenn.eval_step` runs them in evaluation mode, so forgetting `model.eval()` cannot
happen on this path (PyTorch Lightning does the same). Pins are respected: a BatchNorm
pinned in eval stays in eval inside a training step. A switch never overrides a mode
silently: when the unpinned modules are in mixed modes (an unpinned `nn.eval_mode` of
a backbone), the step raises, naming them (see `_modes.for_step`). The switch happens
while the step is traced, so it costs nothing per call, and the model comes back with
the modes it went in with: only its arrays (parameters and buffers) change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._jit import Donate, jit
from ._modes import for_step
from ._optimizers import check_transform, update
from ._selectors import few
from ._state import run
from ._status import is_array, is_mark
from ._transforms import apply_updates, trainable, value_and_grad
from ._tree import dotted, flatten, leaves, unflatten


def _arrays_into(model: Any, updated: Any) -> Any:
    """`model`'s structure and modes with `updated`'s arrays (and buffers)."""
    old, treedef = leaves(model)
    new, _ = leaves(updated)
    return unflatten(treedef, [n if is_array(n) or is_mark(n) else o for o, n in zip(old, new)])


def train_step(
    loss_fn: Callable[..., Any],
    tx: Any,
    *,
    has_aux: bool = False,
    donate: Donate = "none",
) -> Callable[..., Any]:
    """Build a compiled training step: gradient, optimiser update, state update.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *args, **kwargs)` returning a scalar loss, or
        `(loss, aux)` with `has_aux=True`. It may call the model directly: BatchNorm
        running statistics are collected as by `treenn.apply`. Where it runs the model
        through `treenn.apply` inside a JAX transform (`lax.scan` over micro-batches,
        an `eqx.filter_vmap` ensemble, `eqx.filter_checkpoint`), the statistics leave
        the transform only in the model it returns: return that model as `aux` (or as
        an element of a tuple, list or dict `aux`), and the step takes its statistics.
        Not returning it is an error naming the layer, never a silent loss.
    - `tx`: an optax transform; its state is `tx.init(treenn.trainable(model))`.
    - `has_aux`: whether `loss_fn` returns auxiliary data.
    - `donate`: as for `treenn.jit` (`"all-except-first"` reuses the optimiser state's
        buffers).

    **Returns:** `step(model, opt_state, *args, **kwargs) -> (model, opt_state, loss)`, or
    `(model, opt_state, (loss, aux))`. Inside the step every unpinned mode-bearing module
    is in training mode; the returned model has the modes the input had. Unpinned
    modules in mixed modes are an error naming them: pin the ones that keep their mode
    (`nn.eval_mode(model, where, pin=True)`) or switch them first (`nn.train_mode`).

    !!! Example

        ```python
        step = treenn.train_step(lambda m, x, y, key: xent(m(x, key=key), y), optax.adam(1e-3))
        for x, y in batches:
            model, opt_state, loss = step(model, opt_state, x, y, key)
        ```
    """

    def collecting(model: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        out, model = run(lambda m: loss_fn(m, *args, **kwargs), model, kind="loss", returns=_aux)
        loss, aux = out if has_aux else (out, None)
        return loss, (aux, model)

    def _aux(out: Any) -> Any:
        # Where the loss may return the model (that a transform gave back).
        if has_aux and isinstance(out, tuple) and len(out) == 2:
            return out[1]
        return None

    check_transform(tx, "train_step")
    grad_fn = value_and_grad(collecting, has_aux=True)

    def step(model: Any, opt_state: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        _check_opt_state(tx, opt_state, model)  # at trace time only
        running = for_step(model, False, "treenn.train_step")
        (loss, (aux, updated)), grads = grad_fn(running, *args, **kwargs)
        # value=/grad=/value_fn= for transforms that take them (lbfgs, reduce_on_plateau)
        loss_at = lambda m: collecting(m, *args, **kwargs)[0]  # noqa: E731
        updates, opt_state = update(tx, grads, opt_state, updated, loss, loss_at)
        updated = apply_updates(updated, updates)
        return _arrays_into(model, updated), opt_state, ((loss, aux) if has_aux else loss)

    return jit(step, donate=donate)


def _check_opt_state(tx: Any, opt_state: Any, model: Any) -> None:
    expected = jax.eval_shape(tx.init, trainable(model))
    if leaves(expected)[1] == leaves(opt_state)[1]:
        return
    # Without `None`s (a frozen array's place in the state) the trainable sets differ by path.
    have = {dotted(p) for p in flatten(opt_state)[0]}
    want = {dotted(p) for p in flatten(expected)[0]}
    raise ValueError(
        "train_step: opt_state does not fit the model's trainable arrays (state only in "
        f"opt_state: {few(sorted(have - want), 5) or 'none'}; only in "
        f"tx.init(trainable(model)): {few(sorted(want - have), 5) or 'none'}). After "
        "freeze/unfreeze, carry it over with treenn.migrate_opt_state"
    )


def eval_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Build a compiled evaluation step: `fn` runs on the model in evaluation mode.

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)`, e.g. returning logits or a metric.

    **Returns:** `step(model, *args, **kwargs) -> fn(nn.eval_mode(model), ...)`; pinned
    modules keep their mode (a dropout pinned in training mode still samples: MC dropout).
    Unpinned modules in mixed modes are an error naming them, as in `train_step`.

    !!! Example

        ```python
        predict = treenn.eval_step(lambda m, x: jnp.argmax(m(x), -1))
        labels = predict(model, x)
        ```
    """

    def step(model: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(for_step(model, True, "treenn.eval_step"), *args, **kwargs)

    return jit(step)
