"""Sharding rules in the `where=` language: `treenn.shard`.

Placement is JAX's own: each array is `jax.device_put` onto a `NamedSharding(mesh,
spec)`, and a step compiled by `treenn.jit` / `treenn.train_step` then runs as one SPMD
program over the mesh, with XLA inserting the collectives (the all-reduce of data-parallel
gradients and of BatchNorm's batch statistics, the all-gathers of fully-sharded
parameters). Nothing here runs per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import jax
from jax.core import Tracer
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._optimizers import placeholder_types
from ._selectors import Selection, describe, few, select
from ._status import is_array_leaf, marked_like, unmarked
from ._tree import (
    STOP_MODULE,
    by_type,
    check_model,
    dotted,
    flatten,
    is_module,
    no_gc,
    unflatten,
)

T = TypeVar("T")
Rules: TypeAlias = "PartitionSpec | Mapping[Any, Any] | None"


class _Copies:
    """The copies of a model inside an optimiser state, or a tree holding one: each
    outermost module, by dotted path (a state's `0.mu` and `0.nu`, the parts of a
    `(model, opt_state)` pair). Rules apply within each copy as they do to the model.
    (Other trees keep full paths: in a dict of models, `"a.**"` means the model `a`.)"""

    def __init__(self, tree: Any):
        self.roots: dict[str, Any] = {}
        if not is_module(tree) and _holds_optax(tree):
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


class _Hole:
    """Stands in for a placeholder while a getter runs on a copy, so that selecting one
    `None` does not select every `None`."""

    __slots__ = ()


class _Rule:
    """One `where -> spec` rule, resolved against the tree being placed (also the base
    of `treenn.labels`' rules)."""

    __slots__ = ("where", "spec", "selection", "used")

    def __init__(self, where: Any, spec: PartitionSpec, tree: Any):
        self.where = where
        self.spec = spec
        self.selection: Selection | None = select(where, tree)
        self.used: list[str] = []

    def covers(self, path: str) -> bool:
        return self.selection is None or self.selection.covers(path)

    @property
    def name(self) -> str:
        return _rule_name(self.where)


class _CopiesRule(_Rule):
    """A rule applied within each copy of the model in a tree that is not a model itself:
    to paths relative to the copy (a getter runs on each copy), or else to full paths."""

    __slots__ = ("copies", "per_copy")

    def __init__(self, where: Any, spec: PartitionSpec, tree: Any, copies: _Copies):
        self.copies = copies
        self.per_copy: dict[str, Selection | None] | None = None
        if _is_getter(where):  # a getter navigates the model: run it on each copy
            self.where, self.spec, self.used, self.selection = where, spec, [], None
            self.per_copy = {root: select(where, _holed(c)) for root, c in copies.roots.items()}
        else:
            super().__init__(where, spec, tree)

    def covers(self, path: str) -> bool:
        root, inner = self.copies.locate(path)
        if self.per_copy is not None:
            if root is None:
                return False
            selection = self.per_copy[root]
            return selection is None or selection.covers(inner)
        if self.selection is None:
            return True
        return self.selection.covers(path) or (root is not None and self.selection.covers(inner))


@no_gc()
def shard(model: T, mesh: Mesh, rules: Rules = None) -> T:
    """Place every array of a model (or optimiser state, or batch) on a device mesh,
    by sharding rules written in the `where=` language.

    **Arguments:**

    - `model`: any pytree: a model, an optimiser state, a batch. Frozen arrays and
        buffers stay frozen arrays and buffers; non-array leaves are left as they are.
    - `mesh`: a `jax.sharding.Mesh`. Sharding a module's arrays needs `AxisType.Auto`
        axes (`jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))`):
        treenn's layers rely on JAX's automatic sharding propagation.
    - `rules`: a mapping from selectors (`"**.attn.qkv.weight"`, a class, a getter) to
        `jax.sharding.PartitionSpec`s; each array is placed by the *first* rule that
        selects it (end with `"**": P()` to replicate the rest). A single
        `PartitionSpec` applies to every array (`P("data")` for a batch); `None`
        replicates everything (data parallelism).

    **Returns:** the tree with each array on `NamedSharding(mesh, spec)`. Raises
    `ValueError` naming the path when an array is left unmatched, when a spec has more
    entries than the array has dimensions or a dimension is not divisible by its mesh
    axes, when a rule selects nothing (no array, no place of one: below) or only what an
    earlier rule placed, or when it
    names an axis the mesh lacks; `TypeError` for a rule value that is not a
    `PartitionSpec`.

    The moments of an optimiser state created afterwards (`tx.init(treenn.trainable(
    model))`) follow their parameters' sharding; place the state with the same rules to
    put the rest (a step count) on the mesh too. In an optimiser state, or a tree that
    holds one (a `(model, opt_state)` pair), the rules apply within each copy of a model
    it holds (each outermost module: `0.mu`, `0.nu`), as they do to the model:
    `"blocks.*.attn.qkv.weight"`, classes and getters match
    `0.mu.blocks.0.attn.qkv.weight`; what lies outside every copy (a step count) is
    matched by its own path (`"**"`). A rule counts as used when it selects an array or
    the place a state keeps for a parameter without state (a frozen array or a buffer:
    `None`; another `multi_transform` group's array: `MaskedNode`), so any optax state
    takes the model's rules, while a rule that selects nothing in the model still fails.
    A state that holds no copy of the model (SGD's) cannot tell, and is not checked.
    Inside a compiled step, `shard` is a sharding constraint (`with_sharding_constraint`):
    applied to a step's outputs, it keeps them where the rules say. `treenn.load(path,
    like=sharded_model)` loads each array onto its sharding.

    !!! Example

        ```python
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        rules = {"**.attn.qkv.weight": P(None, "model"), "**": P()}
        model = treenn.shard(model, mesh, rules)
        opt_state = treenn.shard(tx.init(treenn.trainable(model)), mesh, rules)
        x, y = treenn.shard((x, y), mesh, P("data"))
        ```
    """
    check_model(model, "treenn.shard")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"shard: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    specs = _rule_specs(rules, mesh)
    copies = _Copies(model)
    resolved = [
        _CopiesRule(where, spec, model, copies) if copies.roots else _Rule(where, spec, model)
        for where, spec in specs
    ]
    kinds = placeholder_types()
    paths, leaves, treedef = flatten(model, by_type(lambda kind: issubclass(kind, kinds)))
    names = [dotted(p) for p in paths]
    arrays = [i for i, x in enumerate(leaves) if is_array_leaf(x)]
    holes = [names[i] for i, x in enumerate(leaves) if isinstance(x, kinds)]
    chosen = _match([names[i] for i in arrays], holes, resolved, model, isinstance(rules, Mapping))
    values = [unmarked(leaves[i]) for i in arrays]
    _check_fit(model, mesh, [names[i] for i in arrays], values, chosen)
    shardings = [NamedSharding(mesh, rule.spec) for rule in chosen]
    if any(isinstance(v, Tracer) for v in values):
        # Inside a compiled step: a constraint, which (unlike a traced device_put) the
        # partitioner must honour, so outputs keep their placement.
        placed = jax.lax.with_sharding_constraint(values, shardings)
    else:
        placed = jax.device_put(values, shardings)
    new = list(leaves)
    for i, value in zip(arrays, placed):
        new[i] = marked_like(leaves[i], value)
    return unflatten(treedef, new)


# -- rules ------------------------------------------------------------------------------


def _rule_specs(rules: Any, mesh: Mesh) -> list[tuple[Any, PartitionSpec]]:
    """`rules` as `(where, spec)` pairs in order, each spec checked against the mesh."""
    if rules is None:
        return [(None, PartitionSpec())]
    if isinstance(rules, PartitionSpec):
        pairs: list[tuple[Any, Any]] = [(None, rules)]
    elif isinstance(rules, Mapping):
        pairs = list(rules.items())
    else:
        raise TypeError(
            f"shard: rules must be a mapping from selectors to PartitionSpecs (e.g. "
            f'{{"**.attn.qkv.weight": P(None, "model"), "**": P()}}), a single PartitionSpec '
            f"or None; got {type(rules).__name__}"
        )
    for where, spec in pairs:
        _check_spec(where, spec, mesh)
    return pairs


def _rule_name(where: Any) -> str:
    return "(the whole tree)" if where is None else describe(where)


def _check_spec(where: Any, spec: Any, mesh: Mesh) -> None:
    name = _rule_name(where)
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"shard: rule {name} maps to {spec!r} ({type(spec).__name__}), not a "
            "jax.sharding.PartitionSpec such as P(None, 'model') or P()"
        )
    seen: set[str] = set()
    for entry in spec:
        for axis in _axes(entry, name, spec):
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"shard: rule {name} ({spec}) uses mesh axis {axis!r}, which the mesh "
                    f"does not have; its axes are {few(list(mesh.axis_names))}"
                )
            if axis in seen:
                raise ValueError(f"shard: rule {name} ({spec}) uses mesh axis {axis!r} twice")
            seen.add(axis)


