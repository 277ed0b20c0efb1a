"""Freezing: treenn.freeze / treenn.unfreeze (API.md section 4)."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
import pytest
from conftest import (
    NET_BUFFERS,
    NET_PARAMS,
    dotted,
    leaves_by_path,
    optax_promotion,
    paths_with,
    statuses,
)

import treenn
from treenn import nn

BIASES = {"backbone.layers.0.bias", "backbone.layers.1.bias", "backbone.layers.4.bias", "head.bias"}


def trainable_leaf_paths(model):
    """Paths of the arrays `treenn.trainable` keeps (the rest are None)."""
    pairs = jtu.tree_flatten_with_path(treenn.trainable(model))[0]
    return {dotted(p) for p, x in pairs if x is not None}


def leaf(tree, path):
    """The raw array at a dotted path (through status marks)."""
    return dict(leaves_by_path(tree))[path]


class Counter(treenn.Module):
    """Float, half, integer and bool arrays side by side."""

    w: jax.Array
    half: jax.Array
    count: jax.Array
    mask: jax.Array
    rate: float

    def __init__(self):
        self.w = jnp.ones((2,))
        self.half = jnp.ones((2,), jnp.bfloat16)
        self.count = jnp.arange(3)
        self.mask = jnp.array([True, False])
        self.rate = 0.5


# -- module and array granularity -----------------------------------------------------


def test_freeze_a_module(net):
    frozen = treenn.freeze(net, "head")
    assert paths_with(frozen, "frozen") == {"head.weight", "head.bias"}
    assert paths_with(frozen, "trainable") == NET_PARAMS - {"head.weight", "head.bias"}
    assert paths_with(frozen, "buffer") == NET_BUFFERS
    # The original is untouched.
    assert paths_with(net, "frozen") == set()
    assert paths_with(net, "trainable") == NET_PARAMS
    params = treenn.trainable(frozen)
    assert params.head.weight is None and params.head.bias is None
    assert jnp.array_equal(params.backbone.layers[0].weight, net.backbone.layers[0].weight)


def test_freeze_a_single_array(net):
    frozen = treenn.freeze(net, "head.bias")
    assert paths_with(frozen, "frozen") == {"head.bias"}
    assert trainable_leaf_paths(frozen) == NET_PARAMS - {"head.bias"}
    # The value is unchanged, and reads as a plain array.
    assert jnp.array_equal(frozen.head.bias, net.head.bias)
    assert isinstance(frozen.head.bias, jax.Array)


def test_freeze_everything_then_unfreeze_everything(net):
    frozen = treenn.freeze(net)
    assert paths_with(frozen, "frozen") == NET_PARAMS
    assert paths_with(frozen, "buffer") == NET_BUFFERS
    assert jtu.tree_leaves(treenn.trainable(frozen)) == []
    thawed = treenn.unfreeze(frozen)
    assert statuses(thawed) == statuses(net)
    assert eqx.tree_equal(thawed, net)
    assert trainable_leaf_paths(thawed) == NET_PARAMS


def test_unfreeze_a_module_or_array(net):
    frozen = treenn.freeze(net)
    assert trainable_leaf_paths(treenn.unfreeze(frozen, "backbone.layers.4")) == {
        "backbone.layers.4.weight",
        "backbone.layers.4.bias",
    }
    assert trainable_leaf_paths(treenn.unfreeze(frozen, nn.Linear)) == {
        "head.weight",
        "head.bias",
    }
    assert trainable_leaf_paths(treenn.unfreeze(frozen, "head.weight")) == {"head.weight"}


def test_bitfit(net):
    bitfit = treenn.unfreeze(treenn.freeze(net), "**.bias")
    assert trainable_leaf_paths(bitfit) == BIASES
    assert paths_with(bitfit, "frozen") == NET_PARAMS - BIASES
    assert paths_with(bitfit, "buffer") == NET_BUFFERS
    params, rest = treenn.partition(bitfit)
    assert params.head.weight is None
    assert jnp.array_equal(params.head.bias, net.head.bias)
    rebuilt = treenn.combine(params, rest)
    assert statuses(rebuilt) == statuses(bitfit)
    assert eqx.tree_equal(rebuilt, bitfit)


def test_freeze_and_unfreeze_are_idempotent(net):
    once = treenn.freeze(net, "head")
    twice = treenn.freeze(once, "head")
    assert eqx.tree_equal(twice, once)
    assert statuses(twice) == statuses(once)
    assert eqx.tree_equal(treenn.freeze(treenn.freeze(net)), treenn.freeze(net))
    # Unfreezing trainable arrays is not an error and changes nothing.
    assert eqx.tree_equal(treenn.unfreeze(net, "head"), net)
    assert statuses(treenn.unfreeze(net, "head")) == statuses(net)
    assert statuses(treenn.unfreeze(treenn.unfreeze(once))) == statuses(net)


# -- where the status lives -----------------------------------------------------------


def test_status_survives_jit(net):
    frozen = treenn.unfreeze(treenn.freeze(net), "**.bias")
    for transform in (treenn.jit, eqx.filter_jit):
        out = transform(lambda m: m)(frozen)
        assert statuses(out) == statuses(frozen)
        assert trainable_leaf_paths(out) == BIASES
    # Freezing inside jit.
    inside = eqx.filter_jit(lambda m: treenn.freeze(m, "head.**"))(net)
    assert paths_with(inside, "frozen") == {"head.weight", "head.bias"}
    assert paths_with(inside, "buffer") == NET_BUFFERS


def test_status_survives_vmap(net):
    def make(scale):
        scaled = jtu.tree_map(lambda x: scale * x if eqx.is_array(x) else x, net)
        return treenn.freeze(scaled, "backbone.**")

    # Modes are bool leaves, as in Equinox: filtered vmap (plain jax.vmap would map them).
    models = eqx.filter_vmap(make)(jnp.array([1.0, 2.0]))
    assert paths_with(models, "frozen") == NET_PARAMS - {"head.weight", "head.bias"}
    assert paths_with(models, "buffer") == NET_BUFFERS
    assert trainable_leaf_paths(models) == {"head.weight", "head.bias"}
    assert treenn.trainable(models).head.weight.shape == (2, 3, 4)
    assert models.backbone.layers[0].weight.shape == (2, 4, 3, 3, 3)
    assert jnp.array_equal(models.backbone.layers[0].weight[1], 2.0 * net.backbone.layers[0].weight)
    # Mapping over the batched model keeps the statuses too.
    again = eqx.filter_vmap(lambda m: m)(models)
    assert statuses(again) == statuses(models)


def test_status_survives_tree_map(net):
    frozen = treenn.freeze(net, "head.weight")
    doubled = jtu.tree_map(lambda x: 2.0 * x, frozen)
    assert statuses(doubled) == statuses(frozen)
    assert jnp.allclose(doubled.head.weight, 2.0 * net.head.weight)
    assert jnp.allclose(doubled.head.bias, 2.0 * net.head.bias)


def test_freezing_does_not_change_paths(net, eqx_user):
    def keystrs(model):
        return [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(model)[0]]

    def dotted_paths(model):
        return [path for path, _ in leaves_by_path(model)]

    for model, part in ((net, "backbone.layers.1"), (eqx_user, "mlp.layers.0")):
        for frozen in (treenn.freeze(model), treenn.freeze(model, part)):
            assert keystrs(frozen) == keystrs(model)
            assert dotted_paths(frozen) == dotted_paths(model)
    # Selectors keep working on the frozen model.
    frozen = treenn.freeze(net)
    assert trainable_leaf_paths(treenn.unfreeze(frozen, "backbone.layers.1.weight")) == {
        "backbone.layers.1.weight"
    }


def test_freezing_and_modes_are_independent(net):
    model = treenn.freeze(nn.eval_mode(net, nn.BatchNorm, pin=True), "backbone.**")
    assert nn.modes(model) == {"backbone.layers.1": True, "backbone.layers.3": False}
    assert nn.pinned(model) == {"backbone.layers.1": True, "backbone.layers.3": False}
    switched = nn.eval_mode(model)
    assert statuses(switched) == statuses(model)


# -- gradients and calls --------------------------------------------------------------


def _loss(model, x):
    return jnp.sum(jnp.square(model(x)))


def test_whole_model_grad_is_zero_for_frozen_arrays_and_buffers(net, images):
    # eqx.filter_grad of the whole model (plain jax.grad is not promised: modes are bool
    # leaves, as in Equinox).
    model = nn.eval_mode(net)  # eval-mode BatchNorm: the running stats are used
    frozen = treenn.freeze(model, "backbone.layers.0")
    grads_ref = eqx.filter_jit(eqx.filter_grad(_loss))(model, images)
    grads = eqx.filter_jit(eqx.filter_grad(_loss))(frozen, images)
    for path in ("backbone.layers.0.weight", "backbone.layers.0.bias", *NET_BUFFERS):
        assert not bool(jnp.any(leaf(grads, path) != 0.0)), path
    # Buffers get zero gradient without any freezing, too.
    for path in NET_BUFFERS:
        assert not bool(jnp.any(leaf(grads_ref, path) != 0.0)), path
    # Frozen arrays do get a gradient when they are trainable ...
    assert bool(jnp.any(leaf(grads_ref, "backbone.layers.0.weight") != 0.0))
    # ... and the trainable arrays' gradients are those of the unfrozen model.
    for path in NET_PARAMS - {"backbone.layers.0.weight", "backbone.layers.0.bias"}:
        assert jnp.allclose(leaf(grads, path), leaf(grads_ref, path), rtol=1e-5, atol=1e-6), path
    assert bool(jnp.any(leaf(grads, "backbone.layers.1.weight") != 0.0))


def test_whole_model_grad_of_a_fully_frozen_model_is_zero(net, images):
    frozen = treenn.freeze(nn.eval_mode(net))
    grads = eqx.filter_jit(eqx.filter_grad(_loss))(frozen, images)
    assert all(not bool(jnp.any(g != 0.0)) for g in jtu.tree_leaves(grads))
    assert len(jtu.tree_leaves(grads)) == len(NET_PARAMS | NET_BUFFERS)


def test_treenn_grad_skips_frozen_arrays(net, images):
    model = nn.eval_mode(net)
    frozen = treenn.freeze(model, "backbone.**")
    grads = treenn.grad(_loss)(frozen, images)
    assert {dotted(p) for p, _ in jtu.tree_flatten_with_path(grads)[0]} == {
        "head.weight",
        "head.bias",
    }
    ref = treenn.grad(_loss)(model, images)
    assert jnp.allclose(grads.head.weight, ref.head.weight, rtol=1e-5, atol=1e-6)


def test_frozen_model_stays_callable_with_the_same_outputs(net, images, key):
    model = nn.eval_mode(net)
    expected = model(images)
    for where in (None, "backbone.**", "**.bias", nn.BatchNorm):
        assert jnp.array_equal(treenn.freeze(model, where)(images), expected)
    frozen = treenn.freeze(model, "**.bias")
    assert jnp.allclose(eqx.filter_jit(lambda m, x: m(x))(frozen, images), expected, atol=1e-5)
    # Training mode through treenn.apply: same output, same statistics, statuses kept.
    out_ref, new_ref = treenn.apply(net, images, key=key)
    frozen = treenn.freeze(net)
    out, new = treenn.apply(frozen, images, key=key)
    assert jnp.array_equal(out, out_ref)
    assert jnp.array_equal(
        new.backbone.layers[1].running_mean, new_ref.backbone.layers[1].running_mean
    )
    assert statuses(new) == statuses(frozen)


def test_optimizer_sees_only_trainable_arrays(net, images):
    model = treenn.unfreeze(treenn.freeze(nn.eval_mode(net)), "**.bias")
    tx = optax.adam(1e-1)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
    mu = opt_state[0].mu
    assert {dotted(p) for p, _ in jtu.tree_flatten_with_path(mu)[0]} == BIASES
    grads = treenn.grad(_loss)(model, images)
    with optax_promotion():
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
    new = treenn.apply_updates(model, updates)
    assert statuses(new) == statuses(model)
    assert jnp.array_equal(new.head.weight, model.head.weight)
    assert not jnp.array_equal(new.head.bias, model.head.bias)


# -- buffers, integers, non-arrays ----------------------------------------------------


def test_buffers_never_become_trainable(net):
    # Selecting only buffers is an error naming the selector.
    for path in ("backbone.layers.1.running_mean", "**.running_*"):
        for helper in (treenn.freeze, treenn.unfreeze):
            with pytest.raises(ValueError, match=re.escape(f"where={path!r} matches no")):
                helper(net, path)
    with pytest.raises(ValueError, match=r"where=<getter .*<lambda>> matches no"):
        treenn.unfreeze(net, lambda m: m.backbone.layers[1].running_var)
    # Selecting a BatchNorm (un)freezes its parameters; its buffers stay buffers.
    bn_frozen = treenn.freeze(net, nn.BatchNorm)
    assert paths_with(bn_frozen, "frozen") == {"backbone.layers.1.weight", "backbone.layers.1.bias"}
    assert paths_with(bn_frozen, "buffer") == NET_BUFFERS
    for thawed in (treenn.unfreeze(bn_frozen), treenn.unfreeze(bn_frozen, nn.BatchNorm)):
        assert paths_with(thawed, "buffer") == NET_BUFFERS
        assert trainable_leaf_paths(thawed) == NET_PARAMS
    # A BatchNorm without affine parameters has nothing to freeze.
    with pytest.raises(ValueError, match=r"where=BatchNorm matches no"):
        treenn.freeze({"bn": nn.BatchNorm(2, affine=False)}, nn.BatchNorm)


def test_integer_and_non_array_leaves_never_trainable():
    model = Counter()
    assert statuses(model) == {
        "w": "trainable",
        "half": "trainable",
        "count": "static",
        "mask": "static",
    }  # `rate`, a Python float, is no array: no entry (treenn.statuses)
    assert trainable_leaf_paths(model) == {"w", "half"}
    frozen = treenn.freeze(model)
    assert paths_with(frozen, "frozen") == {"w", "half"}
    assert frozen.half.dtype == jnp.bfloat16
    assert statuses(treenn.unfreeze(frozen)) == statuses(model)
    assert trainable_leaf_paths(treenn.unfreeze(frozen)) == {"w", "half"}
    for path in ("count", "mask", "rate"):
        for helper in (treenn.freeze, treenn.unfreeze):
            with pytest.raises(ValueError, match=re.escape(f"where={path!r} matches no")):
                helper(model, path)


def test_freeze_a_path_to_a_non_array_is_an_error(net, eqx_user):
    for model, path in (
        (eqx_user, "mlp.activation"),  # a function leaf
        (eqx_user, "drop.p"),  # a Python float leaf
        (eqx_user, "drop"),  # a module without arrays
        (net, "backbone.layers.3"),  # Dropout
        (net, "backbone.layers.2"),  # Lambda
    ):
        with pytest.raises(ValueError, match=re.escape(f"where={path!r} matches no")):
            treenn.freeze(model, path)


# -- plain Equinox layers -------------------------------------------------------------


def test_freeze_inside_plain_equinox_layers(eqx_user):
    x = jnp.array([0.5, -1.0, 2.0])
    model = nn.eval_mode(eqx_user)
    expected = model(x)
    frozen = treenn.freeze(model, "mlp.layers.0")
    assert paths_with(frozen, "frozen") == {"mlp.layers.0.weight", "mlp.layers.0.bias"}
    assert jnp.array_equal(frozen(x), expected)
    assert jnp.allclose(eqx.filter_jit(lambda m, x: m(x))(frozen, x), expected, atol=1e-6)
    params = treenn.trainable(frozen)
    assert params.mlp.layers[0].weight is None and params.mlp.layers[0].bias is None
    assert params.mlp.layers[1].weight is not None
    # Array granularity inside a foreign layer.
    one = treenn.freeze(model, lambda m: m.mlp.layers[2].bias)
    assert paths_with(one, "frozen") == {"mlp.layers.2.bias"}
    assert jnp.array_equal(one(x), expected)
    # Everything frozen: still callable, nothing trainable.
    everything = treenn.freeze(model)
    assert jnp.array_equal(everything(x), expected)
    assert jtu.tree_leaves(treenn.trainable(everything)) == []
    assert eqx.tree_equal(treenn.unfreeze(everything), model)
    # A getter reaching a frozen array inside a foreign layer (no unwrapping there).
    one_back = treenn.unfreeze(everything, lambda m: m.mlp.layers[2].bias)
    assert trainable_leaf_paths(one_back) == {"mlp.layers.2.bias"}
    # A class selector for the foreign layer type.
    linears = treenn.freeze(model, eqx.nn.Linear)
    assert paths_with(linears, "frozen") == {
        f"mlp.layers.{i}.{name}" for i in range(3) for name in ("weight", "bias")
    }


def test_frozen_arrays_in_equinox_layers_excluded_from_grad_and_optimizer(eqx_user):
    x = jnp.array([0.5, -1.0, 2.0])
    model = nn.eval_mode(eqx_user)
    frozen = treenn.freeze(model, "mlp.layers.0")
    grads = treenn.grad(_loss)(frozen, x)
    assert grads.mlp.layers[0].weight is None
    ref = treenn.grad(_loss)(model, x)
    assert jnp.allclose(grads.mlp.layers[1].weight, ref.mlp.layers[1].weight, atol=1e-6)
    tx = optax.sgd(0.1)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(frozen))
        updates, _ = tx.update(grads, opt_state, treenn.trainable(frozen))
    new = treenn.apply_updates(frozen, updates)
    assert jnp.array_equal(new.mlp.layers[0].weight, model.mlp.layers[0].weight)
    assert not jnp.array_equal(new.mlp.layers[1].weight, model.mlp.layers[1].weight)
    assert paths_with(new, "frozen") == {"mlp.layers.0.weight", "mlp.layers.0.bias"}


class ConvUser(treenn.Module):
    """A treenn model around a plain Equinox convolution (which calls `lax` on its
    weight rather than Python operators)."""

    conv: eqx.nn.Conv2d

    def __init__(self, *, key):
        self.conv = eqx.nn.Conv2d(2, 2, 3, padding=1, key=key)

    def __call__(self, x, *, key=None):
        return self.conv(x)


def test_frozen_plain_equinox_conv_stays_callable(key):
    model = ConvUser(key=key)
    x = jnp.arange(18.0).reshape(2, 3, 3)
    expected = model(x)
    frozen = treenn.freeze(model, "conv.weight")
    assert paths_with(frozen, "frozen") == {"conv.weight"}
    assert jnp.allclose(frozen(x), expected, atol=1e-6)
    assert jnp.allclose(eqx.filter_jit(lambda m, x: m(x))(frozen, x), expected, atol=1e-5)
    grads = treenn.grad(lambda m, x: jnp.sum(m(x)))(frozen, x)
    assert grads.conv.weight is None
    assert grads.conv.bias is not None


class Table(treenn.Module):
    """A treenn model keeping its parameters in a tuple and using jnp functions on them."""

    params: tuple

    def __init__(self):
        self.params = (jnp.array([0.5, -1.0]), jnp.array([2.0, 3.0]))

    def __call__(self, x, *, key=None):
        scale, shift = self.params
        return jnp.tanh(scale) * x + jnp.sum(shift)


def test_frozen_array_in_a_container_works_with_jnp_functions():
    model = Table()
    x = jnp.array([1.0, 2.0])
    expected = model(x)
    frozen = treenn.freeze(model, "params.0")
    assert paths_with(frozen, "frozen") == {"params.0"}
    assert jnp.allclose(frozen(x), expected)
    grads = jax.grad(lambda m: jnp.sum(m(x)))(frozen)
    assert not bool(jnp.any(leaf(grads, "params.0") != 0.0))
    assert jnp.array_equal(leaf(grads, "params.1"), jnp.array([2.0, 2.0]))


def test_unfreeze_with_unpin_is_gradual_unfreezing_in_one_call(net):
    """Issue 13 (5): `unfreeze(m, s)` alone leaves the block's BatchNorm pinned in eval
    (a recipe too: frozen statistics); `unpin=True` also removes the selection's pins."""
    frozen = treenn.freeze_backbone(net, "head")
    assert nn.pinned(frozen) == {"backbone.layers.1": True, "backbone.layers.3": True}
    kept = treenn.unfreeze(frozen, "backbone.layers.1")
    assert nn.pinned(kept)["backbone.layers.1"] is True
    both = treenn.unfreeze(frozen, "backbone.layers.1", unpin=True)
    assert nn.pinned(both) == {"backbone.layers.1": False, "backbone.layers.3": True}
    assert treenn.trainable(both).backbone.layers[1].weight is not None
    assert nn.modes(nn.train_mode(both))["backbone.layers.1"] is False
    # Same as the two calls; a selection without mode-bearing modules is no error.
    assert eqx.tree_equal(
        both, nn.unpin(treenn.unfreeze(frozen, "backbone.layers.1"), "backbone.layers.1")
    )
    assert nn.pinned(treenn.unfreeze(frozen, "backbone.layers.0", unpin=True)) == nn.pinned(frozen)
    with pytest.raises(ValueError, match="where='nothing' matches no"):
        treenn.unfreeze(frozen, "nothing", unpin=True)


