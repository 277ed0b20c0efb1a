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

from ._optimizers import ModelCopies, holds_optax, placeholder_stop, placeholder_types
from ._rules import Rule, RuleSet, rule_name
from ._selectors import few
from ._status import is_array_leaf, marked_like, unmarked
from ._tree import STOP_MODULE, check_model, dotted, flatten, is_module, unflatten

T = TypeVar("T")
Rules: TypeAlias = "PartitionSpec | Mapping[Any, Any] | None"


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
    resolved = RuleSet(specs, model, ModelCopies(model))
    kinds = placeholder_types()
    paths, leaves, treedef = flatten(model, placeholder_stop())
    names = [dotted(p) for p in paths]
    arrays = [i for i, x in enumerate(leaves) if is_array_leaf(x)]
    holes = [names[i] for i, x in enumerate(leaves) if isinstance(x, kinds)]
    chosen = _match([names[i] for i in arrays], holes, resolved, model, isinstance(rules, Mapping))
    values = [unmarked(leaves[i]) for i in arrays]
    _check_fit(model, mesh, [names[i] for i in arrays], values, chosen)
    shardings = [NamedSharding(mesh, rule.value) for rule in chosen]
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


def _check_spec(where: Any, spec: Any, mesh: Mesh) -> None:
    name = rule_name(where)
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


def _match(
    names: list[str], holes: list[str], rules: RuleSet, tree: Any, explicit: bool
) -> list[Rule]:
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
    chosen = [rules.first(name) for name in names]
    for hole in holes:
        rules.first(hole)
    unmatched = [n for n, rule in zip(names, chosen) if rule is None]
    if unmatched:
        raise rules.unmatched(
            "shard",
            "",
            few(unmatched),
            'End the rules with a catch-all such as "**": P() to replicate the rest',
        )
    if explicit and not all(r.used for r in rules) and not _mirrors_no_model(tree):
        rules.check_used(
            "shard",
            names,
            names + holes,
            nothing="no array (nor the place of a frozen array or buffer in an optimiser state)",
            verb="placed",
        )
    return [rule for rule in chosen if rule is not None]


# -- fit ----------------------------------------------------------------------------------


def _check_fit(
    tree: Any, mesh: Mesh, names: list[str], values: list[Any], chosen: list[Rule]
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
            used = [a for entry in rule.value for a in _axes(entry, rule.name, rule.value)]
            bad = [a for a in used if a in explicit]
            if bad:
                raise ValueError(
                    f"shard: rule {rule.name} shards module array {name!r} over mesh axis "
                    f"{bad[0]!r}, which is Explicit; treenn's layers rely on JAX's automatic "
                    "sharding propagation: build the mesh with axis_types=(AxisType.Auto,) "
                    "* n (Explicit axes work for batches and replicated models)"
                )


def _misfit(mesh: Mesh, name: str, shape: tuple[int, ...], rule: Rule) -> str | None:
    spec = rule.value
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


def _mirrors_no_model(tree: Any) -> bool:
    """An optimiser state without a module inside: nothing in it says what the model's
    rules should match (SGD's `EmptyState`s, `inject_hyperparams`' scalars)."""
    return not _holds_module(tree) and holds_optax(tree)


def _holds_module(tree: Any) -> bool:
    if is_module(tree):
        return True
    _, leaves, _ = flatten(tree, STOP_MODULE)
    return any(is_module(x) for x in leaves)
