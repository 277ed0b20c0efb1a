"""Modes: the one home of what a mode and a pin are.

A mode-bearing module is any Equinox module with an `inference` field holding a Python
`bool` leaf (treenn's layers, Equinox's, users'). A pin is a `Pinned` mark around that
bool (see `_status`), so every mode-bearing module can be pinned, with no extra field,
and `eqx.tree_at` on `inference` edits the bool inside the pin. `nn.eval_mode`,
`nn.train_mode`, `nn.unpin`, `nn.modes` and `nn.pinned` live here, with the switch of
`treenn.train_step`/`eval_step` (`for_step`) and the primitives checkpoints use
(`mode_of`, `with_mode`).
"""

from __future__ import annotations

import collections.abc as abc
from typing import Any, TypeVar

from ._caches import Cache
from ._module import fit_class, is_foreign_type
from ._selectors import Where, describe, few, no_match, select
from ._status import Pinned
from ._tree import (
    STOP_MODE_BEARING,
    by_type,
    check_model,
    dotted,
    inert,
    is_mode_bearing,
    map_stopped,
    mode_bearing_type,
    no_gc,
    replace_fields,
    state_of,
)

T = TypeVar("T")


def mode_of(module: Any) -> tuple[bool, bool]:
    """`(inference, pinned)` of a mode-bearing module."""
    value = state_of(module).get("inference")
    if type(value) is Pinned:
        return bool(value.value), True
    return bool(value), False


def with_mode(module: Any, inference: bool, pinned: bool) -> Any:
    """A mode-bearing module with the given mode and pin (`module` itself when it has
    them already)."""
    value: Any = state_of(module).get("inference")
    has_pin = type(value) is Pinned
    current = value.value if has_pin else value
    if has_pin == pinned and current is inference:
        return module  # unchanged: keep identity (cheaper, and jit caches stay warm)
    new = replace_fields(module, inference=Pinned(inference) if pinned else inference)
    # A plain Equinox layer holding a pin needs the class that reads through it.
    return fit_class(new) if is_foreign_type(type(new)) else new


def eval_mode(model: T, where: Where = None, *, pin: bool = False) -> T:
    """Put mode-bearing modules in evaluation mode (`inference=True`).

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors); `None` for all of them. A selected
        module's mode-bearing descendants are selected too.
    - `pin`: also pin the selected modules, so that later calls with `pin=False`
        (such as `nn.train_mode(model)` each epoch, or `treenn.train_step`) leave them in
        evaluation mode. Works on every mode-bearing module, Equinox's layers included.

    **Returns:** a new model; `model` is unchanged. With `pin=False`, pinned modules
    keep their mode; an explicit `where` whose every mode-bearing module is pinned is
    an error naming them (switch with `pin=True`, or `nn.unpin` first).
    (`eqx.nn.inference_mode` knows no pins: it switches pinned modules too.)

    !!! Example

        ```python
        model = nn.eval_mode(model, "backbone.**", pin=True)  # frozen-BN recipe
        model = nn.train_mode(model)   # the backbone's BatchNorm stays in eval
        ```
    """
    check_model(model, "nn.eval_mode")
    return _switch(model, where, inference=True, pin=pin, fn="nn.eval_mode")


def train_mode(model: T, where: Where = None, *, pin: bool = False) -> T:
    """Put mode-bearing modules in training mode (`inference=False`).

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which modules (see selectors); `None` for all of them.
    - `pin`: also pin them in training mode (MC dropout at evaluation time).

    **Returns:** a new model; pinned modules keep their mode unless `pin=True` (an
    explicit `where` whose every mode-bearing module is pinned is an error).

    !!! Example

        ```python
        model = nn.train_mode(nn.eval_mode(model), nn.Dropout, pin=True)  # MC dropout
        ```
    """
    check_model(model, "nn.train_mode")
    return _switch(model, where, inference=False, pin=pin, fn="nn.train_mode")


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
    return unpin_selected(model, where)


def unpin_selected(model: T, where: Any, *, strict: bool = True) -> T:
    """`nn.unpin`; with `strict=False` a selection without mode-bearing modules is no
    error (`treenn.unfreeze(..., unpin=True)` of a Linear)."""
    walk = _Walk(model, where)
    return walk.run(lambda m: with_mode(m, mode_of(m)[0], False), strict=strict)


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
    return {path: mode_of(m)[0] for path, m in mode_bearing(model)}


@no_gc()
def pinned(model: Any) -> dict[str, bool]:
    """Every mode-bearing module's pin, by dotted path.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** `{path: pinned}`.

    !!! Example

        ```python
        nn.pinned(nn.eval_mode(model, "bn", pin=True))  # {'bn': True, 'drop': False}
        ```
    """
    check_model(model, "nn.pinned")
    return {path: mode_of(m)[1] for path, m in mode_bearing(model)}


def mode_bearing(model: Any) -> list[tuple[str, Any]]:
    """`(dotted path, module)` of every mode-bearing module, pre-order."""
    found: list[tuple[Any, Any]] = []

    def visit(path: Any, module: Any) -> Any:
        # Visits come innermost first: put the module before its descendants.
        i, n = len(found), len(path)
        while i > 0 and len(found[i - 1][0]) > n and found[i - 1][0][:n] == path:
            i -= 1
        found.insert(i, (path, module))
        return module

    map_stopped(model, STOP_MODE_BEARING, visit)
    if is_mode_bearing(model):
        found.insert(0, ((), model))
    return [(dotted(path), module) for path, module in found]


