"""Activation checkpointing by selector: `treenn.remat`.

A rematerialised module is an instance of a subclass of its own class, made here once
per `(class, policy)` pair: `RematBlock` is a `Block`, with the same fields (so the same
paths, statuses and modes), whose `__call__` runs `Block.__call__` under
`jax.checkpoint`. The class is the only thing that changes, so the policy is part of
the model's tree structure (`treenn.jit` and `eqx.filter_jit` retrace when it changes,
`treenn.load(path, like)` gives a model of `like`'s classes), and it is decided by what
the module holds: its own class and the policy. Generated classes are treenn
`Module`s, so they read through marks by themselves whatever their base (an
`eqx.nn.Linear` holding a frozen weight stays a `RematLinear`); they pickle and
deep-copy as their base class plus the policy (`__reduce__`), so pickles never refer
to them.

Statistics: the call inside the checkpoint runs through `treenn._state.run`, and its
result leaves the checkpoint through `treenn._state.through`, which records what a
training-mode BatchNorm inside updated into the enclosing `treenn.apply` (or
`train_step`), as if it had run without the checkpoint.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import equinox as eqx

from ._edit import Edit, edit
from ._module import Module, build, original_class
from ._selectors import Where, no_match, select
from ._state import run, through
from ._tree import check_model, dotted, modules, state_of

T = TypeVar("T")

_KIND = "callable module (an Equinox module with a __call__)"


class Rematerialised(Module):
    """The mixin of every class `treenn.remat` makes: `__call__` runs the base class's
    `__call__` under `jax.checkpoint` with the class's policy."""

    # (base class, policy), set on each generated class (a tuple: Equinox would turn a
    # function stored on the class into a method).
    _remat: ClassVar[tuple[type, Any]]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        base, policy = type(self)._remat
        call = base.__call__

        def inner(module: Any, *a: Any, **k: Any) -> tuple[Any, Any]:
            # The base class's call, on this module (not a base-class copy), so that
            # statistics recorded for it, or for what it holds, name the model's modules.
            return run(lambda m: call(m, *a, **k), module)

        checkpointed = eqx.filter_checkpoint(inner, policy=policy)
        return through(self, lambda m: checkpointed(m, *args, **kwargs))

    def __reduce__(self) -> tuple[Any, ...]:
        base, policy = type(self)._remat
        return (_rebuild, (base, policy, dict(state_of(self))))


# (base class, policy) -> its rematerialised class. Weak: a class goes with the last
# module of it (a policy made by a factory, `save_only_these_names(...)`, is a new
# function each call). Not a `Cache`: `clear_caches` must not give live models' classes
# a twin, which would change their tree structure.
_CLASSES: weakref.WeakValueDictionary[tuple[type, Any], type] = weakref.WeakValueDictionary()


def remat_class(base: type, policy: Any) -> type:
    """The rematerialised class of `base` (a module class, not itself rematerialised)
    with `policy`; one per pair."""
    key = (base, policy)
    cls = _CLASSES.get(key)
    if cls is None:
        namespace = {
            "__module__": __name__,
            "__qualname__": "Remat" + base.__qualname__.rsplit(".", 1)[-1],
            "_remat": (base, policy),
        }
        cls = type("Remat" + base.__name__, (Rematerialised, base), namespace)
        _CLASSES[key] = cls
    return cls


def _rebuild(base: type, policy: Any, state: dict[str, Any]) -> Any:
    """Unpickle (or deep-copy) a rematerialised module."""
    return build(remat_class(base, policy), state)


def base_class(kind: type) -> type:
    """The class a module of class `kind` has without remat (and without marks)."""
    if issubclass(kind, Rematerialised):
        return kind._remat[0]
    return original_class(kind)


def policy_of(module: Any) -> Any:
    """`False` when `module` is not rematerialised, else its policy (`None`: JAX's
    default, save nothing but the inputs)."""
    kind = type(module)
    return kind._remat[1] if issubclass(kind, Rematerialised) else False


def _callable_type(kind: type) -> bool:
    """A module class with a `__call__` of its own (its class's or a base's)."""
    if not issubclass(kind, eqx.Module):
        return False
    return any("__call__" in vars(c) for c in kind.__mro__ if c is not object)


class _Covered(Edit):
    """Collects the dotted paths of the callable modules a selection covers."""

    needs_paths = True

    @staticmethod
    def target_type(kind: type) -> bool:
        return _callable_type(kind)

    def __init__(self) -> None:
        self.paths: list[str] = []

    def module(self, path: Any, module: Any) -> Any:
        self.paths.append(dotted(path))
        return module


