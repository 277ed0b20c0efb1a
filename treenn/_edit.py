"""The edit engine: the one walk behind every surgery that takes `where=`.

A surgery says only what it does to one node: `Edit.leaf` for array leaves (freezing),
`Edit.module` for the modules it acts on (modes, pins, LoRA). `edit` resolves the
selection once, walks the model, calls the surgery on every node the selection covers,
and rebuilds what changed, so that a module's class follows the marks it holds whatever
the surgery did (a plain Equinox module whose fields changed is refitted by
`_module.fit_class`; a module edited field by field is built by `_module.build`). A new
surgery never walks the tree nor decides a class itself.

What "covered" means is the same for every surgery (API.md §2): `where=None` covers
everything; a class covers its instances and everything inside them; a path pattern or
a getter covers the paths it selects and everything below them.

Speed: the walk is JAX's C++ flatten, stopping only where Python must look: the
surgery's target modules, the selector's classes, plain Equinox modules when leaves
change (their class may change), and modules holding only leaves (edited field by
field, never flattened). Paths are computed only for a path selector, and only outside
covered subtrees. (`tests/benchmarks/surgery.py` measures it against `tree_flatten`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._caches import Cache
from ._module import build, fit_class, is_foreign_type
from ._selectors import Selection, select
from ._status import MARK_TYPES, is_array_like
from ._tree import (
    STOP_MODULE,
    KeyPath,
    below,
    by_type,
    dotted,
    dynamic_fields,
    flatten,
    inert,
    leaves,
    mode_bearing_type,
    pruned,
    state_of,
    unflatten,
)


class Edit:
    """What a surgery does to the nodes a selection covers. Subclass and override.

    `path` arguments are key paths (`treenn._tree.dotted` makes them dotted), or
    `None` where the walk did not need them (no path selector).
    """

    # Whether `leaf` is called for array leaves (concrete, abstract or marked).
    on_leaves = False
    # Whether `module`/`leaf` always get paths (for errors naming them); otherwise only
    # a path selector makes the walk compute them.
    needs_paths = False

    @staticmethod
    def target_type(kind: type) -> bool:
        """Whether modules of class `kind` are what `module` acts on (decided per type)."""
        return False

    def module(self, path: KeyPath | None, module: Any) -> Any:
        """The covered target `module`, edited (or itself)."""
        return module

    def leaf(self, path: KeyPath | None, leaf: Any) -> Any:
        """The covered array `leaf` (an array, abstract or not, or a marked one), edited
        (or itself)."""
        return leaf


def edit(model: Any, where: Any, surgery: Edit) -> Any:
    """`model` with `surgery` applied to every node `where` covers; `model` itself when
    nothing changes. Resolves `where` once (a `Selection` is used as it is)."""
    selection = select(where, model)
    walk = _Walk(selection, surgery)
    covered = selection is None
    if STOP_MODULE(model):
        return walk.module(model, (), covered)
    return walk.visit(model, (), covered)


_STOPS: dict[Any, Callable[[Any], bool]] = Cache()


def _stop(surgery: Edit, classes: Any) -> Callable[[Any], bool]:
    key = (type(surgery), classes)
    stop = _STOPS.get(key)
    if stop is None:
        target, on_leaves = surgery.target_type, surgery.on_leaves

        def stops(kind: type) -> bool:
            return (
                target(kind)
                or (classes is not None and issubclass(kind, classes))
                or (on_leaves and is_foreign_type(kind))
            )

        stop = _STOPS[key] = pruned(by_type(stops))
    return stop


class _Walk:
    def __init__(self, selection: Selection | None, surgery: Edit) -> None:
        self.surgery = surgery
        self.classes = None if selection is None else selection.classes
        self.covers = None if selection is None or self.classes is not None else selection.covers
        self.stop = _stop(surgery, self.classes)

    def visit(self, node: Any, prefix: KeyPath, covered: bool) -> Any:
        """The inside of `node` (the root, or a module `module` entered), edited."""
        surgery = self.surgery
        need_paths = surgery.needs_paths or (self.covers is not None and not covered)
        is_leaf = below(node, self.stop)
        paths: list[KeyPath] | None = None
        if need_paths:
            paths, flat, treedef = flatten(node, is_leaf)
        else:
            flat, treedef = leaves(node, is_leaf)
        changed = False
        for i, child in enumerate(flat):
            path = prefix + paths[i] if paths is not None else None
            if STOP_MODULE(child) and type(child) not in MARK_TYPES:
                new = self.module(child, path, covered)
            elif surgery.on_leaves and (type(child) in MARK_TYPES or is_array_like(child)):
                if not (covered or (self.covers is not None and self.covers(dotted(path)))):  # type: ignore[arg-type]
                    continue
                new = surgery.leaf(path, child)
            else:
                continue
            if new is not child:
                flat[i] = new
                changed = True
        return unflatten(treedef, flat) if changed else node

    def module(self, module: Any, path: KeyPath | None, covered: bool) -> Any:
        """A module the walk stopped at (a target, a selected class, a plain Equinox
        module, or one holding only leaves), edited."""
        if not covered:
            if self.classes is not None:
                covered = isinstance(module, self.classes)
            elif self.covers is not None:
                covered = self.covers(dotted(path))  # type: ignore[arg-type]
        surgery = self.surgery
        if inert(module):
            new = self.shallow(module, path, covered) if surgery.on_leaves else module
        else:
            new = self.visit(module, path or (), covered)
            if new is not module and is_foreign_type(type(new)):
                new = fit_class(new)
        if covered and surgery.target_type(type(new)):
            new = surgery.module(path, new)
        return new

    def shallow(self, module: Any, path: KeyPath | None, covered: bool) -> Any:
        """A module holding only leaves, its arrays edited field by field (no flatten);
        built once, by `build`, which gives it the class its marks call for."""
        state = state_of(module)
        changes: dict[str, Any] = {}
        base: str | None = None
        for name in dynamic_fields(type(module)):
            value = state.get(name)
            if not (type(value) in MARK_TYPES or is_array_like(value)):
                continue
            if not covered:
                if self.covers is None:
                    continue
                if base is None:
                    base = dotted(path)  # type: ignore[arg-type]
                if not self.covers(f"{base}.{name}" if base else name):
                    continue
            new = self.surgery.leaf(None if path is None else path + (name,), value)
            if new is not value:
                changes[name] = new
        if not changes:
            return module
        return build(type(module), {**state, **changes})


class _Refit(Edit):
    """Every plain Equinox module refitted to the marks it holds."""

    target_type = staticmethod(is_foreign_type)

    def module(self, path: KeyPath | None, module: Any) -> Any:
        return fit_class(module)


def fit_classes(tree: Any) -> Any:
    """Give every Equinox module holding a mark the class that reads through it (see
    `_module.fit_class`), and its own class back to one that no longer holds any: for
    trees JAX rebuilt from a structure made before marks were added or removed."""
    return edit(tree, None, _Refit())


class _Each(Edit):
    """`fn(path, module)` on every mode-bearing module (checkpoints restoring modes)."""

    target_type = staticmethod(mode_bearing_type)
    needs_paths = True

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn

    def module(self, path: Any, module: Any) -> Any:
        return self.fn(path, module)


def each_mode_bearing(model: Any, fn: Callable[[Any, Any], Any]) -> Any:
    """`model` with every mode-bearing module (the root included) replaced by
    `fn(key_path, module)`, innermost first."""
    return edit(model, None, _Each(fn))