# -- regressions (issue 21) -----------------------------------------------------------


class _EqxMC(eqx.Module):
    """An Equinox model with a train-pinned `eqx.nn.Dropout`: the MC-dropout recipe."""

    lin: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __call__(self, x, *, key=None):
        return self.drop(self.lin(x), key=key)


@pytest.mark.parametrize(
    "surgery",
    [
        lambda m: treenn.freeze(m, "lin"),
        lambda m: treenn.freeze(m, lambda m: m.lin),
        lambda m: treenn.unfreeze(treenn.freeze(m)),
        lambda m: treenn.unfreeze(treenn.freeze(m, "lin"), "lin.weight"),
    ],
    ids=["path", "getter", "unfreeze-all", "unfreeze-one"],
)
def test_a_train_pinned_equinox_dropout_keeps_dropping_after_freezing(key, surgery):
    model = _EqxMC(eqx.nn.Linear(64, 64, key=key), eqx.nn.Dropout(0.5))
    model = nn.train_mode(model, lambda m: m.drop, pin=True)
    new = surgery(model)
    # The class reads through the pin: user code sees the bool, never the mark.
    assert new.drop.inference is False
    assert nn.modes(new) == {"drop": False} and nn.pinned(new) == {"drop": True}
    x = jnp.ones((64,))
    y = new(x, key=key)
    assert int(jnp.sum(y == 0)) > 8  # it drops (64 units, p=0.5)


