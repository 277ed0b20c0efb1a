"""Modes: nn.eval_mode / nn.train_mode / pins / nn.modes (API.md section 3)."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import treenn
from treenn import nn

BN = "backbone.layers.1"
DROP = "backbone.layers.3"


def all_modes(model, inference):
    return {path: inference for path in nn.modes(model)}


# -- user modules ---------------------------------------------------------------------


class Gate(treenn.Module):
    """A user module with its own (static) `inference` flag."""

    scale: jax.Array
    inference: bool = eqx.field(static=True)

    def __init__(self, *, inference: bool = False):
        self.scale = jnp.array(3.0)
        self.inference = inference

    def __call__(self, x, *, key=None):
        return x if self.inference else x * self.scale


class LeafGate(treenn.Module):
    """A user module whose `inference` is a plain (non-static) field, as in Equinox."""

    inference: bool

    def __init__(self):
        self.inference = False

    def __call__(self, x, *, key=None):
        return x if self.inference else -x


class Block(treenn.Module):
    """A mode-bearing module holding mode-bearing children."""

    drop: nn.Dropout
    gate: Gate
    inner: Gate
    inference: bool = eqx.field(static=True)

    def __init__(self):
        self.drop = nn.Dropout(0.5)
        self.gate = Gate()
        self.inner = Gate()
        self.inference = False


class Mixed(treenn.Module):
    """treenn and plain Equinox mode-bearing layers side by side."""

    ours: nn.Dropout
    theirs: eqx.nn.Dropout

    def __init__(self):
        self.ours = nn.Dropout(0.5)
        self.theirs = eqx.nn.Dropout(0.5)


# -- switching ------------------------------------------------------------------------


def test_modes_lists_every_mode_bearing_module(net):
    assert nn.modes(net) == {BN: False, DROP: False}
    assert nn.pinned(net) == {BN: False, DROP: False}
    assert nn.modes(nn.Dropout(0.1)) == {"": False}
    assert nn.modes(nn.Dropout(0.1, inference=True)) == {"": True}


def test_eval_and_train_mode_return_new_models(net):
    evaluated = nn.eval_mode(net)
    assert nn.modes(evaluated) == {BN: True, DROP: True}
    assert nn.modes(net) == {BN: False, DROP: False}  # untouched
    trained = nn.train_mode(evaluated)
    assert nn.modes(trained) == {BN: False, DROP: False}
    assert nn.modes(evaluated) == {BN: True, DROP: True}  # untouched
    # Only modes change: the arrays are the same.
    assert eqx.tree_equal(eqx.filter(trained, eqx.is_array), eqx.filter(net, eqx.is_array))
    assert eqx.tree_equal(trained, net)


def test_where_restricts_the_switch(net):
    assert nn.modes(nn.eval_mode(net, nn.Dropout)) == {BN: False, DROP: True}
    assert nn.modes(nn.eval_mode(net, BN)) == {BN: True, DROP: False}
    assert nn.modes(nn.eval_mode(net, lambda m: m.backbone.layers[3])) == {
        BN: False,
        DROP: True,
    }
    # Selecting a module selects the mode-bearing modules inside it.
    assert nn.modes(nn.eval_mode(net, "backbone")) == {BN: True, DROP: True}
    assert nn.modes(nn.train_mode(nn.eval_mode(net), nn.BatchNorm)) == {BN: False, DROP: True}


def test_dropout_behaviour_changes_with_mode(key):
    x = jnp.ones((64,))
    drop = nn.Dropout(0.5)
    y = drop(x, key=key)
    assert set(jnp.unique(y).tolist()) == {0.0, 2.0}
    evaluated = nn.eval_mode(drop)
    assert jnp.array_equal(evaluated(x), x)  # identity, no key needed
    assert jnp.array_equal(evaluated(x, key=key), x)
    retrained = nn.train_mode(evaluated)
    assert jnp.array_equal(retrained(x, key=key), y)
    with pytest.raises(ValueError, match=r"nn\.Dropout\(p=0\.5\) is in training mode"):
        retrained(x)


def test_batchnorm_uses_running_statistics_in_eval(key):
    x = 3.0 * jax.random.normal(key, (8, 3)) + 2.0
    bn = nn.BatchNorm(3)
    y_train, updated = treenn.apply(bn, x)
    # Training mode: batch statistics.
    assert jnp.allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)
    assert jnp.allclose(jnp.var(y_train, axis=0), 1.0, atol=1e-3)
    # Eval mode: the initial running statistics are mean 0, var 1: nearly the identity.
    y_eval = nn.eval_mode(bn)(x)
    assert jnp.allclose(y_eval, x / jnp.sqrt(1.0 + 1e-5), atol=1e-5)
    assert not jnp.allclose(y_eval, y_train, atol=1e-1)
    # Eval after an update uses the updated statistics, and does not update them again.
    evaluated = nn.eval_mode(updated)
    mean, var = evaluated.running_mean, evaluated.running_var
    assert not jnp.allclose(mean, 0.0)
    expected = (x - mean[None, :]) / jnp.sqrt(var[None, :] + 1e-5)
    y2, after = treenn.apply(evaluated, x)
    assert jnp.allclose(y2, expected, atol=1e-5)
    assert jnp.array_equal(after.running_mean, mean)


def test_eval_mode_changes_the_whole_model_output(net, images, key):
    evaluated = nn.eval_mode(net)
    a = evaluated(images)
    b = evaluated(images, key=key)  # eval: the key changes nothing
    assert jnp.array_equal(a, b)
    out_train, _ = treenn.apply(net, images, key=key)
    assert out_train.shape == a.shape
    assert not jnp.allclose(out_train, a)


# -- plain Equinox layers -------------------------------------------------------------


def test_equinox_dropout(key):
    x = jnp.ones((64,))
    drop = eqx.nn.Dropout(0.5)
    assert nn.modes(drop) == {"": False}
    evaluated = nn.eval_mode(drop)
    assert isinstance(evaluated, eqx.nn.Dropout)
    assert nn.modes(evaluated) == {"": True}
    assert drop.inference is False  # untouched
    assert jnp.array_equal(evaluated(x, key=key), x)
    trained = nn.train_mode(evaluated)
    assert nn.modes(trained) == {"": False}
    assert set(jnp.unique(trained(x, key=key)).tolist()) == {0.0, 2.0}
    assert nn.pinned(trained) == {"": False}


def test_equinox_batchnorm(key):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch", mode="batch")
    x = 3.0 * jax.random.normal(key, (8, 3)) + 2.0
    call = jax.vmap(
        lambda m, x, s: m(x, s), in_axes=(None, 0, None), out_axes=(0, None), axis_name="batch"
    )
    assert nn.modes(bn) == {"": False}
    y_train, _ = call(bn, x, state)
    assert jnp.allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)
    evaluated = nn.eval_mode(bn)
    assert nn.modes(evaluated) == {"": True}
    assert nn.modes(bn) == {"": False}
    y_eval, _ = call(evaluated, x, state)
    assert jnp.allclose(y_eval, x, atol=1e-3)  # initial running stats: mean 0, var 1
    assert nn.modes(nn.train_mode(evaluated)) == {"": False}


def test_equinox_layers_inside_user_modules(eqx_user, key):
    x = jnp.array([0.5, -1.0, 2.0])
    assert nn.modes(eqx_user) == {"drop": False}
    evaluated = nn.eval_mode(eqx_user)
    assert nn.modes(evaluated) == {"drop": True}
    assert nn.modes(eqx_user) == {"drop": False}
    y = eqx_user.mlp(x)
    assert jnp.array_equal(evaluated(x, key=key), y)
    assert jnp.array_equal(evaluated(x), y)
    # Training mode: every output is either dropped or scaled by 1 / (1 - p).
    keys = jax.random.split(key, 16)
    outs = jax.vmap(lambda k: eqx_user(x, key=k))(keys)
    assert bool(jnp.all(jnp.isclose(outs, 0.0) | jnp.isclose(outs, 2.0 * y[None, :])))
    assert bool(jnp.any(jnp.isclose(outs, 0.0)))
    # Selecting the MLP (no mode-bearing module inside) is an error.
    with pytest.raises(ValueError, match=re.escape("where='mlp' matches no mode-bearing")):
        nn.eval_mode(eqx_user, "mlp")
    assert nn.modes(nn.eval_mode(eqx_user, eqx.nn.Dropout)) == {"drop": True}
    assert nn.modes(nn.eval_mode(eqx_user, "drop")) == {"drop": True}


# -- pins -----------------------------------------------------------------------------


def test_pin_keeps_the_mode_through_unpinned_calls(net):
    pinned = nn.eval_mode(net, nn.BatchNorm, pin=True)
    assert nn.modes(pinned) == {BN: True, DROP: False}
    assert nn.pinned(pinned) == {BN: True, DROP: False}
    assert nn.pinned(net) == {BN: False, DROP: False}  # untouched
    trained = nn.train_mode(pinned)
    assert nn.modes(trained) == {BN: True, DROP: False}
    assert nn.pinned(trained) == {BN: True, DROP: False}
    evaluated = nn.eval_mode(trained)
    assert nn.modes(evaluated) == {BN: True, DROP: True}
    assert nn.modes(nn.train_mode(evaluated)) == {BN: True, DROP: False}


def test_explicit_switch_of_only_pinned_modules_is_an_error(net):
    """Issue 13 (3): `nn.train_mode(p, "backbone.block1.bn")` with that module pinned
    returned `p` unchanged and raised nothing."""
    pinned = nn.eval_mode(net, nn.BatchNorm, pin=True)
    for where in (nn.BatchNorm, BN, lambda m: m.backbone.layers[1]):
        with pytest.raises(ValueError, match=r"only pinned modules \('backbone\.layers\.1'\)"):
            nn.train_mode(pinned, where)
        with pytest.raises(ValueError, match=r"pin=True.*nn\.unpin"):
            nn.train_mode(pinned, where)
    # The ways out: pin=True switches (the pin stays), or unpin first.
    out = nn.train_mode(pinned, BN, pin=True)
    assert nn.modes(out) == {BN: False, DROP: False} and nn.pinned(out)[BN] is True
    assert nn.modes(nn.train_mode(nn.unpin(pinned, BN), BN))[BN] is False
    # Partly pinned: the others switch, the pinned one keeps its mode.
    evaluated = nn.eval_mode(nn.unpin(pinned))
    part = nn.train_mode(nn.eval_mode(evaluated, BN, pin=True), "backbone.**")
    assert nn.modes(part) == {BN: True, DROP: False}
    # where=None never errors.
    assert nn.modes(nn.train_mode(nn.eval_mode(net, pin=True))) == {BN: True, DROP: True}


def test_frozen_batchnorm_recipe(net, images, key):
    model = nn.eval_mode(net, "backbone.**", pin=True)
    model = nn.unpin(model, nn.Dropout)
    for epoch in range(2):
        model = nn.train_mode(model)
        assert nn.modes(model) == {BN: True, DROP: False}
        _, new = treenn.apply(model, images, key=jax.random.fold_in(key, epoch))
        # A pinned-eval BatchNorm neither uses nor updates batch statistics.
        bn = new.backbone.layers[1]
        assert jnp.array_equal(bn.running_mean, jnp.zeros((4,)))
        assert jnp.array_equal(bn.running_var, jnp.ones((4,)))
        model = nn.eval_mode(new)
    assert nn.modes(model) == {BN: True, DROP: True}
    assert nn.modes(nn.train_mode(model)) == {BN: True, DROP: False}


def test_pin_true_sets_the_mode_even_on_a_pinned_module(net):
    pinned = nn.eval_mode(net, nn.BatchNorm, pin=True)
    mc = nn.train_mode(pinned, nn.BatchNorm, pin=True)
    assert nn.modes(mc) == {BN: False, DROP: False}
    assert nn.pinned(mc) == {BN: True, DROP: False}
    # Pinned in training mode: eval_mode(model) leaves it training (MC dropout).
    mc_dropout = nn.train_mode(nn.eval_mode(net), nn.Dropout, pin=True)
    assert nn.modes(nn.eval_mode(mc_dropout)) == {BN: True, DROP: False}


def test_unpin_removes_pins_without_changing_modes(net):
    pinned = nn.eval_mode(net, pin=True)
    assert nn.pinned(pinned) == {BN: True, DROP: True}
    partly = nn.unpin(pinned, nn.Dropout)
    assert nn.pinned(partly) == {BN: True, DROP: False}
    assert nn.modes(partly) == {BN: True, DROP: True}
    free = nn.unpin(pinned)
    assert nn.pinned(free) == {BN: False, DROP: False}
    assert nn.modes(free) == {BN: True, DROP: True}
    assert nn.pinned(pinned) == {BN: True, DROP: True}  # untouched
    assert nn.modes(nn.train_mode(free)) == {BN: False, DROP: False}
    # Unpinning an unpinned module is fine; selecting no mode-bearing module is not.
    assert nn.pinned(nn.unpin(net, DROP)) == {BN: False, DROP: False}
    with pytest.raises(ValueError, match=re.escape("where='head' matches no mode-bearing")):
        nn.unpin(pinned, "head")


def test_pin_on_a_foreign_equinox_layer(eqx_user):
    """Issue 13: pins work on Equinox's layers (they raised `cannot pin ...`)."""
    pinned = nn.eval_mode(eqx_user, pin=True)
    assert nn.pinned(pinned) == {"drop": True} and nn.modes(pinned) == {"drop": True}
    assert nn.modes(nn.train_mode(pinned)) == {"drop": True}
    assert nn.modes(nn.train_mode(eqx_user, "drop", pin=True)) == {"drop": False}
    bn = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")
    pinned_bn = nn.eval_mode(bn, pin=True)
    assert nn.pinned(pinned_bn) == {"": True}
    assert pinned_bn.inference is True and isinstance(pinned_bn, eqx.nn.BatchNorm)
    # Pinning only the treenn layer of a mixed model works.
    mixed = nn.eval_mode(Mixed(), "ours", pin=True)
    assert nn.pinned(mixed) == {"ours": True, "theirs": False}
    assert nn.modes(nn.train_mode(mixed)) == {"ours": True, "theirs": False}
    assert nn.pinned(nn.eval_mode(mixed, pin=True)) == {"ours": True, "theirs": True}


