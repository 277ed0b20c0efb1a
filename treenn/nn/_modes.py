"""Modes: switching `inference` on mode-bearing modules by tree surgery.

A mode-bearing module is any Equinox module with an `inference` field. treenn's layers
also have a `pinned` field: a pinned module keeps its mode through later unpinned calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .._selectors import Where, no_match, select
from .._tree import (
    STOP_MODE_BEARING,
    check_model,
    dotted,
    field_names,
    is_mode_bearing,
    map_stopped,
    modules,
    no_gc,
    replace_fields,
    state_of,
)

T = TypeVar("T")


def eval_mode(model: T, where: Where = None, *, pin: bool = False) -> T:
    """Put mode-bearing modules in evaluation mode (`inference=True`).

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors); `None` for all of them. A selected
        module's mode-bearing descendants are selected too.
    - `pin`: also pin the selected modules, so that later calls with `pin=False`
        (such as `nn.train_mode(model)` each epoch) leave them in evaluation mode.

    **Returns:** a new model; `model` is unchanged. Pinned modules are skipped unless
    `pin=True`.

    !!! Example

        ```python
        model = nn.eval_mode(model, "backbone.**", pin=True)  # frozen-BN recipe
        model = nn.train_mode(model)   # the backbone's BatchNorm stays in eval
        ```
    """
    check_model(model, "nn.eval_mode")
    return _switch(model, where, inference=True, pin=pin)


def train_mode(model: T, where: Where = None, *, pin: bool = False) -> T:
    """Put mode-bearing modules in training mode (`inference=False`).

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors); `None` for all of them.
    - `pin`: also pin them in training mode (MC dropout at evaluation time).

    **Returns:** a new model; pinned modules are skipped unless `pin=True`.

    !!! Example

        ```python
        model = nn.train_mode(nn.eval_mode(model), nn.Dropout, pin=True)  # MC dropout
        ```
    """
    check_model(model, "nn.train_mode")
    return _switch(model, where, inference=False, pin=pin)


def unpin(model: T, where: Where = None) -> T:
    """Remove pins without changing modes.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors); `None` for all of them.

    **Returns:** a new model.

    !!! Example

        ```python
        model = nn.unpin(model, "backbone.**")
        ```
    """
    check_model(model, "nn.unpin")
    return _edit(model, where, lambda path, m: _with(m, pinned=False) if _pinned(m) else m)


@no_gc()
def modes(model: Any) -> dict[str, bool]:
    """Every mode-bearing module's `inference` flag, by dotted path.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** `{path: inference}`, `True` meaning evaluation mode; the root's path is
    `""`.

    !!! Example

        ```python
        nn.modes(model)  # {'backbone.bn1': True, 'dropout': False}
        ```
    """
    check_model(model, "nn.modes")
    return {
        dotted(path): bool(module.inference)
        for path, module, _ in modules(model)
        if module is not None and is_mode_bearing(module)
    }


@no_gc()
def pinned(model: Any) -> dict[str, bool]:
    """Every mode-bearing module's pin, by dotted path (`False` where it cannot pin)."""
    check_model(model, "nn.pinned")
    return {
        dotted(path): _pinned(module)
        for path, module, _ in modules(model)
        if module is not None and is_mode_bearing(module)
    }


def _pinned(module: Any) -> bool:
    return bool(state_of(module).get("pinned", False))


def _with(module: Any, **changes: Any) -> Any:
    state = state_of(module)
    if all(state.get(k) is v for k, v in changes.items()):
        return module  # unchanged: keep identity (cheaper, and jit caches stay warm)
    return replace_fields(module, **changes)


def _switch(model: Any, where: Any, *, inference: bool, pin: bool) -> Any:
    def edit(path: Any, module: Any) -> Any:
        if pin:
            if "pinned" not in field_names(type(module)):
                raise ValueError(
                    f"cannot pin {type(module).__module__}.{type(module).__qualname__} at "
                    f"{dotted(path)!r}: it has no `pinned` field. Use the treenn.nn layer, "
                    "or switch it without pin=True"
                )
            return _with(module, inference=inference, pinned=True)
        state = state_of(module)
        if state.get("pinned", False) or state.get("inference") is inference:
            return module
        return replace_fields(module, inference=inference)

    return _edit(model, where, edit, paths_for_edit=pin)


@no_gc()
def _edit(model: Any, where: Any, edit: Any, *, paths_for_edit: bool = False) -> Any:
    selection = select(where, model)
    seen: list[str] = []
    acted = False

    def visit(path: Any, module: Any) -> Any:
        nonlocal acted
        if selection is not None:
            name = dotted(path)
            seen.append(name)
            if not selection.covers(name):
                return module
        acted = True
        return edit(path, module)

    paths = selection is not None or paths_for_edit
    new = map_stopped(model, STOP_MODE_BEARING, visit, paths=paths)
    if is_mode_bearing(model):
        new = visit((), new)
    if selection is not None and not acted:
        raise no_match(where, "mode-bearing module (one with an `inference` field)", seen)
    return new


_STATIC_MODE_FIELDS: dict[type, tuple[str, ...]] = {}


def _static_mode_fields(kind: type) -> tuple[str, ...]:
    names = _STATIC_MODE_FIELDS.get(kind)
    if names is None:
        names = _STATIC_MODE_FIELDS[kind] = tuple(
            f.name
            for f in dataclasses.fields(kind)
            if f.name in ("inference", "pinned") and f.metadata.get("static", False)
        )
    return names


def _default_mode(_: Any, module: Any) -> Any:
    state = state_of(module)
    changes = {k: False for k in _static_mode_fields(type(module)) if state.get(k) is not False}
    return replace_fields(module, **changes) if changes else module


def mode_free(tree: Any) -> Any:
    """`tree` with every static mode field (`inference`, `pinned` of treenn's layers)
    reset to `False`.

    Static fields are part of a pytree's structure. Trees of trainable arrays (what
    optax sees) are given default modes, so that an optimiser state, and gradients, do
    not depend on the modes the model was in.
    """
    tree = map_stopped(tree, STOP_MODE_BEARING, _default_mode, paths=False)
    return _default_mode(None, tree) if is_mode_bearing(tree) else tree
