"""What every layer of `treenn.nn` shares: the calling convention (`layer(x, *, key=None)`,
sizes positional, the key keyword-only) and the containers `Sequential` and `Lambda`.
Each layer family is tested in its own file (test_linear, test_conv, test_pooling,
test_normalization, test_dropout, test_attention)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_ref, names, np64, rand

import treenn
import treenn.nn as nn

# -- Sequential and Lambda -----------------------------------------------------------------


class Draw(treenn.Module):
    """Appends one uniform draw from its key to the input: shows which key it got."""

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        assert key is not None
        return jnp.concatenate([x, jax.random.uniform(key, (1,))])


def test_sequential_splits_the_key(key: jax.Array) -> None:
    seq = nn.Sequential(Draw(), Draw(), Draw())
    draws = np.asarray(seq(jnp.zeros((0,)), key=key))
    assert draws.shape == (3,)
    assert len(set(draws.tolist())) == 3  # three different keys
    np.testing.assert_array_equal(np.asarray(seq(jnp.zeros((0,)), key=key)), draws)  # deterministic
    assert not np.array_equal(np.asarray(seq(jnp.zeros((0,)), key=jax.random.key(1))), draws)


def test_sequential_two_dropouts_get_different_masks(key: jax.Array) -> None:
    seq = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    y = np.asarray(seq(jnp.ones((100, 100)), key=key))
    # Independent masks keep a quarter of the values (scaled by 4); one shared mask would
    # keep half.
    assert (y != 0).mean() == pytest.approx(0.25, abs=0.02)
    np.testing.assert_allclose(y[y != 0], 4.0)


def test_sequential_container_protocol(key: jax.Array) -> None:
    k1, k2 = jax.random.split(key)
    first, last = nn.Linear(3, 4, key=k1), nn.Linear(4, 2, key=k2)
    seq = nn.Sequential(first, jax.nn.relu, last)
    assert len(seq) == 3
    assert seq[0] is first and seq[2] is last and seq[-1] is last
    assert list(seq) == [first, seq[1], last]
    assert isinstance(seq[1], nn.Lambda) and seq[1].fn is jax.nn.relu
    assert names(seq) == {
        "layers.0.weight": (4, 3),
        "layers.0.bias": (4,),
        "layers.2.weight": (2, 4),
        "layers.2.bias": (2,),
    }
    x = rand((5, 3))
    want = linear_ref(
        np.maximum(linear_ref(x, first.weight, first.bias), 0), last.weight, last.bias
    )
    np.testing.assert_allclose(np64(seq(x)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"layer 1 is not callable: 3"):
        nn.Sequential(first, 3)


def test_sequential_slice_is_a_sequential(key: jax.Array) -> None:
    """Slicing gives a Sequential, as `torch.nn.Sequential` and `eqx.nn.Sequential` do."""
    k1, k2 = jax.random.split(key)
    first, last = nn.Linear(3, 4, key=k1), nn.Linear(4, 2, key=k2)
    seq = nn.Sequential(first, jax.nn.relu, last)
    tail = seq[1:]
    assert isinstance(tail, nn.Sequential) and len(tail) == 2 and tail[1] is last
    h = rand((5, 4))
    want = linear_ref(np.maximum(np64(h), 0), last.weight, last.bias)
    np.testing.assert_allclose(np64(tail(h)), want, rtol=1e-5, atol=1e-6)


def test_sequential_accepts_equinox_layers(key: jax.Array) -> None:
    seq = nn.Sequential(eqx.nn.Linear(3, 2, key=key), eqx.nn.Dropout(0.5, inference=True))
    x = rand((3,))
    np.testing.assert_allclose(np64(seq(x, key=key)), np64(seq[0](x)), rtol=1e-6)


def test_sequential_with_batchnorm_inside_apply(key: jax.Array) -> None:
    seq = nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4), jax.nn.relu, nn.Dropout(0.5))
    x = rand((6, 3))
    y, new = treenn.apply(seq, x, key=key)
    assert y.shape == (6, 4)
    h = linear_ref(x, seq[0].weight, seq[0].bias)
    np.testing.assert_allclose(np64(new[1].running_mean), 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np64(new[1].running_var), 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-4)
    # In training mode the Dropout needs a key, and the error says so.
    with pytest.raises(ValueError, match=r"Dropout.*key"):
        treenn.apply(seq, x)
    # In eval mode: deterministic, running statistics used, no key needed.
    ev = nn.eval_mode(new)
    h_norm = (h - np64(new[1].running_mean)) / np.sqrt(np64(new[1].running_var) + 1e-5)
    np.testing.assert_allclose(np64(ev(x)), np.maximum(h_norm, 0), rtol=1e-4, atol=1e-5)


def test_lambda_ignores_key(key: jax.Array) -> None:
    act = nn.Lambda(jnp.tanh)
    x = rand((2, 3))
    np.testing.assert_allclose(np64(act(x, key=key)), np.tanh(np64(x)), rtol=1e-6)
    assert jax.tree_util.tree_leaves(act) == []  # the function is static


# -- the calling convention ---------------------------------------------------------------


def _layers(key: jax.Array) -> list[Any]:
    return [
        nn.Linear(3, 3, key=key),
        nn.Conv2d(3, 3, 1, key=key),
        nn.BatchNorm(3, inference=True),
        nn.LayerNorm(3),
        nn.Dropout(0.5, inference=True),
        nn.Sequential(nn.Linear(3, 3, key=key)),
        nn.Lambda(jnp.tanh),
    ]


def test_every_layer_takes_keyword_only_key(key: jax.Array) -> None:
    x = jnp.ones((1, 1, 1, 3))
    for layer in _layers(key):
        name = type(layer).__name__
        params = inspect.signature(layer).parameters
        assert next(iter(params)) == "x", name
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params["key"].default is None, name
        assert layer(x).shape == x.shape, name
        assert layer(x, key=key).shape == x.shape, name
        with pytest.raises(TypeError):
            layer(x, key)


def test_constructors_take_sizes_positionally_and_key_by_keyword(key: jax.Array) -> None:
    with pytest.raises(TypeError):
        nn.Linear(3, 4, key)  # type: ignore[misc]
    with pytest.raises(TypeError):
        nn.Conv2d(3, 4, 3, 1, key=key)  # type: ignore[misc]  # stride is keyword-only
    assert nn.Conv2d(3, 4, 3, stride=1, padding=0, key=key).weight.shape == (4, 3, 3, 3)


# -- dataclasses.replace ------------------------------------------------------------------


class _Head(treenn.Module):
    weight: jax.Array
    bias: jax.Array
    drop: nn.Dropout


def test_dataclasses_replace_drops_own_statuses_tree_at_keeps_them() -> None:
    # Pins the behaviour docs/guides/from-equinox.md describes: `replace` rebuilds the
    # module from its fields as attribute access returns them (a frozen array unwrapped),
    # so its own frozen arrays come back trainable; submodules, passed whole, keep their
    # statuses and pins. If `replace` starts keeping statuses, update that guide.
    head = _Head(jnp.ones((2, 3)), jnp.zeros(2), nn.Dropout(0.5, pinned=True))
    head = treenn.freeze(head, "weight")
    assert treenn.statuses(head) == {"weight": "frozen", "bias": "trainable"}

    replaced = dataclasses.replace(head, bias=jnp.ones(2))
    assert treenn.statuses(replaced) == {"weight": "trainable", "bias": "trainable"}
    assert jnp.array_equal(replaced.weight, head.weight)
    assert replaced.drop.pinned

    edited = eqx.tree_at(lambda m: m.bias, head, jnp.ones(2))
    assert treenn.statuses(edited) == {"weight": "frozen", "bias": "trainable"}
    assert jnp.array_equal(edited.bias, jnp.ones(2))
    assert edited.drop.pinned


def test_dataclasses_replace_cannot_call_a_layer_constructor(key: jax.Array) -> None:
    # treenn's layers (as Equinox's) take sizes, not fields: `replace` is refused loudly
    # (the wording is Python's, or the runtime type checker's under the test suite).
    with pytest.raises(TypeError):
        dataclasses.replace(nn.Linear(3, 2, key=key), bias=jnp.ones(2))