def test_unpin_on_foreign_layers_is_a_no_op(eqx_user):
    assert nn.pinned(eqx_user) == {"drop": False}
    out = nn.unpin(eqx_user)
    assert nn.modes(out) == {"drop": False}
    assert eqx.tree_equal(out, eqx_user)


# -- selectors that match nothing -----------------------------------------------------


def test_selector_matching_no_mode_bearing_module(net):
    for where, name in (
        ("head", "'head'"),
        ("backbone.layers.0.**", "'backbone.layers.0.**'"),
        (nn.Linear, "Linear"),
        (nn.Conv2d, "Conv2d"),
        (lambda m: m.head, "<getter"),
    ):
        for helper in (nn.eval_mode, nn.train_mode):
            with pytest.raises(ValueError, match=re.escape(f"where={name}")):
                helper(net, where)
        with pytest.raises(ValueError, match=re.escape(f"where={name}")):
            nn.eval_mode(net, where, pin=True)


# -- user modules with `inference` ----------------------------------------------------


def test_user_module_with_inference_field(key):
    x = jnp.array([1.0, 2.0])
    gate = Gate()
    assert nn.modes(gate) == {"": False}
    assert jnp.array_equal(gate(x), 3.0 * x)
    evaluated = nn.eval_mode(gate)
    assert nn.modes(evaluated) == {"": True}
    assert jnp.array_equal(evaluated(x), x)
    assert jnp.array_equal(nn.train_mode(evaluated)(x), 3.0 * x)
    # A non-static `inference` field, as Equinox writes it.
    leaf_gate = LeafGate()
    assert nn.modes(leaf_gate) == {"": False}
    assert jnp.array_equal(nn.eval_mode(leaf_gate)(x), x)
    # Pins work on any mode-bearing module, a static `inference` field included.
    pinned = nn.eval_mode(gate, pin=True)
    assert nn.pinned(pinned) == {"": True}
    assert jnp.array_equal(nn.train_mode(pinned)(x), x)
    assert nn.pinned(nn.eval_mode(leaf_gate, pin=True)) == {"": True}


