"""DropPath (stochastic depth): whole samples dropped with probability p and survivors
scaled by 1/(1-p), as timm's drop_path; mode-bearing exactly like nn.Dropout."""

from __future__ import annotations

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BATCHES, rand
from jaxtyping import TypeCheckError

import treenn
import treenn.nn as nn
from treenn.nn import DropPath


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    p = 0.3
    drop = DropPath(p)
    x = rand((2000, 3, 2), 1)
    y = np.asarray(drop(x, key=jax.random.key(0)))
    flat_x, flat_y = np.asarray(x).reshape(2000, -1), y.reshape(2000, -1)
    dropped = np.all(flat_y == 0, axis=1)
    # Every sample is either dropped as a whole or kept as a whole, scaled by 1 / (1 - p).
    np.testing.assert_allclose(
        flat_y[~dropped], flat_x[~dropped] / np.float32(1 - p), rtol=1e-6, atol=0
    )
    assert dropped.mean() == pytest.approx(p, abs=0.035)
    # Which samples are dropped depends on the key only, not on the sample's content.
    y2 = np.asarray(drop(2.0 * x, key=jax.random.key(0)))
    np.testing.assert_array_equal(np.all(y2.reshape(2000, -1) == 0, axis=1), dropped)
    # The expected value is preserved (timm's scale_by_keep=True).
    ones = np.asarray(drop(jnp.ones_like(x), key=jax.random.key(1)))
    assert ones.mean() == pytest.approx(1.0, abs=0.05)


def test_drop_path_keys() -> None:
    drop = DropPath(0.5)
    x = jnp.ones((8, 4))
    key = jax.random.key(3)
    y = np.asarray(drop(x, key=key))
    np.testing.assert_array_equal(np.asarray(drop(x, key=key)), y)
    assert not np.array_equal(np.asarray(drop(x, key=jax.random.key(4))), y)
    np.testing.assert_array_equal(
        np.asarray(eqx.filter_jit(lambda m, x, k: m(x, key=k))(drop, x, key)), y
    )


@pytest.mark.parametrize("shape", [(8,), (8, 3), (8, 2, 3)])
def test_drop_path_shapes(shape: tuple[int, ...]) -> None:
    x = rand(shape, 2)
    y = DropPath(0.5)(x, key=jax.random.key(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    flat = np.asarray(y).reshape(shape[0], -1)
    kept = ~np.all(flat == 0, axis=1)
    np.testing.assert_allclose(flat[kept], 2 * np.asarray(x).reshape(shape[0], -1)[kept])
    bf16 = DropPath(0.5)(x.astype(jnp.bfloat16), key=jax.random.key(0))
    assert bf16.dtype == jnp.bfloat16


def test_drop_path_eval_and_edge_probabilities() -> None:
    x = rand((8, 3), 3)
    key = jax.random.key(0)
    assert nn.eval_mode(DropPath(0.5))(x) is x
    assert DropPath(0.5, inference=True)(x, key=key) is x
    assert DropPath(0.0)(x) is x  # p=0: identity, no key needed
    assert DropPath()(x) is x and DropPath().p == 0.0
    np.testing.assert_array_equal(np.asarray(DropPath(1.0)(x, key=key)), np.zeros((8, 3)))


def test_drop_path_is_mode_bearing_like_dropout() -> None:
    drop = DropPath(0.2)
    assert drop.inference is False and drop.pinned is False
    assert treenn.statuses(drop) == {}  # no arrays
    assert nn.modes(drop) == {"": False}
    block = nn.Sequential(nn.Dropout(0.1), DropPath(0.2))
    assert nn.modes(nn.eval_mode(block, DropPath)) == {"layers.0": False, "layers.1": True}
    pinned = nn.train_mode(nn.eval_mode(block, DropPath, pin=True))
    assert nn.modes(pinned) == {"layers.0": False, "layers.1": True}
    assert pinned[1].pinned is True
    assert nn.modes(nn.unpin(pinned)) == {"layers.0": False, "layers.1": True}
    assert "DropPath" in treenn.summary(block)
    out, same = treenn.apply(drop, jnp.ones((8, 2)), key=jax.random.key(0))
    assert same is drop and out.shape == (8, 2)


def test_drop_path_errors() -> None:
    with pytest.raises(ValueError, match=r"nn\.DropPath\(p=0\.5\).*training mode.*key"):
        DropPath(0.5)(jnp.ones((8, 2)))
    with pytest.raises(ValueError, match=r"nn\.DropPath\(p=1\.5\).*\[0, 1\]"):
        DropPath(1.5)
    with pytest.raises(ValueError, match=r"nn\.DropPath\(p=-0\.1\).*\[0, 1\]"):
        DropPath(-0.1)
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)DropPath.*batch"):
        DropPath(0.5)(jnp.ones(()), key=jax.random.key(0))
    params = inspect.signature(DropPath(0.5)).parameters
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY and params["key"].default is None
    with pytest.raises(TypeError):
        DropPath(0.5)(jnp.ones((3, 2)), jax.random.key(0))  # type: ignore[misc]
    with pytest.raises(TypeError):
        DropPath(0.5, True)  # type: ignore[misc]


# -- Dropout -----------------------------------------------------------------------------


def test_dropout_training_drops_p_and_rescales(key: jax.Array) -> None:
    drop = nn.Dropout(0.3)
    x = jnp.ones((200, 100))
    y = np.asarray(drop(x, key=key))
    dropped = y == 0
    assert dropped.mean() == pytest.approx(0.3, abs=0.015)
    np.testing.assert_allclose(y[~dropped], np.float32(1) / np.float32(0.7), rtol=1e-6)
    # Same key, same mask; another key, another mask.
    np.testing.assert_array_equal(np.asarray(drop(x, key=key)), y)
    assert not np.array_equal(np.asarray(drop(x, key=jax.random.key(1))), y)
    # Expected value is preserved.
    assert y.mean() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("batch", BATCHES)
def test_dropout_shapes(key: jax.Array, batch: tuple[int, ...]) -> None:
    x = rand((*batch, 4))
    assert nn.Dropout(0.5)(x, key=key).shape == x.shape


def test_dropout_eval_and_edge_probabilities(key: jax.Array) -> None:
    x = rand((3, 4))
    np.testing.assert_array_equal(np.asarray(nn.eval_mode(nn.Dropout(0.5))(x)), np.asarray(x))
    np.testing.assert_array_equal(
        np.asarray(nn.Dropout(0.5, inference=True)(x, key=key)), np.asarray(x)
    )
    np.testing.assert_array_equal(
        np.asarray(nn.Dropout(0.0)(x)), np.asarray(x)
    )  # p=0: no key needed
    np.testing.assert_array_equal(np.asarray(nn.Dropout(1.0)(x, key=key)), np.zeros((3, 4)))
    assert nn.Dropout().p == 0.5 and nn.Dropout().inference is False


def test_dropout_errors(key: jax.Array) -> None:
    with pytest.raises(ValueError, match=r"nn\.Dropout\(p=0\.5\).*training mode.*key"):
        nn.Dropout(0.5)(jnp.ones(3))
    with pytest.raises(ValueError, match=r"nn\.Dropout\(p=1\.5\).*\[0, 1\]"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match=r"nn\.Dropout\(p=-0\.1\).*\[0, 1\]"):
        nn.Dropout(-0.1)


def test_dropout_has_no_arrays() -> None:
    assert treenn.statuses(nn.Dropout(0.5)) == {}
