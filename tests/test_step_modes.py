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


# -- issue 21, defect 5: treenn.apply inside a JAX transform in a train_step loss ----------
# Following the error's advice ("apply the transform outside treenn.apply") dropped the
# statistics: the loss returned the model the transform gave back, and train_step used
# its own (empty) records instead.


def _tiny(key):
    return nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4))


def _tiny_step(loss, model, *args, has_aux=True):
    with optax_promotion():
        tx = optax.sgd(0.0)  # the statistics alone change
        step = treenn.train_step(loss, tx, has_aux=has_aux)
        return step(model, tx.init(treenn.trainable(model)), *args)


def _assert_same_stats(got, want):
    for name in ("running_mean", "running_var"):
        a, b = getattr(got.layers[1], name), getattr(want.layers[1], name)
        assert not jnp.array_equal(a, getattr(nn.BatchNorm(4), name))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _checkpointed(m, x):
    out, m = eqx.filter_checkpoint(treenn.apply)(m, x)
    return jnp.mean(out**2), m


def _micro_batches(m, xs):
    """lax.scan over micro-batches, the model's arrays as the carry."""
    params, static = eqx.partition(m, eqx.is_array)

    def body(params, xb):
        out, new = treenn.apply(eqx.combine(params, static), xb)
        return eqx.filter(new, eqx.is_array), jnp.mean(out**2)

    params, losses = jax.lax.scan(body, params, xs)
    return jnp.mean(losses), eqx.combine(params, static)


def _ensemble(m, x):
    out, m = eqx.filter_vmap(treenn.apply, in_axes=(eqx.if_array(0), None))(m, x)
    return jnp.mean(out**2), (m, {"out": out})  # the model as one element of the aux


def test_apply_in_checkpoint_in_a_train_step_loss_updates_the_statistics(key):
    model, x = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (8, 3))
    new, _, (_, aux) = _tiny_step(_checkpointed, model, x)
    _, want = treenn.apply(model, x)
    _assert_same_stats(new, want)
    _assert_same_stats(aux, want)
    assert nn.modes(new) == nn.modes(model)


def test_scan_over_micro_batches_in_a_train_step_loss_updates_the_statistics(key):
    model, xs = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (2, 8, 3))
    new, _, _ = _tiny_step(_micro_batches, model, xs)
    _, once = treenn.apply(model, xs[0])
    _, twice = treenn.apply(once, xs[1])  # two sequential applies
    _assert_same_stats(new, twice)


def test_vmap_ensemble_in_a_train_step_loss_updates_each_members_statistics(key):
    ensemble = eqx.filter_vmap(_tiny)(jax.random.split(key, 2))
    x = jax.random.normal(jax.random.fold_in(key, 1), (8, 3))
    new, _, _ = _tiny_step(_ensemble, ensemble, x)
    arrays, static = eqx.partition(ensemble, eqx.is_array)
    for i in range(2):
        member = eqx.combine(jax.tree_util.tree_map(lambda a, i=i: a[i], arrays), static)
        _, want = treenn.apply(member, x)
        got = eqx.combine(
            jax.tree_util.tree_map(lambda a, i=i: a[i], eqx.filter(new, eqx.is_array)), static
        )
        _assert_same_stats(got, want)


@pytest.mark.parametrize("how", ["no aux", "aux without the model", "the input model"])
def test_detached_apply_whose_model_the_loss_drops_raises_naming_the_layer(key, how):
    model, x = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (8, 3))

    def loss(m, x):
        out, new = eqx.filter_checkpoint(treenn.apply)(m, x)
        value = jnp.mean(out**2)
        if how == "no aux":
            return value
        return value, (out if how == "aux without the model" else m)

    fix = r"return loss, model.*has_aux=True"
    if how == "the input model":
        match = r"nn\.BatchNorm\(4\) at 'layers\.1'.*loss returned does not hold them.*" + fix
    else:
        match = r"nn\.BatchNorm\(4\) at 'layers\.1'.*loss did not return that model.*" + fix
    with pytest.raises(RuntimeError, match=match):
        _tiny_step(loss, model, x, has_aux=how != "no aux")


def test_model_called_directly_inside_a_transform_in_a_loss_gives_the_working_advice(key):
    model, xs = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (2, 8, 3))

    def loss(m, xs):
        return jnp.mean(jax.lax.map(lambda xb: m(xb), xs) ** 2)

    with pytest.raises(RuntimeError, match=r"opened in the `treenn\.train_step` loss.*") as err:
        _tiny_step(loss, model, xs, has_aux=False)
    # The advice: through treenn.apply inside the transform, the model returned out of it
    # and from the loss with has_aux=True. That is _micro_batches, tested above.
    assert "Call the model through `treenn.apply` inside the transform" in str(err.value)
    assert "has_aux=True" in str(err.value)


def test_direct_call_and_transform_from_the_same_statistics_raise(key):
    """A direct call records at the loss's level; a transform applied to the original
    model then starts from the old statistics: one update would be lost."""
    model, x = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (8, 3))

    def loss(m, x):
        y = m(x)
        out, m = eqx.filter_checkpoint(treenn.apply)(m, x)
        return jnp.mean(out**2) + jnp.mean(y), m

    with pytest.raises(RuntimeError, match=r"'layers\.1'.*both directly and inside"):
        _tiny_step(loss, model, x)


@pytest.mark.parametrize("order", ["apply, then transform", "transform, then call"])
def test_threaded_calls_around_a_transform_count_in_order(key, order):
    model, xs = _tiny(key), jax.random.normal(jax.random.fold_in(key, 1), (2, 8, 3))

    def loss(m, xs):
        if order == "apply, then transform":
            _, m = treenn.apply(m, xs[0])
            out, m = eqx.filter_checkpoint(treenn.apply)(m, xs[1])
        else:
            _, m = eqx.filter_checkpoint(treenn.apply)(m, xs[0])
            out = m(xs[1])  # a direct call on the model the transform returned
        return jnp.mean(out**2), m

    new, _, _ = _tiny_step(loss, model, xs)
    _, once = treenn.apply(model, xs[0])
    _, twice = treenn.apply(once, xs[1])
    _assert_same_stats(new, twice)