def test_nested_mode_bearing_modules():
    block = Block()
    assert nn.modes(block) == {"": False, "drop": False, "gate": False, "inner": False}
    assert nn.modes(nn.eval_mode(block)) == {"": True, "drop": True, "gate": True, "inner": True}
    # A class selector on the root covers its mode-bearing children.
    assert set(nn.modes(nn.eval_mode(block, Block)).values()) == {True}
    assert nn.modes(nn.eval_mode(block, "gate")) == {
        "": False,
        "drop": False,
        "gate": True,
        "inner": False,
    }
    assert nn.modes(nn.eval_mode(block, Gate)) == {
        "": False,
        "drop": False,
        "gate": True,
        "inner": True,
    }
    # `**` covers the root too; `*` only its children.
    assert nn.modes(nn.eval_mode(block, "**"))[""] is True
    assert nn.modes(nn.eval_mode(block, "*")) == {
        "": False,
        "drop": True,
        "gate": True,
        "inner": True,
    }
    assert nn.modes(nn.eval_mode(block, lambda m: m)) == nn.modes(nn.eval_mode(block))
    # Below the root: an unselected mode-bearing module keeps its mode while a selected
    # child inside it switches.
    model = {"block": Block(), "other": nn.Dropout(0.1)}
    assert nn.modes(nn.eval_mode(model, "block.gate")) == {
        "block": False,
        "block.drop": False,
        "block.gate": True,
        "block.inner": False,
        "other": False,
    }
    pinned = nn.eval_mode(model, "block.drop", pin=True)
    assert nn.pinned(pinned) == {
        "block": False,
        "block.drop": True,
        "block.gate": False,
        "block.inner": False,
        "other": False,
    }
    assert nn.modes(nn.train_mode(nn.eval_mode(pinned))) == {
        "block": False,
        "block.drop": True,
        "block.gate": False,
        "block.inner": False,
        "other": False,
    }