def test_freezing_keeps_a_foreign_module_class_fitted_to_every_mark(key):
    # A frozen array and a pin in one Equinox module: unfreezing the array leaves the
    # pin, so the module must keep the class that reads through marks.
    class Both(eqx.Module):
        weight: jax.Array
        inference: bool

    both = nn.train_mode(Both(jnp.ones(3), False), pin=True)
    both = treenn.unfreeze(treenn.freeze(both), "weight")
    assert both.inference is False
    assert treenn.statuses(both) == {"weight": "trainable"}


def test_l2_penalty_gives_frozen_arrays_and_buffers_zero_gradient(key):
    # The standard Equinox L2 penalty reads the leaves, not the attributes.
    model = nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4))
    model = nn.eval_mode(treenn.freeze(model, "layers.0"), nn.BatchNorm)

    def penalty(m):
        leaves = jtu.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
        return sum(jnp.sum(x**2) for x in leaves)

    grads = eqx.filter_grad(penalty)(model)
    named = dict(leaves_by_path(grads))
    for path in ("layers.0.weight", "layers.0.bias", "layers.1.running_var"):
        assert float(jnp.abs(named[path]).max()) == 0.0, path
    assert float(jnp.abs(named["layers.1.weight"]).max()) > 0.0
    params, static = eqx.partition(model, eqx.is_inexact_array)
    moved = eqx.combine(jtu.tree_map(lambda p, g: p - 0.1 * g, params, grads), static)
    old, new = dict(leaves_by_path(model)), dict(leaves_by_path(moved))
    assert jnp.array_equal(new["layers.0.weight"], old["layers.0.weight"])
    assert jnp.array_equal(new["layers.1.running_var"], old["layers.1.running_var"])


def test_keystr_paths_of_frozen_arrays(key):
    # API.md §4 as narrowed in docs/concepts/freezing.md: the default `keystr` and
    # treenn's dotted paths never change; a simple keystr with a separator shows the
    # mark's empty key as a trailing separator.
    lin = nn.Linear(2, 2, key=key)
    frozen = treenn.freeze(lin)

    def keystrs(m, **kw):
        return [jtu.keystr(p, **kw) for p, _ in jtu.tree_flatten_with_path(m)[0]]

    assert keystrs(frozen) == keystrs(lin) == [".weight", ".bias"]
    assert keystrs(frozen, simple=True, separator=".") == ["weight.", "bias."]
    assert list(treenn.statuses(frozen)) == ["weight", "bias"]
