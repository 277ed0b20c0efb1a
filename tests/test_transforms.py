"""treenn.partition / combine / trainable, grad / value_and_grad, apply_updates, optax."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from conftest import Net, optax_promotion

import treenn
import treenn.nn as nn


class Mixed(treenn.Module):
    """One of every kind of leaf: trainable float32 and bfloat16 arrays, a frozen
    layer, BatchNorm buffers, an int array, a Python float leaf and a static field."""

    lin: nn.Linear
    frozen: nn.Linear
    bn: nn.BatchNorm
    half: jax.Array
    count: jax.Array
    scale: float
    tag: str = eqx.field(static=True)

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.lin = nn.Linear(2, 3, key=k1)
        self.frozen = treenn.freeze(nn.Linear(2, 3, key=k2))
        self.bn = nn.BatchNorm(3, inference=True)
        self.half = jnp.full((3,), 0.5, jnp.bfloat16)
        self.count = jnp.array(7, jnp.int32)
        self.scale = 2.0
        self.tag = "mixed"

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn(self.lin(x) + self.frozen(x))
        return h * self.half.astype(jnp.float32)[None] * self.scale


TRAINABLE = {".lin.weight", ".lin.bias", ".bn.weight", ".bn.bias", ".half"}
REST = {".frozen.weight", ".frozen.bias", ".bn.running_mean", ".bn.running_var", ".count"}


def array_paths(tree) -> set[str]:
    pairs, _ = jtu.tree_flatten_with_path(tree)
    return {jtu.keystr(p) for p, x in pairs if isinstance(x, jax.Array)}


def none_structure(tree):
    return jtu.tree_structure(tree, is_leaf=lambda x: x is None)


@pytest.fixture
def mixed(key):
    return Mixed(key)


@pytest.fixture
def mlp(key):
    """Sequential(Linear(3, 4), tanh, Linear(4, 2)) with the first Linear frozen."""
    k1, k2 = jax.random.split(key)
    model = nn.Sequential(nn.Linear(3, 4, key=k1), jnp.tanh, nn.Linear(4, 2, key=k2))
    return treenn.freeze(model, "layers.0.**")


@pytest.fixture
def x3(key):
    return jax.random.normal(jax.random.fold_in(key, 7), (5, 3))


def _manual_loss(w0, b0, w2, b2, x, scale=1.0):
    y = jnp.tanh(x @ w0.T + b0[None]) @ w2.T + b2[None]
    return scale * jnp.sum(y**2)


def _loss(model, x, *, scale=1.0):
    return scale * jnp.sum(model(x) ** 2)


# -- partition / combine / trainable ---------------------------------------------------


def test_partition_splits_trainable_from_rest(mixed):
    params, rest = treenn.partition(mixed)
    assert array_paths(params) == TRAINABLE
    assert array_paths(rest) == REST
    # Same model structure, `None` wherever the leaf is not a trainable array.
    assert type(params) is Mixed and type(params.lin) is nn.Linear
    assert params.tag == "mixed" and rest.tag == "mixed"
    assert params.frozen.weight is None and params.frozen.bias is None
    assert params.bn.running_mean is None and params.bn.running_var is None
    assert params.count is None and params.scale is None
    assert params.lin.weight is mixed.lin.weight
    assert params.half.dtype == jnp.bfloat16
    assert rest.lin.weight is None and rest.half is None
    assert rest.scale == 2.0
    # Freezing only changes which leaves are `None`, never the structure.
    assert none_structure(params) == none_structure(treenn.trainable(treenn.unfreeze(mixed)))


def test_trainable_is_first_half_of_partition(mixed, net):
    for model in (mixed, net, treenn.freeze(net, "head.**")):
        assert eqx.tree_equal(treenn.trainable(model), treenn.partition(model)[0])
    t = treenn.trainable(treenn.freeze(net, "head.**"))
    assert t.head.weight is None and t.head.bias is None
    assert t.backbone.layers[1].running_mean is None
    assert t.backbone.layers[0].weight is net.backbone.layers[0].weight


def test_unfreeze_does_not_make_buffers_or_ints_trainable(mixed):
    assert array_paths(treenn.trainable(treenn.unfreeze(mixed))) == TRAINABLE | {
        ".frozen.weight",
        ".frozen.bias",
    }


@pytest.mark.parametrize("which", ["mixed", "net", "frozen_net", "eqx_user"])
def test_partition_combine_round_trip(which, mixed, net, eqx_user):
    model = {
        "mixed": mixed,
        "net": net,
        "frozen_net": treenn.freeze(net, "backbone.**"),
        "eqx_user": treenn.freeze(eqx_user, "mlp.layers.0.**"),
    }[which]
    rebuilt = treenn.combine(*treenn.partition(model))
    assert eqx.tree_equal(rebuilt, model)
    # Frozen marks and buffers survive: same statuses after the round trip.
    assert array_paths(treenn.trainable(rebuilt)) == array_paths(treenn.trainable(model))
    assert treenn.summary(rebuilt) == treenn.summary(model)


def test_combine_with_updated_trainable_half(mixed):
    params, rest = treenn.partition(mixed)
    params = jax.tree.map(lambda p: p * 0, params)
    model = treenn.combine(params, rest)
    assert np.all(np.asarray(model.lin.weight) == 0)
    assert np.array_equal(np.asarray(model.frozen.weight), np.asarray(mixed.frozen.weight))
    assert model.count is mixed.count and model.scale == 2.0


def test_combine_mismatched_halves_names_paths(key):
    k1, k2 = jax.random.split(key)
    two = nn.Sequential(nn.Linear(2, 2, key=k1), nn.Linear(2, 2, key=k2))
    one = nn.Sequential(nn.Linear(2, 2, key=k1))
    with pytest.raises(ValueError, match=r"layers\.1\.(weight|bias)"):
        treenn.combine(treenn.trainable(two), treenn.partition(one)[1])
    with pytest.raises(ValueError, match=r"only in rest.*layers\.1\.(weight|bias)"):
        treenn.combine(treenn.trainable(one), treenn.partition(two)[1])


# -- grad / value_and_grad -------------------------------------------------------------


def test_grad_structure_and_values_match_jax_grad(mlp, x3):
    grads = treenn.grad(_loss)(mlp, x3)
    assert jtu.tree_structure(grads) == jtu.tree_structure(treenn.trainable(mlp))
    assert none_structure(grads) == none_structure(treenn.trainable(mlp))
    assert grads.layers[0].weight is None and grads.layers[0].bias is None
    l0, l2 = mlp.layers[0], mlp.layers[2]
    gw, gb = jax.grad(_manual_loss, argnums=(2, 3))(l0.weight, l0.bias, l2.weight, l2.bias, x3)
    np.testing.assert_allclose(grads.layers[2].weight, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.layers[2].bias, gb, rtol=1e-5, atol=1e-6)


def test_value_and_grad_passes_args_and_kwargs(mlp, x3):
    value, grads = treenn.value_and_grad(_loss)(mlp, x3, scale=3.0)
    l0, l2 = mlp.layers[0], mlp.layers[2]
    args = (l0.weight, l0.bias, l2.weight, l2.bias, x3, 3.0)
    np.testing.assert_allclose(value, _manual_loss(*args), rtol=1e-6)
    gw, gb = jax.grad(_manual_loss, argnums=(2, 3))(*args)
    np.testing.assert_allclose(grads.layers[2].weight, gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.layers[2].bias, gb, rtol=1e-5, atol=1e-6)
    assert grads.layers[0].weight is None


def test_unfrozen_model_differentiates_every_float_array(mlp, x3):
    model = treenn.unfreeze(mlp)
    grads = treenn.grad(_loss)(model, x3)
    l0, l2 = model.layers[0], model.layers[2]
    gw0 = jax.grad(_manual_loss)(l0.weight, l0.bias, l2.weight, l2.bias, x3)
    np.testing.assert_allclose(grads.layers[0].weight, gw0, rtol=1e-5, atol=1e-6)


def test_grad_skips_buffers_ints_and_frozen(mixed):
    x = jnp.ones((4, 2))
    grads = treenn.grad(lambda m, x: jnp.sum(m(x)))(mixed, x)
    assert array_paths(grads) == TRAINABLE
    assert grads.half.dtype == jnp.bfloat16
    assert grads.lin.weight.shape == (3, 2)


def test_grad_through_equinox_layers(eqx_user):
    model = nn.eval_mode(eqx_user)
    frozen = treenn.freeze(model, "mlp.layers.0.**")
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def loss(m, x):
        return jnp.sum(jax.vmap(m)(x) ** 2)

    grads = treenn.grad(loss)(frozen, x)
    assert grads.mlp.layers[0].weight is None and grads.mlp.layers[0].bias is None
    expected = eqx.filter_grad(loss)(model, x)
    np.testing.assert_allclose(
        grads.mlp.layers[1].weight, expected.mlp.layers[1].weight, rtol=1e-5, atol=1e-6
    )


def test_value_and_grad_has_aux_returns_models_and_objects(mixed):
    x = jnp.ones((4, 2))

    def fn(model, x):
        return jnp.sum(model(x)), (model, "tag", 3, None)

    (value, aux), grads = treenn.value_and_grad(fn, has_aux=True)(mixed, x)
    np.testing.assert_allclose(value, jnp.sum(mixed(x)), rtol=1e-6)
    model, tag, three, none = aux
    assert tag == "tag" and three == 3 and type(three) is int and none is None
    assert eqx.tree_equal(model, mixed)
    assert model.scale == 2.0 and type(model.scale) is float and model.tag == "mixed"
    assert array_paths(treenn.trainable(model)) == TRAINABLE  # frozen marks intact
    assert nn.modes(model) == nn.modes(mixed)
    assert array_paths(grads) == TRAINABLE


def test_grad_has_aux_orders_grads_then_aux(mlp, x3):
    def fn(model, x):
        return _loss(model, x), {"model": model, "note": "hello"}

    grads, aux = treenn.grad(fn, has_aux=True)(mlp, x3)
    assert jtu.tree_structure(grads) == jtu.tree_structure(treenn.trainable(mlp))
    assert aux["note"] == "hello"
    assert eqx.tree_equal(aux["model"], mlp)
    np.testing.assert_allclose(grads.layers[2].bias, treenn.grad(_loss)(mlp, x3).layers[2].bias)


def test_grad_of_non_scalar_raises(mlp, x3):
    with pytest.raises(TypeError, match="scalar"):
        treenn.grad(lambda m, x: m(x))(mlp, x3)
    with pytest.raises(TypeError, match="scalar"):
        treenn.value_and_grad(lambda m, x: m(x))(mlp, x3)


@pytest.mark.parametrize("out", ["scalar", "triple", "list"])
def test_has_aux_requires_a_pair(mlp, x3, out):
    def fn(model, x):
        loss = _loss(model, x)
        return {"scalar": loss, "triple": (loss, 1, 2), "list": [loss, 1]}[out]

    with pytest.raises(TypeError, match="pair"):
        treenn.value_and_grad(fn, has_aux=True)(mlp, x3)
    with pytest.raises(TypeError, match="pair"):
        treenn.grad(fn, has_aux=True)(mlp, x3)


# -- apply_updates ---------------------------------------------------------------------


def test_apply_updates_adds_to_trainable_only(mixed):
    updates = jax.tree.map(lambda p: jnp.ones_like(p), treenn.trainable(mixed))
    new = treenn.apply_updates(mixed, updates)
    np.testing.assert_array_equal(new.lin.weight, np.asarray(mixed.lin.weight) + 1)
    np.testing.assert_array_equal(new.bn.bias, np.asarray(mixed.bn.bias) + 1)
    assert new.half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new.half, np.float32), np.full(3, 1.5))
    assert new.frozen.weight is mixed.frozen.weight
    assert new.bn.running_mean is mixed.bn.running_mean
    assert new.count is mixed.count and new.scale == 2.0 and new.tag == "mixed"
    assert array_paths(treenn.trainable(new)) == TRAINABLE
    assert nn.modes(new) == nn.modes(mixed)


def test_apply_updates_keeps_dtype_under_standard_promotion(mixed):
    updates = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), treenn.trainable(mixed))
    with jax.numpy_dtype_promotion("standard"):
        new = treenn.apply_updates(mixed, updates)
    assert new.half.dtype == jnp.bfloat16
    assert new.lin.weight.dtype == jnp.float32


def test_apply_updates_none_leaves_array(mixed):
    updates = jax.tree.map(lambda p: jnp.ones_like(p), treenn.trainable(mixed))
    updates = eqx.tree_at(lambda u: u.lin.weight, updates, None)
    new = treenn.apply_updates(mixed, updates)
    assert new.lin.weight is mixed.lin.weight
    np.testing.assert_array_equal(new.lin.bias, np.asarray(mixed.lin.bias) + 1)


def test_apply_updates_never_touches_frozen_arrays(mixed):
    # Updates shaped like the unfrozen model still leave frozen arrays alone.
    updates = jax.tree.map(lambda p: jnp.ones_like(p), treenn.trainable(treenn.unfreeze(mixed)))
    new = treenn.apply_updates(mixed, updates)
    np.testing.assert_array_equal(new.frozen.weight, mixed.frozen.weight)
    np.testing.assert_array_equal(new.lin.weight, np.asarray(mixed.lin.weight) + 1)
    assert treenn.trainable(new).frozen.weight is None


def test_apply_updates_structure_mismatch_names_paths(key):
    k1, k2 = jax.random.split(key)
    two = nn.Sequential(nn.Linear(2, 2, key=k1), nn.Linear(2, 2, key=k2))
    one = nn.Sequential(nn.Linear(2, 2, key=k1))
    with pytest.raises(ValueError, match=r"only in model.*layers\.1\.(weight|bias)"):
        treenn.apply_updates(two, treenn.trainable(one))
    with pytest.raises(ValueError, match=r"only in updates.*layers\.1\.(weight|bias)"):
        treenn.apply_updates(one, treenn.trainable(two))


def test_apply_updates_wrong_shape_names_path(mixed):
    updates = jax.tree.map(lambda p: jnp.zeros_like(p), treenn.trainable(mixed))
    updates = eqx.tree_at(lambda u: u.lin.bias, updates, jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"'lin\.bias'.*\(4,\).*\(3,\)"):
        treenn.apply_updates(mixed, updates)


# -- optax -----------------------------------------------------------------------------


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def test_optax_state_only_for_trainable_arrays(net):
    model = treenn.freeze(net, "backbone.**")
    params = treenn.trainable(model)
    assert array_paths(params) == {".head.weight", ".head.bias"}
    with optax_promotion():
        state = optax.adam(1e-2).init(params)
    adam = state[0]
    assert array_paths(adam.mu) == array_paths(adam.nu) == {".head.weight", ".head.bias"}
    assert _nbytes(state) == 2 * _nbytes(params) + adam.count.nbytes
    assert _nbytes(params) == (3 * 4 + 3) * 4
    assert len(jax.tree.leaves(state)) == 5


def test_optax_update_then_apply_updates(mlp, x3):
    tx = optax.sgd(0.5)
    with optax_promotion():
        state = tx.init(treenn.trainable(mlp))
    grads = treenn.grad(_loss)(mlp, x3)
    with optax_promotion():
        updates, state = tx.update(grads, state, treenn.trainable(mlp))
    new = treenn.apply_updates(mlp, updates)
    np.testing.assert_allclose(
        new.layers[2].weight, mlp.layers[2].weight - 0.5 * grads.layers[2].weight, rtol=1e-6
    )
    assert new.layers[0].weight is mlp.layers[0].weight


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def test_training_loop_with_frozen_layer(key, images, labels):
    model = treenn.freeze(Net(key=key), "backbone.layers.0.**")
    frozen_w = np.asarray(model.backbone.layers[0].weight).copy()
    frozen_b = np.asarray(model.backbone.layers[0].bias).copy()
    head_w = np.asarray(model.head.weight).copy()
    tx = optax.adam(0.05)
    with optax_promotion():
        opt_state = tx.init(treenn.trainable(model))
    dkey = jax.random.fold_in(key, 3)

    def loss_fn(model, x, y):
        logits, model = treenn.apply(model, x, key=dkey)
        return _cross_entropy(logits, y), model

    @treenn.jit
    def step(model, opt_state, x, y):
        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        with optax_promotion():
            updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(15):
        model, opt_state, loss = step(model, opt_state, images, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert np.array_equal(np.asarray(model.backbone.layers[0].weight), frozen_w)
    assert np.array_equal(np.asarray(model.backbone.layers[0].bias), frozen_b)
    assert treenn.trainable(model).backbone.layers[0].weight is None
    assert not np.array_equal(np.asarray(model.head.weight), head_w)
    # The BatchNorm buffers were updated by treenn.apply and never by the optimiser.
    assert not np.allclose(np.asarray(model.backbone.layers[1].running_mean), 0.0)
