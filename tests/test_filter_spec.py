"""Issue 13 (4): `treenn.filter_spec` for Equinox's own training loop."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, optax_promotion

import treenn
from treenn import nn


def _loss(params, static, x):
    model = eqx.combine(params, static)
    return jnp.mean(jnp.square(model(x)))


def _equinox_loop(model, spec, x, steps=3):
    """Equinox's standard loop: eqx.partition + optax.adamw + eqx.apply_updates."""
    tx = optax.adamw(1e-2, weight_decay=0.1)
    params, static = eqx.partition(model, spec)
    with optax_promotion():
        opt_state = tx.init(params)
        for _ in range(steps):
            grads = eqx.filter_grad(_loss)(params, static, x)
            updates, opt_state = tx.update(grads, opt_state, params)
            model = eqx.apply_updates(model, updates)
            params, static = eqx.partition(model, spec)
    return model


@pytest.fixture
def model(net):
    return nn.eval_mode(treenn.freeze(net, "backbone.**"))


def test_filter_spec_is_true_exactly_at_trainable_arrays(model):
    spec = treenn.filter_spec(model)
    flat = jax.tree_util.tree_leaves(spec)
    assert sum(flat) == 2  # head.weight, head.bias
    params, _ = eqx.partition(model, spec)
    assert len(jax.tree_util.tree_leaves(params)) == 2
    assert params.head.weight is model.head.weight


def test_equinox_loop_with_filter_spec_leaves_frozen_arrays_and_buffers_bit_identical(
    model, images
):
    trained = _equinox_loop(model, treenn.filter_spec(model), images)
    assert [s for _, s, _ in _arrays(model)] == [s for _, s, _ in _arrays(trained)]
    moved = []
    for (path, _, leaf), (_, _, new) in zip(_arrays(model), _arrays(trained)):
        if not np.array_equal(np.asarray(leaf), np.asarray(new)):
            moved.append(path)
    assert moved == ["head.weight", "head.bias"]


def test_equinox_loop_with_is_inexact_array_moves_frozen_arrays(model, images):
    """The mistake the docs warn about: to `eqx.is_inexact_array` the arrays inside the
    marks are trainable arrays, so adamw's weight decay moves them."""
    trained = _equinox_loop(model, eqx.is_inexact_array, images)
    bn = trained.backbone.layers[1]
    assert not np.array_equal(np.asarray(bn.running_var), np.ones(4))


def test_filter_spec_rejects_a_class(model):
    with pytest.raises(TypeError, match="filter_spec: model is the class"):
        treenn.filter_spec(nn.Linear)


def _arrays(model):
    """`(path, status, array)` of every array leaf."""
    status = treenn.statuses(model)
    return [(p, status[p], x) for p, x in leaves_by_path(model) if p in status]
