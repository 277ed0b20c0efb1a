"""Property-based tests over randomly generated module trees (nested treenn modules,
tuples, lists, dicts, None fields, Equinox layers mixed in) and random selectors."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
from conftest import leaves_by_path, summary_rows
from hypothesis import HealthCheck, given, settings, strategies as st

import treenn
import treenn.nn as nn

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Node(treenn.Module):
    """A container with every kind of field a model may have."""

    items: tuple[Any, ...]
    named: dict[str, Any]
    listed: list[Any]
    maybe: Any


LEAVES = ["linear", "dropout", "batchnorm", "eqx_dropout", "eqx_linear"]


@st.composite
def specs(draw: Any, depth: int = 0) -> Any:
    """A description of a random model (built outside the strategy: hypothesis wants
    strategies free of other randomness)."""
    if depth >= 2 or draw(st.integers(0, 3)) == 0:
        return ("leaf", draw(st.sampled_from(LEAVES)), draw(st.integers(1, 3)), draw(st.booleans()))
    child = specs(depth + 1)
    return (
        "node",
        tuple(draw(st.lists(child, max_size=2))),
        {k: draw(child) for k in draw(st.lists(st.sampled_from("ab"), unique=True))},
        draw(st.lists(child, max_size=1)),
        draw(st.one_of(st.none(), child)),
    )


def build(spec: Any, key: jax.Array | None = None) -> Any:
    if spec is None:
        return None
    key = jax.random.key(0) if key is None else key
    if spec[0] == "leaf":
        _, kind, size, flag = spec
        if kind == "linear":
            return nn.Linear(2, size, bias=flag, key=key)
        if kind == "dropout":
            return nn.Dropout(0.5, inference=flag)
        if kind == "batchnorm":
            return nn.BatchNorm(size, inference=flag)
        if kind == "eqx_dropout":
            return eqx.nn.Dropout(0.5, inference=flag)
        return eqx.nn.Linear(2, size, key=key)
    _, items, named, listed, maybe = spec
    keys = iter(jax.random.split(key, 8))
    return Node(
        items=tuple(build(s, next(keys)) for s in items),
        named={k: build(s, next(keys)) for k, s in named.items()},
        listed=[build(s, next(keys)) for s in listed],
        maybe=build(maybe, next(keys)),
    )


def array_paths(model: Any) -> list[str]:
    return [p for p, x in leaves_by_path(model) if isinstance(x, jax.Array)]


@st.composite
def _selectors(draw: Any, paths: list[str]) -> Any:
    kind = draw(st.sampled_from(["none", "path", "prefix", "glob", "class"]))
    if kind == "none" or not paths:
        return None
    path = draw(st.sampled_from(paths))
    if kind == "path":
        return path
    if kind == "prefix":
        return path.rsplit(".", 1)[0] if "." in path else path
    if kind == "glob":
        return "**." + path.rsplit(".", 1)[-1] if "." in path else "**"
    return draw(st.sampled_from([nn.Linear, nn.BatchNorm, nn.Dropout, Node]))


def selectors(model: Any) -> Any:
    """Random selectors for `model` (paths computed here, outside the strategy)."""
    return _selectors([p for p in array_paths(model) + list(nn.modes(model)) if p])


def same(a: Any, b: Any) -> bool:
    return bool(eqx.tree_equal(a, b)) and jax.tree_util.tree_structure(
        a
    ) == jax.tree_util.tree_structure(b)


def try_(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The result, or None when the selector selects nothing the helper acts on."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        assert "matches no" in str(err)
        return None


@SETTINGS
@given(st.data())
def test_modes_switches_are_idempotent_and_functional(data: Any) -> None:
    model = build(data.draw(specs()))
    where = data.draw(selectors(model))
    before = nn.modes(model)
    once = try_(nn.eval_mode, model, where)
    assert nn.modes(model) == before  # the old model is untouched
    if once is None:
        return
    assert same(nn.eval_mode(once, where), once)
    switched = nn.modes(once)
    assert all(switched[p] for p in switched if p not in before or switched[p] != before[p])
    assert same(nn.train_mode(nn.train_mode(once)), nn.train_mode(once))
    assert not any(nn.modes(nn.train_mode(once)).values())


@SETTINGS
@given(st.data())
def test_pins_survive_whole_model_switches(data: Any) -> None:
    model = build(data.draw(specs()))
    treenn_mb = [
        p for p in nn.modes(model) if p and isinstance(_at(model, p), (nn.Dropout, nn.BatchNorm))
    ]
    if not treenn_mb:
        return
    path = data.draw(st.sampled_from(treenn_mb))
    pinned = nn.eval_mode(model, path, pin=True)
    for switch in (nn.train_mode, nn.eval_mode, nn.train_mode):
        pinned = switch(pinned)
        assert nn.modes(pinned)[path] is True
        assert nn.pinned(pinned)[path] is True
    assert nn.pinned(nn.unpin(pinned))[path] is False
    assert nn.modes(nn.unpin(pinned))[path] is True


def _at(model: Any, path: str) -> Any:
    node = model
    for part in path.split("."):
        if isinstance(node, dict):
            node = node[part]
        elif isinstance(node, (tuple, list)):
            node = node[int(part)]
        else:
            node = getattr(node, part)
    return node


@SETTINGS
@given(st.data())
def test_freeze_and_unfreeze_are_inverse_on_their_selection(data: Any) -> None:
    model = build(data.draw(specs()))
    where = data.draw(selectors(model))
    frozen = try_(treenn.freeze, model, where)
    if frozen is None:
        return
    assert same(treenn.unfreeze(frozen, where), model)
    assert same(treenn.freeze(frozen, where), frozen)
    n_trainable = len(jax.tree_util.tree_leaves(treenn.trainable(frozen)))
    assert n_trainable <= len(jax.tree_util.tree_leaves(treenn.trainable(model)))


@SETTINGS
@given(st.data())
def test_partition_combine_round_trip(data: Any) -> None:
    model = build(data.draw(specs()))
    where = data.draw(selectors(model))
    model = try_(treenn.freeze, model, where) or model
    model = nn.eval_mode(model)
    assert same(treenn.combine(*treenn.partition(model)), model)


@SETTINGS
@given(data=st.data())
def test_save_load_round_trip_is_bit_exact(data: Any, tmp_path_factory: Any) -> None:
    model = build(data.draw(specs()))
    where = data.draw(selectors(model))
    model = try_(treenn.freeze, model, where) or model
    model = try_(nn.eval_mode, model, where) or model
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    treenn.save(path, model)
    like = nn.train_mode(treenn.unfreeze(model))
    loaded = treenn.load(path, like)
    assert same(loaded, model)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(model)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@SETTINGS
@given(st.data())
def test_summary_totals_equal_the_sums_of_their_rows(data: Any) -> None:
    model = build(data.draw(specs()))
    model = try_(treenn.freeze, model, data.draw(selectors(model))) or model
    text = treenn.summary(model)
    table = summary_rows(text)
    for status in ("trainable", "frozen", "buffer"):
        params = sum(int(r["params"]) for r in table if r["status"] == status)
        assert f"{status}: {params:,} params" in text
    arrays = [x for x in jax.tree_util.tree_leaves(model) if isinstance(x, jax.Array)]
    assert sum(int(r["params"]) for r in table) == sum(int(np.prod(x.shape)) for x in arrays)


@SETTINGS
@given(st.data())
def test_modes_agrees_with_the_fields(data: Any) -> None:
    model = build(data.draw(specs()))
    for path, inference in nn.modes(model).items():
        node = _at(model, path) if path else model
        assert bool(node.inference) is inference


# -- every surgery, in any order (issue 21) --------------------------------------------

OPS = ["freeze", "unfreeze", "eval", "train", "eval-pin", "train-pin", "unpin", "lora", "merge"]
OPS += ["save-load", "abstract", "remat", "unremat"]


def _check_invariants(model: Any) -> None:
    """What must hold after every step: each module's class fits its marks, behaviour
    matches `nn.modes` (a train-mode dropout drops), statuses match `trainable`."""
    # Private on purpose: the class rule itself is what this test checks.
    from treenn._module import original_class
    from treenn._status import holds_mark

    for _, module, _ in _modules(model):
        fields = module.__dict__
        marked = any(holds_mark(v) for v in fields.values())
        if not isinstance(module, treenn.Module):
            assert (type(module) is original_class(type(module))) is not marked, type(module)
        for name in fields:
            assert not holds_mark(getattr(module, name)), (type(module), name)
    modes = nn.modes(model)
    for path, inference in modes.items():
        node = _at(model, path) if path else model
        if isinstance(node, (nn.Dropout, eqx.nn.Dropout)):
            x = jax.numpy.ones((64,))
            y = node(x, key=jax.random.key(1))
            assert bool((y == x).all()) is inference, path
    n_trainable = len(jax.tree_util.tree_leaves(treenn.trainable(model)))
    assert n_trainable == list(treenn.statuses(model).values()).count("trainable")


def _modules(model: Any) -> Any:
    return [(p, m, None) for p, m in leaves_by_path_modules(model) if isinstance(m, eqx.Module)]


def leaves_by_path_modules(model: Any) -> list[tuple[str, Any]]:
    """Every module of `model` with its path (root included)."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, eqx.Module):
            found.append((path, node))
            children = [(k, getattr(node, k)) for k in node.__dict__]
        elif isinstance(node, (tuple, list)):
            children = list(enumerate(node))
        elif isinstance(node, dict):
            children = list(node.items())
        else:
            return
        for k, child in children:
            walk(child, f"{path}.{k}" if path else str(k))

    walk(model, "")
    return found


