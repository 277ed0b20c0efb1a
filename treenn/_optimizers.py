"""optax, in one place: what treenn knows of optimisers and their states.

- transforms: `check_transform`, and `update`, `tx.update` as `train_step` calls it
  (extra arguments for `GradientTransformationExtraArgs`, checked by signature);
- states: the placeholders a state holds for a parameter without state (`None`,
  `MaskedNode`), the state of a group (`MaskedState`), the copies of the model inside a
  state (`ModelCopies`, for `treenn.shard`'s rules);
- `treenn.migrate_opt_state`: a state carried across a change of the trainable set
  (gradual unfreezing).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._selectors import few
from ._transforms import (
    _first_static_difference as first_static_difference,
    combine,
    partition,
    trainable,
)
from ._tree import STOP_MODULE, by_type, check_model, dotted, flatten, is_module, unflatten


def check_transform(tx: Any, fn: str) -> None:
    """Reject what is not an optax transform before it fails deep inside optax."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{fn}: tx={tx!r} is not an optax transform (it needs `init` and `update`), "
            "e.g. `optax.adam(1e-3)`"
        )


def update(
    tx: Any, grads: Any, opt_state: Any, model: Any, value: Any, loss_at: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """`tx.update` inside `train_step`: transforms that take extra arguments (optax's
    `GradientTransformationExtraArgs`: `reduce_on_plateau`, `polyak_sgd`, `lbfgs`, any
    `optax.chain`) also get `value=` (the loss), `grad=` and `value_fn=`, the loss at
    given trainable arrays with the rest of `model` and the batch fixed (for `lbfgs`'s
    line search). `model` is the model the loss was taken at: its running statistics only
    matter to layers in evaluation mode, which do not change them."""
    params, rest = partition(model)
    extra = _takes_extra_args(tx)
    _check_update_signature(tx, extra)

    def value_fn(new_params: Any) -> Any:
        return loss_at(combine(new_params, rest))

    if not extra:
        return tx.update(grads, opt_state, params)
    return tx.update(grads, opt_state, params, value=value, grad=grads, value_fn=value_fn)


_EXTRA = ("value", "grad", "value_fn")


def _check_update_signature(tx: Any, extra: bool) -> None:
    """Refuse, before the call, an update that cannot take what `train_step` gives it:
    from its signature (an update without one, such as a C function, is just called)."""
    try:
        signature = inspect.signature(tx.update)
    except (TypeError, ValueError):
        return
    parameters = list(signature.parameters.values())
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    by_keyword = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    if extra and not any_keyword and not set(_EXTRA) <= by_keyword:
        refused = [name for name in _EXTRA if name not in by_keyword]
        raise TypeError(
            "train_step: tx is an optax.GradientTransformationExtraArgs, so its update gets "
            "value=, grad= and value_fn=, but it does not take them: its update must "
            f"accept **extra_args, as optax's do (it takes no {', '.join(refused)}: "
            f"update{signature})"
        )
    given = _EXTRA if extra else ()
    missing = [
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is inspect.Parameter.empty
        and p.name not in given
    ]
    if missing:
        needs = (
            f"{len(missing)} required keyword-only argument{'s' if len(missing) > 1 else ''}: "
            + ", ".join(repr(name) for name in missing)
        )
        gets = (
            "it gets value= (the loss), grad= and value_fn= (the loss at given trainable "
            "arrays) only"
            if extra
            else "tx is a plain optax.GradientTransformation, which gets no extra arguments "
            "(an optax.GradientTransformationExtraArgs gets value=, grad= and value_fn=)"
        )
        raise TypeError(
            f"train_step: tx.update needs {needs}, and {gets}; for other arguments call "
            f"tx.update in your own step (update{signature})"
        )


def _takes_extra_args(tx: Any) -> bool:
    optax = sys.modules.get("optax")
    extra = getattr(optax, "GradientTransformationExtraArgs", None)
    return extra is not None and isinstance(tx, extra)


def placeholder_types() -> tuple[type, ...]:
    """What an optimiser state holds where a parameter has no state: `None` (the place
    `treenn.trainable` leaves for a frozen array, a buffer or a non-array leaf) and
    optax's `MaskedNode` (an array that `optax.masked` / `multi_transform` / `muon` give
    to another group). Without optax imported, no state can hold a `MaskedNode`."""
    optax = sys.modules.get("optax")
    masked = getattr(optax, "MaskedNode", None)
    return (type(None),) if masked is None else (type(None), masked)


def is_placeholder(x: Any) -> bool:
    return isinstance(x, placeholder_types())


def _group_type() -> Any:
    """optax's `MaskedState`: the state of one group (`optax.masked`, and each group of
    `optax.multi_transform` / `partition` / `contrib.muon`), with its own step count."""
    optax = sys.modules.get("optax")
    return getattr(optax, "MaskedState", None)


def placeholder_stop() -> Any:
    kinds = placeholder_types()
    return by_type(lambda kind: issubclass(kind, kinds))


def _group_stop() -> Any:
    """Stops at placeholders and at groups' states."""
    group = _group_type()
    kinds = placeholder_types() + (() if group is None else (group,))
    return by_type(lambda kind: issubclass(kind, kinds))


def migrate_opt_state(tx: Any, opt_state: Any, model: Any) -> Any:
    """Carry an optax state over to the model's current trainable arrays.

    After `treenn.unfreeze` (or `freeze`) the trainable set changes, and so does the
    structure the optimiser expects. This builds `tx.init(treenn.trainable(model))` and
    copies into it everything `opt_state` already had: the moments of arrays that stay
    trainable and the step counts; arrays that just became trainable get fresh moments,
    and the state of arrays that became frozen is dropped. Partitioned transforms
    (`optax.multi_transform`, `optax.masked`, `optax.contrib.muon`) work too, so each
    group keeps its own learning rate through gradual unfreezing.

    Step counts. A group of `optax.multi_transform` (or `masked`, or `muon`) keeps its
    own state, step count included: a group that held no trainable array before starts
    afresh (count 0), so its new arrays train exactly as with a fresh optimiser. So does
    a whole state that held none. But a state with one count for all its arrays (plain
    `optax.adam`, or a group that already trained) cannot give new arrays a count of
    their own: they get zero moments and the old count, so Adam's bias correction is
    that of the old step count, not of a first step. The first update of such an array
    is `(1 - b1) / (1 - b1**t) * sqrt((1 - b2**t) / (1 - b2))` times a fresh Adam's,
    `t` the old count plus one: with optax's defaults 0.48x after 10 steps, about 1x
    after 100, 2.5x after 1,000, 3.2x after many. To have new arrays start fresh, give
    them their own group (`optax.multi_transform` over `treenn.labels(model, rules)`,
    the group frozen until its stage starts).

    **Arguments:**

    - `tx`: the optax transform `opt_state` was made by (rebuilt with the same
        hyperparameters if its labels or masks are trees made for the old trainable set).
    - `opt_state`: its state for an earlier trainable set of the same model.
    - `model`: the model with its new trainable set.

    **Returns:** the new optimiser state. Raises `ValueError` naming the paths when
    `opt_state` does not fit `tx` and the model (another model or transform), or when a
    state array is not kept per parameter (`optax.flatten`'s one vector), so its shape
    changes with the trainable set.

    !!! Example

        ```python
        model = treenn.unfreeze(model, "layer4.**")
        opt_state = treenn.migrate_opt_state(tx, opt_state, model)
        ```
    """
    check_model(model, "treenn.migrate_opt_state")
    check_transform(tx, "migrate_opt_state")
    fresh = tx.init(trainable(model))
    # A parameter without state is a placeholder (`None` or `MaskedNode`) in one state
    # and its moments in the other: stopping at placeholders lines the two up leaf by leaf.
    stop = placeholder_stop()
    new_paths, new_leaves, new_def = flatten(fresh, stop)
    old_paths, old_leaves, old_def = flatten(opt_state, stop)
    if new_def != old_def:
        raise ValueError(
            "migrate_opt_state: opt_state does not fit tx.init(treenn.trainable(model)); "
            + _difference(opt_state, fresh, (old_paths, old_leaves), (new_paths, new_leaves))
            + ". Pass the transform that made opt_state and the same model (any trainable set)"
        )
    return _carry(opt_state, fresh, ())


def _carry(old: Any, new: Any, prefix: tuple[Any, ...]) -> Any:
    """`new` (a fresh state) with what `old` had, the two of the same structure down to
    placeholders. A state (or a group's state) that held no parameter is left fresh."""
    if _holds_no_parameter(old):
        return new
    group = _group_type()
    paths, new_leaves, treedef = flatten(new, _group_stop())
    _, old_leaves, _ = flatten(old, _group_stop())
    merged = []
    for path, fresh, had in zip(paths, new_leaves, old_leaves):
        if group is not None and isinstance(fresh, group):
            # A group: its own state, step count included.
            merged.append(
                fresh._replace(
                    inner_state=_carry(had.inner_state, fresh.inner_state, (*prefix, *path, _INNER))
                )
            )
        elif is_placeholder(fresh) or is_placeholder(had):
            merged.append(fresh)  # newly trainable (fresh) or newly frozen (dropped)
        else:
            _check_same_kind(had, fresh, (*prefix, *path))
            merged.append(had)
    return unflatten(treedef, merged)


_INNER = jtu.GetAttrKey("inner_state")


def _holds_no_parameter(state: Any) -> bool:
    """Whether a state keeps per-parameter state (a copy of the model: moments) and
    every parameter place in it is empty: the state of a group that had no trainable
    array. (A state with no copy of the model, SGD's or a count alone, cannot tell.)"""
    _, leaves, _ = flatten(state, STOP_MODULE)
    copies = [x for x in leaves if is_module(x)]
    if not copies:
        return False
    stop = placeholder_stop()
    return all(is_placeholder(x) for copy in copies for x in flatten(copy, stop)[1])


def _check_same_kind(old: Any, new: Any, path: Any) -> None:
    if jnp.shape(new) != jnp.shape(old) or jnp.result_type(new) != jnp.result_type(old):
        raise ValueError(
            f"migrate_opt_state: opt_state holds {_kind(old)} at {dotted(path)!r}, where "
            f"tx.init(treenn.trainable(model)) has {_kind(new)}: either opt_state is not "
            "this transform's state for this model, or the transform keeps state that is "
            "not one array per parameter (such as optax.flatten's single vector), which "
            "cannot be carried across a change of the trainable set; start afresh with "
            "tx.init(treenn.trainable(model))"
        )


def _kind(x: Any) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def _difference(opt_state: Any, fresh: Any, old: Any, new: Any) -> str:
    """Where the two states differ: the state arrays only one side has (placeholders
    left out: they say nothing), or else the first module or state type that differs."""
    have = {dotted(p) for p, x in zip(*old) if not is_placeholder(x)}
    want = {dotted(p) for p, x in zip(*new) if not is_placeholder(x)}
    parts = []
    if have - want:
        parts.append(f"state only in opt_state: {few(sorted(have - want), 5)}")
    if want - have:
        parts.append(f"state only in the new one: {few(sorted(want - have), 5)}")
    if parts:
        return "; ".join(parts)
    static = first_static_difference(opt_state, fresh, "opt_state", "the new one")
    if "same paths" in static:
        return "the same state arrays, but other state types (another transform)"
    return static


# -- copies of the model inside a state (for treenn.shard's rules) -------------------------


def _is_optax_type(kind: type) -> bool:
    return kind.__module__.partition(".")[0] == "optax"


_STOP_OPTAX = by_type(_is_optax_type)


def holds_optax(tree: Any) -> bool:
    """Whether the tree is, or holds, an optax state."""
    _, leaves, _ = flatten(tree, _STOP_OPTAX)
    return any(_is_optax_type(type(x)) for x in leaves)


class ModelCopies:
    """The copies of a model inside an optimiser state, or a tree holding one: each
    outermost module, by dotted path (a state's `0.mu` and `0.nu`, the parts of a
    `(model, opt_state)` pair). `treenn.shard`'s rules apply within each copy as they do
    to the model. (Other trees have no copies, and keep full paths: in a dict of models,
    `"a.**"` means the model `a`.)"""

    def __init__(self, tree: Any):
        self.roots: dict[str, Any] = {}
        if not is_module(tree) and holds_optax(tree):
            paths, leaves, _ = flatten(tree, STOP_MODULE)
            self.roots = {dotted(p): x for p, x in zip(paths, leaves) if is_module(x)}

    def locate(self, path: str) -> tuple[str | None, str]:
        """`(root, path within it)`, or `(None, path)` outside every copy."""
        if self.roots:
            end = path.find(".")
            while end != -1:
                if path[:end] in self.roots:
                    return path[:end], path[end + 1 :]
                end = path.find(".", end + 1)
        return None, path

    def holed(self, root: str) -> Any:
        """The copy at `root` with each placeholder replaced by a distinct `_Hole`, so
        that a getter selecting one `None` does not select every `None`."""
        kinds = placeholder_types()
        return jax.tree.map(
            lambda x: _Hole() if isinstance(x, kinds) else x,
            self.roots[root],
            is_leaf=lambda x: isinstance(x, kinds),
        )


class _Hole:
    """Stands in for a placeholder while a getter runs on a copy."""

    __slots__ = ()
