"""Issue 13: no silent path between the mode a user set and the mode that runs
(train_step/eval_step's implicit switch, nested apply, pins on Equinox layers)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Net, optax_promotion

import treenn
from treenn import nn

BN, DROP = "backbone.layers.1", "backbone.layers.3"


def _xent(model, x, y, key):
    logits = model(x, key=key)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


@pytest.fixture
def labels():
    return jnp.array([0, 1, 2, 0, 1, 2])


def _step(loss=_xent):
    with optax_promotion():
        return treenn.train_step(loss, optax.sgd(0.1))


def test_train_step_refuses_unpinned_modules_in_mixed_modes(net, images, labels, key):
    """The mistake: `nn.eval_mode(model, "backbone")` without pin=True. The step used to
    switch the backbone's BatchNorm back to training (its statistics drifted)."""
    model = nn.eval_mode(net, "backbone.layers.1")
    opt_state = optax.sgd(0.1).init(treenn.trainable(model))
    step = _step()
    with pytest.raises(ValueError, match=r"mixed modes.*'backbone\.layers\.1'.*pin=True"):
        step(model, opt_state, images, labels, key)
    with pytest.raises(ValueError, match=r"nn\.train_mode\(model, where\)"):
        step(model, opt_state, images, labels, key)
    # eval_step likewise, the other way round.
    predict = treenn.eval_step(lambda m, x: m(x))
    with pytest.raises(ValueError, match=r"treenn\.eval_step.*'backbone\.layers\.3'"):
        predict(model, images)


def test_train_step_recipe_pin_keeps_the_mode(net, images, labels, key):
    model = nn.eval_mode(net, "backbone.layers.1", pin=True)  # the recipe
    opt_state = optax.sgd(0.1).init(treenn.trainable(model))
    with optax_promotion():
        new, _, _ = _step()(model, opt_state, images, labels, key)
    bn = new.backbone.layers[1]
    # Pinned in eval: the running statistics were used, not updated.
    assert jnp.array_equal(bn.running_mean, jnp.zeros(4))
    assert jnp.array_equal(bn.running_var, jnp.ones(4))
    assert nn.modes(new) == nn.modes(model) and nn.pinned(new) == nn.pinned(model)


def test_train_step_switches_a_model_whose_unpinned_modules_share_one_mode(
    net, images, labels, key
):
    model = nn.eval_mode(net)  # all in eval, unpinned: switched to training as before
    opt_state = optax.sgd(0.1).init(treenn.trainable(model))
    with optax_promotion():
        new, _, _ = _step()(model, opt_state, images, labels, key)
    assert not jnp.array_equal(new.backbone.layers[1].running_mean, jnp.zeros(4))
    assert nn.modes(new) == {BN: True, DROP: True}  # the modes it went in with


def test_freeze_backbone_on_an_equinox_model_pins_and_train_step_keeps_it(key):
    """freeze_backbone raised `cannot pin equinox.nn._dropout.Dropout`; the workaround
    (eval without pin) was undone by train_step: the backbone's dropout ran."""
    k1, k2 = jax.random.split(key)
    model = eqx.nn.Sequential(
        [eqx.nn.Linear(4, 8, key=k1), eqx.nn.Dropout(0.5), eqx.nn.Linear(8, 2, key=k2)]
    )
    frozen = treenn.freeze_backbone(model, "layers.2")
    assert nn.pinned(frozen) == {"layers.1": True} and nn.modes(frozen) == {"layers.1": True}
    x = jax.random.normal(key, (16, 4))

    def loss(m, x, key):
        return jnp.mean(jax.vmap(lambda xi: m(xi, key=key))(x) ** 2)

    expected = loss(frozen, x, None)  # dropout in eval: deterministic
    with optax_promotion():
        step = treenn.train_step(loss, optax.sgd(0.0))
        opt_state = optax.sgd(0.0).init(treenn.trainable(frozen))
        _, _, got = step(frozen, opt_state, x, jax.random.key(3))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_apply_nested_in_train_step_loss_reaches_the_model(net, images, labels, key):
    """A loss calling treenn.apply inside train_step dropped the statistics."""

    def loss(m, x, y, key):
        logits, m = treenn.apply(m, x, key=key)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))

    opt_state = optax.sgd(0.0).init(treenn.trainable(net))
    with optax_promotion():
        new, _, _ = _step(loss)(net, opt_state, images, labels, key)
    _, direct = treenn.apply(net, images, key=key)
    got, want = new.backbone.layers[1].running_mean, direct.backbone.layers[1].running_mean
    assert not jnp.array_equal(got, jnp.zeros(4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class Outer(treenn.Module):
    inner: Net

    def __call__(self, x, *, key=None):
        out, _ = treenn.apply(self.inner, x, key=key)  # nested apply, result discarded
        return out


def test_apply_nested_in_call_records_into_the_outermost(net, images, key):
    outer = Outer(net)
    _, new = treenn.apply(outer, images, key=key)
    _, direct = treenn.apply(net, images, key=key)
    got = new.inner.backbone.layers[1].running_mean
    assert not jnp.array_equal(got, jnp.zeros(4))
    np.testing.assert_allclose(got, direct.backbone.layers[1].running_mean, rtol=1e-5)


def test_two_sequential_nested_applies_both_count(net, images, key):
    """The second nested apply updates the model the first returned: both updates reach
    the outermost call's model, as two direct applies would."""
    _, once = treenn.apply(net, images, key=key)
    _, expected = treenn.apply(once, images, key=key)
    _, got = treenn.apply(Twice(net), images, key=key)
    np.testing.assert_allclose(
        got.net.backbone.layers[1].running_var,
        expected.backbone.layers[1].running_var,
        rtol=1e-5,
    )


class Twice(treenn.Module):
    net: Net

    def __call__(self, x, *, key=None):
        _, m = treenn.apply(self.net, x, key=key)
        out, _ = treenn.apply(m, x, key=key)
        return out


def test_optimiser_state_is_independent_of_modes_and_pins(net, eqx_user):
    for model in (net, eqx_user):
        base = jax.tree_util.tree_structure(treenn.trainable(model))
        for edited in (
            nn.eval_mode(model),
            nn.eval_mode(model, pin=True),
            nn.train_mode(model, pin=True),
            eqx.nn.inference_mode(model),
        ):
            assert jax.tree_util.tree_structure(treenn.trainable(edited)) == base
