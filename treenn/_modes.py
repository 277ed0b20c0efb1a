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

from typing import Any, TypeVar

from ._edit import Edit, edit
from ._module import replace
from ._selectors import Where, describe, few, no_match, select
from ._status import Pinned, is_abstract_array
from ._tree import check_model, dotted, is_mode_bearing, mode_bearing_type, modules, state_of

T = TypeVar("T")


def mode_of(module: Any) -> tuple[bool | None, bool]:
    """`(inference, pinned)` of a mode-bearing module. `inference` is `None` when it is
    unknown: `jax.eval_shape` made the bool itself abstract (`eqx.filter_eval_shape`
    keeps it)."""
    value: Any = state_of(module).get("inference")
    pinned = type(value) is Pinned
    if pinned:
        value = value.value
    if is_abstract_array(value):
        return None, pinned
    return bool(value), pinned


def with_mode(module: Any, inference: bool, pinned: bool) -> Any:
    """A mode-bearing module with the given mode and pin (`module` itself when it has
    them already)."""
    value: Any = state_of(module).get("inference")
    has_pin = type(value) is Pinned
    current = value.value if has_pin else value
    if has_pin == pinned and current is inference:
        return module  # unchanged: keep identity (cheaper, and jit caches stay warm)
    return replace(module, inference=Pinned(inference) if pinned else inference)


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
    surgery = _SetMode(None, pin=False, unpin=True)
    return _run(model, where, surgery, strict=strict)


def modes(model: Any) -> dict[str, bool | None]:
    """Every mode-bearing module's `inference` flag, by dotted path.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** `{path: inference}`, `True` meaning evaluation mode; the root's path is
    `""`. On a model made abstract by `jax.eval_shape`, which abstracts the mode bools
    themselves, a mode not set since is `None` (unknown); `eqx.filter_eval_shape` keeps
    them.

    !!! Example

        ```python
        nn.modes(model)  # {'backbone.bn1': True, 'dropout': False}
        ```
    """
    check_model(model, "nn.modes")
    return {path: mode_of(m)[0] for path, m in mode_bearing(model)}


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
    return [
        (dotted(path), m) for path, m, _ in modules(model) if m is not None and is_mode_bearing(m)
    ]


class _SetMode(Edit):
    """Set (or keep) the mode and pin of every covered mode-bearing module; counts the
    covered ones and keeps the pinned ones it skipped."""

    target_type = staticmethod(mode_bearing_type)

    def __init__(self, inference: bool | None, *, pin: bool, unpin: bool = False) -> None:
        self.inference, self.pin, self.unpin = inference, pin, unpin
        self.covered = 0
        self.skipped: list[Any] = []  # pinned modules left alone

    def module(self, path: Any, module: Any) -> Any:
        self.covered += 1
        value: Any = state_of(module).get("inference")  # a tracer under jax.jit: no bool()
        pinned = type(value) is Pinned
        if self.unpin:
            return replace(module, inference=value.value) if pinned else module
        if pinned and not self.pin:
            self.skipped.append(module)
            return module
        return with_mode(module, self.inference, self.pin)  # type: ignore[arg-type]


def _run(model: Any, where: Any, surgery: _SetMode, *, strict: bool = True) -> Any:
    new = edit(model, where, surgery)
    if strict and where is not None and surgery.covered == 0:
        raise no_match(
            where,
            "mode-bearing module (one with an `inference` field)",
            [p for p, _ in mode_bearing(model)],
        )
    return new


def _switch(model: Any, where: Any, *, inference: bool, pin: bool, fn: str) -> Any:
    selection = select(where, model)
    surgery = _SetMode(inference, pin=pin)
    new = _run(model, selection, surgery)
    if selection is not None and surgery.skipped and len(surgery.skipped) == surgery.covered:
        skipped = {id(m) for m in surgery.skipped}
        paths = [p for p, m in mode_bearing(model) if id(m) in skipped]
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