def _outermost(paths: list[str]) -> frozenset[str]:
    """The paths of `paths` with no ancestor in it: selecting a block selects the
    layers inside it too, and a checkpoint inside a checkpoint would only add one more
    recomputation, so only the outermost selected modules are rematerialised."""
    found = set(paths)
    if "" in found:
        return frozenset({""})
    top = set()
    for path in paths:
        parts = path.split(".")
        if not any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            top.add(path)
    return frozenset(top)


class _Remat(Edit):
    """`remat`'s surgery: the outermost selected modules as their rematerialised class."""

    needs_paths = True

    @staticmethod
    def target_type(kind: type) -> bool:
        return _callable_type(kind)

    def __init__(self, top: frozenset[str], policy: Any) -> None:
        self.top = top
        self.policy = policy

    def module(self, path: Any, module: Any) -> Any:
        if dotted(path) not in self.top:
            return module
        cls = remat_class(base_class(type(module)), self.policy)
        if type(module) is cls:
            return module
        return build(cls, dict(state_of(module)))


class _Unremat(Edit):
    """`remat(..., policy=False)`'s surgery: every selected rematerialised module as
    its base class."""

    @staticmethod
    def target_type(kind: type) -> bool:
        return issubclass(kind, Rematerialised)

    def module(self, path: Any, module: Any) -> Any:
        return build(base_class(type(module)), dict(state_of(module)))


def _check_policy(policy: Any) -> None:
    if policy is None or policy is False:
        return
    if policy is True or not callable(policy):
        raise TypeError(
            f"treenn.remat: policy={policy!r} is not a checkpoint policy; pass one of "
            "`jax.checkpoint_policies` (e.g. `jax.checkpoint_policies.dots_saveable`), "
            "None (save nothing but each module's inputs), or False to remove remat"
        )
    try:
        hash(policy)
    except TypeError as err:
        raise TypeError(
            f"treenn.remat: policy={policy!r} is not hashable; the policy is part of the "
            "model's structure (jit retraces when it changes), so it must be hashable, as "
            "the functions of `jax.checkpoint_policies` are"
        ) from err


def remat(model: T, where: Where, *, policy: Callable[..., bool] | bool | None = None) -> T:
    """Rematerialise (activation checkpointing, gradient checkpointing) the selected
    modules: each call runs under `jax.checkpoint`, so the backward pass recomputes
    what happens inside the module instead of keeping it in memory from the forward
    pass.

    Each selected module becomes a subclass of its own class (`Block` -> `RematBlock`,
    still a `Block`), with the same fields: paths, statuses (frozen, trainable,
    buffers), modes and pins are unchanged, and outputs and gradients equal the
    model's without remat, frozen layers and LoRA adapters inside included. A
    BatchNorm inside in training mode records its running statistics through
    `treenn.apply` and `treenn.train_step` as without remat. The policy is part of the
    model's structure: `treenn.jit` retraces when it changes, `treenn.load(path, like)`
    gives a model rematerialised as `like` is, and pickles keep it.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors): `"blocks.*"`, a class such as `Block`, a
        getter... Selecting a module selects what is inside it too; only the outermost
        selected modules with a `__call__` are rematerialised (a checkpoint inside a
        checkpoint would only recompute more), so `"blocks.*"` checkpoints each block,
        and `None` the whole model's call.
    - `policy`: which intermediate values the forward pass may keep (one of
        `jax.checkpoint_policies`, e.g. `dots_saveable` keeps matrix products). `None`
        keeps nothing but each module's inputs. A selected module rematerialised
        before gets the new policy. `False` removes remat from every selected module
        (the outermost ones and those inside them) and leaves the rest unchanged.

    **Returns:** the new model; `model` is unchanged. Raises `ValueError` naming the
    selector when it selects no module with a `__call__`, and `TypeError` for a
    `policy` that is not a checkpoint policy.

    !!! Example

        ```python
        model = treenn.remat(model, "blocks.*")  # each block recomputed in backward
        model = treenn.remat(model, "blocks.*", policy=jax.checkpoint_policies.dots_saveable)
        model = treenn.remat(model, None, policy=False)  # no remat anywhere
        ```
    """
    check_model(model, "treenn.remat")
    _check_policy(policy)
    selection = select(where, model)
    covered = _Covered()
    edit(model, selection, covered)
    if not covered.paths:
        if where is None:
            raise ValueError(f"treenn.remat: the model has no {_KIND}")
        candidates = [
            dotted(p) for p, m, _ in modules(model) if m is not None and _callable_type(type(m))
        ]
        raise no_match(where, _KIND, candidates)
    if policy is False:
        return edit(model, selection, _Unremat())
    return edit(model, selection, _Remat(_outermost(covered.paths), policy))
