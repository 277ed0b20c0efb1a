"""`treenn.statuses`: every leaf's dotted path and status, the public way to list them
(tests and users need no private module for it)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import NET_BUFFERS, NET_PARAMS, Net

import treenn
import treenn.nn as nn


def test_statuses_of_a_fresh_model(net: Net) -> None:
    got = treenn.statuses(net)
    assert {p for p, s in got.items() if s == "trainable"} == NET_PARAMS
    assert {p for p, s in got.items() if s == "buffer"} == NET_BUFFERS
    assert set(got) == NET_PARAMS | NET_BUFFERS  # arrays only: no relu, no modes
    # In the model's leaf order: the order `jax.tree_util.tree_leaves` gives its arrays.
    arrays = [x for x in jax.tree_util.tree_leaves(net) if isinstance(x, jax.Array)]
    assert len(got) == len(arrays)


def test_statuses_follow_freezing_and_keep_paths(net: Net) -> None:
    before = treenn.statuses(net)
    bitfit = treenn.unfreeze(treenn.freeze(net), "**.bias")
    after = treenn.statuses(bitfit)
    assert list(after) == list(before)  # freezing never changes a path
    assert {p for p, s in after.items() if s == "trainable"} == {
        p for p in NET_PARAMS if p.endswith(".bias")
    }
    assert {p for p, s in after.items() if s == "frozen"} == {
        p for p in NET_PARAMS if p.endswith(".weight")
    }
    assert {p for p, s in after.items() if s == "buffer"} == NET_BUFFERS


def test_statuses_of_equinox_and_abstract_models(key: jax.Array) -> None:
    mlp = treenn.freeze(eqx.nn.MLP(2, 3, 4, 1, key=key), "layers.0")
    got = treenn.statuses(mlp)
    assert got["layers.0.weight"] == "frozen" and got["layers.1.weight"] == "trainable"
    # An abstract model (no arrays allocated) has the same statuses.
    model = treenn.freeze({"bn": nn.BatchNorm(3), "lin": nn.Linear(3, 2, key=key)}, "lin")
    abstract = jax.eval_shape(lambda: model)
    assert treenn.statuses(abstract) == treenn.statuses(model)
    assert treenn.statuses(abstract)["bn.weight"] == "trainable"


def test_integer_arrays_are_static_and_numbers_absent() -> None:
    tree = {"count": jnp.zeros((), jnp.int32), "rate": 0.5, "w": jnp.ones(2), "f": jnp.tanh}
    assert treenn.statuses(tree) == {"count": "static", "w": "trainable"}


def test_statuses_errors() -> None:
    with pytest.raises(TypeError, match=r"treenn\.statuses: model is the class Net"):
        treenn.statuses(Net)
    with pytest.raises(TypeError, match=r"treenn\.statuses: model='m\.safetensors' is a str"):
        treenn.statuses("m.safetensors")
