"""The edit engine: the one walk behind every surgery that takes `where=`.

A surgery says only what it does to one node: `Edit.leaf` for array leaves (freezing),
`Edit.module` for the modules it acts on (modes, pins, LoRA). `edit` resolves the
selection once, walks the model module by module, calls the surgery on every node the
selection covers, and rebuilds each module whose fields changed through
`_module.fit_class`, so a module's class follows the marks it holds whatever the
surgery did. A new surgery never walks the tree nor decides a class itself.

What "covered" means is the same for every surgery (API.md §2): `where=None` covers
everything; a class covers its instances and everything inside them; a path pattern or
a getter covers the paths it selects and everything below them.
"""

from __future__ import annotations

from typing import Any

from ._module import fit_class
from ._selectors import Selection, select
from ._status import is_array_leaf
from ._tree import STOP_MODULE, below, dotted, flatten, inert, is_module, unflatten


class Edit:
    """What a surgery does to the nodes a selection covers. Subclass and override."""

    # Whether `leaf` is called for array leaves (concrete, abstract or marked).
    on_leaves = False

    def targets(self, module: Any) -> bool:
        """Whether `module` is a node `module()` acts on (mode-bearing, adaptable...)."""
        return False

    def module(self, path: str, module: Any) -> Any:
        """The covered target `module` at dotted `path`, edited (or itself)."""
        return module

    def leaf(self, path: str, leaf: Any) -> Any:
        """The covered array `leaf` at dotted `path`, edited (or itself)."""
        return leaf


def edit(model: Any, where: Any, surgery: Edit) -> Any:
    """`model` with `surgery` applied to every node `where` covers; `model` itself when
    nothing changes. Resolves `where` once (a `Selection` is used as it is)."""
    selection = select(where, model)
    walk = _Walk(selection, surgery)
    return walk.visit(model, (), selection is None)


class _Walk:
    def __init__(self, selection: Selection | None, surgery: Edit) -> None:
        self.surgery = surgery
        self.classes = None if selection is None else selection.classes
        self.covers = None if selection is None or self.classes is not None else selection.covers

    def covered(self, node: Any, path: tuple[Any, ...]) -> bool:
        if self.classes is not None:
            return isinstance(node, self.classes)
        return self.covers is not None and self.covers(dotted(path))

    def visit(self, node: Any, path: tuple[Any, ...], covered: bool) -> Any:
        """`node` (the root, or a module) edited; `covered` when an ancestor is."""
        covered = covered or self.covered(node, path)
        surgery = self.surgery
        paths, flat, treedef = flatten(node, below(node, STOP_MODULE))
        changed = False
        for i, child in enumerate(flat):
            if is_module(child):
                if not surgery.on_leaves and inert(child) and not surgery.targets(child):
                    continue  # holds only leaves: nothing for a module surgery inside
                new = self.visit(child, path + paths[i], covered)
            elif surgery.on_leaves and is_array_leaf(child):
                child_path = path + paths[i]
                if not (covered or self.covered(child, child_path)):
                    continue
                new = surgery.leaf(dotted(child_path), child)
            else:
                continue
            if new is not child:
                flat[i] = new
                changed = True
        out = unflatten(treedef, flat) if changed else node
        if changed and is_module(out):
            out = fit_class(out)
        if covered and is_module(out) and surgery.targets(out):
            out = surgery.module(dotted(path), out)
        return out