def test_mode_bearing_modules_inside_containers_and_nested_models(net):
    model = {"nets": [net, nn.eval_mode(net)], "drop": nn.Dropout(0.1)}
    assert nn.modes(model) == {
        "nets.0." + BN: False,
        "nets.0." + DROP: False,
        "nets.1." + BN: True,
        "nets.1." + DROP: True,
        "drop": False,
    }
    assert nn.modes(nn.eval_mode(model, "nets.0")) == {
        "nets.0." + BN: True,
        "nets.0." + DROP: True,
        "nets.1." + BN: True,
        "nets.1." + DROP: True,
        "drop": False,
    }


def test_the_same_switch_twice_is_idempotent(key):
    drop = nn.Dropout(0.5)
    shared = nn.Sequential(drop, nn.Linear(2, 2, key=key), drop)
    assert nn.modes(shared) == {"layers.0": False, "layers.2": False}
    evaluated = nn.eval_mode(shared)
    assert nn.modes(evaluated) == {"layers.0": True, "layers.2": True}
    again = nn.eval_mode(evaluated)
    assert nn.modes(again) == nn.modes(evaluated)
    assert eqx.tree_equal(again, evaluated)
    x = jnp.ones((4, 2))
    assert jnp.array_equal(again(x, key=key), evaluated(x))
    # A getter naming the same module twice.
    twice = nn.eval_mode(shared, lambda m: (m.layers[0], m.layers[0]))
    assert nn.modes(twice) == {"layers.0": True, "layers.2": False}
    # Pinning twice, too.
    pinned = nn.eval_mode(nn.eval_mode(shared, pin=True), pin=True)
    assert nn.pinned(pinned) == {"layers.0": True, "layers.2": True}


# -- transforms -----------------------------------------------------------------------


def test_modes_survive_jit_round_trips(net, eqx_user, images):
    model = nn.eval_mode(net, nn.BatchNorm, pin=True)
    for transform in (eqx.filter_jit, jax.jit):
        out = transform(lambda m: m)(model)
        assert nn.modes(out) == {BN: True, DROP: False}
        assert nn.pinned(out) == {BN: True, DROP: False}
        switched = transform(lambda m: nn.eval_mode(m))(model)
        assert nn.modes(switched) == {BN: True, DROP: True}
        assert nn.pinned(switched) == {BN: True, DROP: False}
        assert nn.modes(nn.train_mode(switched)) == {BN: True, DROP: False}
    evaluated = nn.eval_mode(net)
    jitted = eqx.filter_jit(lambda m, x: m(x))(evaluated, images)
    assert jnp.allclose(jitted, evaluated(images), atol=1e-5)
    # Plain Equinox layers through filter_jit.
    user = eqx.filter_jit(lambda m: nn.eval_mode(m))(eqx_user)
    assert nn.modes(user) == {"drop": True}
    assert nn.modes(eqx.filter_jit(lambda m: m)(user)) == {"drop": True}
