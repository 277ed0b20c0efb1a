"""Issue 15 (Equinox interop): models treenn's helpers return pickle, cloudpickle and
deep-copy; user code never sees a mark."""

from __future__ import annotations

import copy
import pickle
from typing import NamedTuple

import cloudpickle
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treenn
from treenn import nn


def _models(key):
    k1, k2 = jax.random.split(key)
    # (eqx.nn.MLP holds jax.nn.relu, which plain pickle refuses, with or without treenn.)
    mlp = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=k1), eqx.nn.Linear(4, 2, key=k1)])
    seq = eqx.nn.Sequential([eqx.nn.Linear(3, 3, key=k2), eqx.nn.Dropout(0.5)])
    return {
        "frozen equinox layer": treenn.freeze(mlp, "layers.0"),
        "pinned equinox dropout": nn.eval_mode(seq, "layers.1", pin=True),
        "freeze_backbone of equinox": treenn.freeze_backbone(seq, "layers.0"),
        "treenn layers": nn.eval_mode(treenn.freeze(nn.BatchNorm(3), "weight"), pin=True),
    }


@pytest.mark.parametrize("how", ["pickle", "cloudpickle", "deepcopy"])
def test_models_from_treenn_helpers_round_trip(key, how):
    """A frozen Equinox layer raised `PicklingError: Can't pickle <class
    'equinox.nn._linear.Linear'>: it's not the same object as ...`."""
    dump = {
        "pickle": lambda m: pickle.loads(pickle.dumps(m)),
        "cloudpickle": lambda m: cloudpickle.loads(cloudpickle.dumps(m)),
        "deepcopy": copy.deepcopy,
    }[how]
    for name, model in _models(key).items():
        back = dump(model)
        assert type(back) is type(model), name
        assert eqx.tree_equal(back, model), name
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model), name
        assert treenn.summary(back) == treenn.summary(model), name
        assert nn.pinned(back) == nn.pinned(model), name


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


class Holder(treenn.Module):
    pair: Pair
    params: dict

    def __call__(self, x):
        return x * self.pair.w + self.pair.b + self.params["s"]


def _holder():
    return Holder(Pair(jnp.array([0.0, 1.0, 0.0]), jnp.ones(3)), {"s": jnp.zeros(3)})


def test_frozen_array_in_a_namedtuple_field_is_an_array():
    """A frozen array reached through a NamedTuple field was the mark's array proxy:
    `==` gave the wrong answer (`sum(w == 0)` was 0) and `jax.lax` rejected it."""
    frozen = treenn.freeze(_holder())
    w = frozen.pair.w
    assert isinstance(w, jax.Array)
    assert int(jnp.sum(w == 0)) == 2
    assert int(jnp.sum(w != 0)) == 1
    np.testing.assert_array_equal(jax.lax.neg(w), -np.array([0.0, 1.0, 0.0]))
    assert isinstance(frozen.params["s"], jax.Array)
    np.testing.assert_array_equal(frozen(jnp.ones(3)), _holder()(jnp.ones(3)))


def test_getter_returning_a_dict_field_with_a_frozen_entry():
    """`lambda m: m.params` was rejected once an entry was frozen."""
    frozen = treenn.freeze(_holder(), "params.s")
    thawed = treenn.unfreeze(frozen, lambda m: m.params)
    assert treenn.trainable(thawed).params["s"] is not None
    refrozen = treenn.freeze(thawed, lambda m: m.params)
    assert treenn.trainable(refrozen).params["s"] is None