def _step(op: str, model: Any, where: Any, tmp: Any) -> Any:
    if op == "freeze":
        return try_(treenn.freeze, model, where)
    if op == "unfreeze":
        return try_(treenn.unfreeze, model, where)
    if op in ("eval", "train", "eval-pin", "train-pin"):
        switch = nn.eval_mode if op.startswith("eval") else nn.train_mode
        try:
            return switch(model, where, pin=op.endswith("pin"))
        except ValueError as err:
            assert "matches no" in str(err) or "only pinned" in str(err)
            return None
    if op == "unpin":
        return try_(nn.unpin, model, where)
    if op == "lora":
        try:
            return treenn.lora(model, (nn.Linear, eqx.nn.Linear), rank=1, key=jax.random.key(2))
        except ValueError as err:
            assert "matches no" in str(err) or "twice" in str(err) or "already" in str(err)
            return None
    if op == "merge":
        try:
            return treenn.merge_lora(model)
        except ValueError as err:
            assert "no LoRA adapter" in str(err)
            return None
    if op in ("remat", "unremat"):
        try:
            new = treenn.remat(model, where, policy=False if op == "unremat" else None)
        except ValueError as err:
            assert "matches no" in str(err) or "has no" in str(err)
            return None
        # `lora`/`merge_lora` do not yet see through a Linear that is itself
        # rematerialised (they refuse it as a subclass): keep such sequences out.
        linears = (nn.Linear, eqx.nn.Linear)
        if any(
            isinstance(m, linears) and type(m).__name__.startswith("Remat")
            for _, m, _ in _modules(new)
        ):
            return None
        return new
    if op == "save-load":
        path = tmp / "m.safetensors"
        treenn.save(path, model)
        return treenn.load(path, nn.train_mode(model))
    # "abstract": the step after it, on the abstract model, must give what it gives on
    # the concrete one; the sequence goes on with the concrete model.
    return model


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_surgery_sequences_keep_every_invariant(data: Any, tmp_path_factory: Any) -> None:
    model = build(data.draw(specs()))
    tmp = tmp_path_factory.mktemp("seq")
    _check_invariants(model)
    ops = data.draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6))
    for i, op in enumerate(ops):
        where = data.draw(selectors(model))
        new = _step(op, model, where, tmp)
        if new is None:
            continue
        if i > 0 and ops[i - 1] == "abstract" and op not in ("save-load", "lora"):
            abstract = _step(op, eqx.filter_eval_shape(lambda: model), where, tmp)
            assert treenn.statuses(abstract) == treenn.statuses(new)
            assert nn.pinned(abstract) == nn.pinned(new) and nn.modes(abstract) == nn.modes(new)
        model = new
        _check_invariants(model)