def _axes(entry: Any, name: str, spec: PartitionSpec) -> Sequence[str]:
    """The mesh axes one dimension is split over."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
        return entry
    raise ValueError(
        f"shard: rule {name} ({spec}) has entry {entry!r}; each entry must be None, a mesh "
        "axis name, or a tuple of axis names"
    )


# -- matching ---------------------------------------------------------------------------


def _first_rule(rules: list[_Rule], path: str) -> _Rule | None:
    for rule in rules:
        if rule.covers(path):
            rule.used.append(path)
            return rule
    return None


def _match(
    names: list[str], holes: list[str], rules: list[_Rule], tree: Any, explicit: bool
) -> list[_Rule]:
    """The rule placing each array (the first that selects it), checking that every array
    is matched and, for explicit rule sets, that every rule is used.

    A rule is used when it is the first to select an array, or a *hole*: the place an
    optimiser state keeps for a parameter without state (`None` where
    `treenn.trainable` left a frozen array or a buffer, optax's `MaskedNode` for an array
    of another `multi_transform` group). So the model's rules place its optimiser state
    whatever the state holds for each parameter, while a rule that matches nothing in
    the model (a typo) still fails. A state that mirrors no model (SGD's `EmptyState`s, a
    hyperparameter alone) cannot tell, and is not checked: `shard(model, ...)` is.
    """
    chosen = [_first_rule(rules, name) for name in names]
    for hole in holes:
        _first_rule(rules, hole)
    unmatched = [n for n, rule in zip(names, chosen) if rule is None]
    if unmatched:
        raise ValueError(
            f"shard: no rule matches {few(unmatched)}; rules: "
            f"{', '.join(r.name for r in rules)}. End the rules with a catch-all such as "
            '"**": P() to replicate the rest'
        )
    unused = [rule for rule in rules if explicit and not rule.used]
    if unused and _mirrors_no_model(tree):
        unused = []
    check_rules_used(
        "shard",
        rules,
        unused,
        names,
        names + holes,
        nothing="no array (nor the place of a frozen array or buffer in an optimiser state)",
        verb="placed",
    )
    return [rule for rule in chosen if rule is not None]


def check_rules_used(
    fn: str,
    rules: list[Any],
    unused: list[Any],
    names: list[str],
    candidates: list[str],
    *,
    nothing: str,
    verb: str,
) -> None:
    """Raise for the first of `unused` (rules that chose nothing): it matches nothing
    among `candidates`, or everything it matches went to an earlier rule. Shared by
    `shard` and `treenn.labels`, whose rules are first-match-wins alike."""
    for rule in unused:
        selected = [n for n in candidates if rule.covers(n)]
        if not selected:
            raise ValueError(f"{fn}: rule {rule.name} matches {nothing}; arrays: {few(names)}")
        earlier = [r.name for r in rules if set(r.used) & set(selected)]
        raise ValueError(
            f"{fn}: rule {rule.name} is never used: every array it matches "
            f"({few(selected, 4)}) is {verb} by an earlier rule ({', '.join(earlier)}); "
            "put the more specific rule first"
        )


# -- fit ----------------------------------------------------------------------------------


def _check_fit(
    tree: Any, mesh: Mesh, names: list[str], values: list[Any], chosen: list[_Rule]
) -> None:
    problems = [
        problem
        for name, value, rule in zip(names, values, chosen)
        if (problem := _misfit(mesh, name, tuple(value.shape), rule)) is not None
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("shard: " + "; ".join(problems[:5]) + more)
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit]
    if explicit and _holds_module(tree):
        for name, rule in zip(names, chosen):
            used = [a for entry in rule.spec for a in _axes(entry, rule.name, rule.spec)]
            bad = [a for a in used if a in explicit]
            if bad:
                raise ValueError(
                    f"shard: rule {rule.name} shards module array {name!r} over mesh axis "
                    f"{bad[0]!r}, which is Explicit; treenn's layers rely on JAX's automatic "
                    "sharding propagation: build the mesh with axis_types=(AxisType.Auto,) "
                    "* n (Explicit axes work for batches and replicated models)"
                )


def _misfit(mesh: Mesh, name: str, shape: tuple[int, ...], rule: _Rule) -> str | None:
    spec = rule.spec
    name = repr(name) if name else "the array"
    if len(spec) > len(shape):
        return (
            f"{name} has shape {shape} (rank {len(shape)}), but rule {rule.name} gives "
            f"{spec} for {len(spec)} dimensions"
        )
    for dim, entry in enumerate(spec):
        axes = _axes(entry, rule.name, spec)
        size = 1
        for axis in axes:
            size *= mesh.shape[axis]
        if shape[dim] % size:
            over = f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {tuple(axes)}"
            return (
                f"{name} has shape {shape}: dimension {dim} ({shape[dim]}) is not divisible "
                f"by the size of {over} ({size}) in rule {rule.name}: {spec}"
            )
    return None


def _is_getter(where: Any) -> bool:
    return (
        callable(where)
        and not isinstance(where, (str, type, tuple))
        and not isinstance(where, Selection)
    )


def _holed(copy: Any) -> Any:
    kinds = placeholder_types()
    return jax.tree.map(
        lambda x: _Hole() if isinstance(x, kinds) else x,
        copy,
        is_leaf=lambda x: isinstance(x, kinds),
    )


def _is_optax_type(kind: type) -> bool:
    return kind.__module__.partition(".")[0] == "optax"


_STOP_OPTAX = by_type(_is_optax_type)


def _holds_optax(tree: Any) -> bool:
    """Whether the tree is, or holds, an optax state."""
    _, leaves, _ = flatten(tree, _STOP_OPTAX)
    return any(_is_optax_type(type(x)) for x in leaves)


def _mirrors_no_model(tree: Any) -> bool:
    """An optimiser state without a module inside: nothing in it says what the model's
    rules should match (SGD's `EmptyState`s, `inject_hyperparams`' scalars)."""
    return not _holds_module(tree) and _holds_optax(tree)


def _holds_module(tree: Any) -> bool:
    if is_module(tree):
        return True
    _, leaves, _ = flatten(tree, STOP_MODULE)
    return any(is_module(x) for x in leaves)