_CLASS_STOPS: dict[Any, abc.Callable[[Any], bool]] = Cache()


def _class_stop(classes: Any) -> abc.Callable[[Any], bool]:
    """Stop at mode-bearing modules and at instances of `classes` (cached per classes)."""
    stop = _CLASS_STOPS.get(classes)
    if stop is None:
        stop = _CLASS_STOPS[classes] = by_type(
            lambda kind: mode_bearing_type(kind) or issubclass(kind, classes)
        )
    return stop


class _Walk:
    """One edit of the selected mode-bearing modules: which were covered, which were
    skipped because pinned."""

    def __init__(self, model: Any, where: Any):
        self.model = model
        self.where = where
        self.selection = select(where, model)
        self.covered = 0
        self.skipped: list[Any] = []  # pinned modules left alone (paths on error only)

    def run(
        self, edit: abc.Callable[[Any], Any], *, skip_pinned: bool = False, strict: bool = True
    ) -> Any:
        def act(module: Any) -> Any:
            self.covered += 1
            if skip_pinned and type(state_of(module).get("inference")) is Pinned:
                self.skipped.append(module)
                return module
            return edit(module)

        with no_gc():
            new = self._walk(act)
        if strict and self.selection is not None and self.covered == 0:
            raise no_match(
                self.where,
                "mode-bearing module (one with an `inference` field)",
                [p for p, _ in mode_bearing(self.model)],
            )
        return new

    def _walk(self, act: abc.Callable[[Any], Any]) -> Any:
        model, selection = self.model, self.selection
        if selection is None:
            new = map_stopped(model, STOP_MODE_BEARING, lambda _, m: act(m), paths=False)
            return act(new) if is_mode_bearing(model) else new
        if selection.classes is not None:
            return self._walk_classes(act, selection.classes)
        covers = selection.covers

        def visit(path: Any, module: Any) -> Any:
            return act(module) if covers(dotted(path)) else module

        new = map_stopped(model, STOP_MODE_BEARING, visit)
        return act(new) if is_mode_bearing(model) and covers("") else new

    def _walk_classes(self, act: abc.Callable[[Any], Any], classes: Any) -> Any:
        # No paths: a module is covered when it, or an ancestor, is an instance. Visits
        # are innermost first, so a selected container edits its whole subtree itself.
        def visit(_: Any, node: Any) -> Any:
            if not isinstance(node, classes):
                return node
            if inert(node):  # a leaf layer (Dropout): nothing inside to walk
                return act(node) if is_mode_bearing(node) else node
            inner = map_stopped(node, STOP_MODE_BEARING, lambda _, m: act(m), paths=False)
            return act(inner) if is_mode_bearing(node) else inner

        model = self.model
        if isinstance(model, classes):
            return visit(None, model)
        return map_stopped(model, _class_stop(classes), visit, paths=False)

    def pinned_paths(self) -> list[str]:
        """Dotted paths of the pinned modules `run` skipped."""
        skipped = {id(m) for m in self.skipped}
        return [p for p, m in mode_bearing(self.model) if id(m) in skipped]


def _switch(model: Any, where: Any, *, inference: bool, pin: bool, fn: str) -> Any:
    walk = _Walk(model, where)
    if pin:
        return walk.run(lambda m: with_mode(m, inference, True))
    new = walk.run(lambda m: with_mode(m, inference, False), skip_pinned=True)
    if walk.selection is not None and walk.skipped and len(walk.skipped) == walk.covered:
        paths = walk.pinned_paths()
        raise ValueError(
            f"{fn}: where={describe(where)} selects only pinned modules ({few(paths)}), "
            "which keep their mode, so the call would change nothing. Switch them with "
            f"`{fn}(model, where, pin=True)` (the pin stays), or `nn.unpin(model, where)` "
            "first"
        )
    return new


def for_step(model: T, inference: bool, fn: str) -> T:
    """The model as `treenn.train_step` (`inference=False`) or `eval_step` runs it.

    Pinned modules keep their mode. The unpinned ones are switched when they share one
    mode; when some are in the step's mode already and others are not, a switch could
    silently undo a mode the user set (an unpinned `nn.eval_mode` of a backbone), so
    this raises, naming the modules it would switch.
    """
    unpinned = [(path, m) for path, m in mode_bearing(model) if not mode_of(m)[1]]
    switch = [path for path, m in unpinned if mode_of(m)[0] is not inference]
    if not switch:
        return model
    if len(switch) < len(unpinned):
        have = "evaluation" if inference else "training"
        other = "training" if inference else "evaluation"
        keep = "nn.eval_mode" if not inference else "nn.train_mode"
        switch_fn = "nn.train_mode" if not inference else "nn.eval_mode"
        staying = [path or "<root>" for path, m in unpinned if mode_of(m)[0] is inference]
        raise ValueError(
            f"{fn}: the model's unpinned mode-bearing modules are in mixed modes: it would "
            f"switch {few([p or '<root>' for p in switch])} from {other} to {have} mode, "
            f"while {few(staying)} are in {have} mode already. It never overrides a mode "
            f"silently: to keep those modes, pin them (`{keep}(model, where, pin=True)`); "
            f"to run them in {have} mode, switch them first (`{switch_fn}(model, where)`)"
        )
    return _switch(model, None, inference=inference, pin=False, fn=fn)
