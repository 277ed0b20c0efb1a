"""Identity, the timm-style MLP and Embedding against torch.nn: parameter names, shapes and
initialisation, numerics with copied weights, gradients, dropout keys and errors."""

from __future__ import annotations

import inspect
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    BATCHES,
    check_uniform_init,
    close,
    linear_ref,
    named,
    names,
    np64,
    rand,
    to_torch,
)
from jaxtyping import TypeCheckError

import treenn
import treenn.nn as nn
from treenn.nn import MLP, Embedding, Identity, gelu

# One jitted call for every test (a new lambda per call would compile each time).
call = eqx.filter_jit(lambda m, x: m(x))


# -- Identity ------------------------------------------------------------------------------


def test_identity_returns_its_input() -> None:
    layer = Identity()
    x = rand((2, 3))
    assert layer(x) is x
    assert layer(x, key=jax.random.key(0)) is x
    ids = jnp.arange(4)
    assert layer(ids) is ids  # any dtype
    assert jax.tree_util.tree_leaves(layer) == []
    assert nn.modes(layer) == {}
    # Arguments are ignored, as in PyTorch, so it can replace a layer class.
    assert jax.tree_util.tree_leaves(Identity(64, eps=1e-6)) == []
    params = inspect.signature(layer).parameters
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        layer(x, jax.random.key(0))
    np.testing.assert_array_equal(call(layer, x), x)


# -- MLP -----------------------------------------------------------------------------------


def torch_mlp(mlp: MLP) -> torch.nn.Sequential:
    """timm's Mlp with drop=0, as a torch Linear-GELU-Linear with copied weights."""
    ref = torch.nn.Sequential(
        torch.nn.Linear(mlp.in_features, mlp.hidden_features, bias=mlp.fc1.bias is not None),
        torch.nn.GELU(),
        torch.nn.Linear(mlp.hidden_features, mlp.out_features, bias=mlp.fc2.bias is not None),
    )
    with torch.no_grad():
        for i, fc in ((0, mlp.fc1), (2, mlp.fc2)):
            ref[i].weight.copy_(to_torch(fc.weight))
            if fc.bias is not None:
                ref[i].bias.copy_(to_torch(fc.bias))
    return ref


def shapes(make: Any) -> Any:
    """Build a module abstractly (no compilation): for names, shapes and dtypes."""
    return jax.eval_shape(make)


# One shape set for the MLPs (each new one costs compilations): fc1 (32, 16), fc2 (16, 32).
IN, HIDDEN = 16, 32


def test_mlp_names_shapes_and_init() -> None:
    mlp = MLP(IN, HIDDEN, key=jax.random.key(0))
    assert names(mlp) == {
        "fc1.weight": (32, 16),
        "fc1.bias": (32,),
        "fc2.weight": (16, 32),
        "fc2.bias": (16,),
    }
    assert (mlp.in_features, mlp.hidden_features, mlp.out_features) == (16, 32, 16)
    assert isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    assert isinstance(mlp.drop1, nn.Dropout) and isinstance(mlp.drop2, nn.Dropout)
    assert mlp.act is gelu
    # PyTorch's Linear initialisation: U(+-1/sqrt(fan_in)), per layer.
    for fc, fan_in in ((mlp.fc1, 16), (mlp.fc2, 32)):
        w = np.asarray(fc.weight)
        bound = 1 / math.sqrt(fan_in)
        assert np.all(np.abs(w) <= bound) and np.abs(w).max() > 0.9 * bound
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert np.all(np.abs(np.asarray(fc.bias)) <= bound)
    assert not np.array_equal(np.asarray(mlp.fc1.weight[:16]), np.asarray(mlp.fc2.weight[:, :16]))
    # out_features; bias and drop take pairs, as in timm; dtype reaches both layers.
    key = jax.random.key(0)
    assert names(shapes(lambda: MLP(4, 8, 3, key=key)))["fc2.weight"] == (3, 8)
    assert names(shapes(lambda: MLP(4, 8, bias=False, key=key))) == {
        "fc1.weight": (8, 4),
        "fc2.weight": (4, 8),
    }
    assert "fc2.bias" not in names(shapes(lambda: MLP(4, 8, bias=(True, False), key=key)))
    pair = shapes(lambda: MLP(4, 8, drop=(0.1, 0.2), key=key))
    assert (pair.drop1.p, pair.drop2.p) == (0.1, 0.2)
    half = shapes(lambda: MLP(4, 8, dtype=jnp.bfloat16, key=key))
    assert {x.dtype for x in named(half).values()} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_mlp_matches_torch_linear_gelu_linear(batch: tuple[int, ...]) -> None:
    mlp = MLP(IN, HIDDEN, key=jax.random.key(1))
    ref = torch_mlp(mlp)
    x = rand((*batch, IN), 2)
    want = ref(to_torch(x))
    # drop=0: training mode needs no key and equals evaluation mode.
    close(mlp(x), want)
    close(nn.eval_mode(mlp)(x), want)
    if len(batch) == 2:
        close(treenn.jit(lambda m, x: m(x))(mlp, x), want)


def test_mlp_default_act_is_exact_gelu() -> None:
    x = jnp.linspace(-4.0, 4.0, 41)
    close(gelu(x), torch.nn.GELU()(to_torch(x)), rtol=1e-6, atol=1e-6)
    # The tanh approximation (jax.nn.gelu's default) differs by more than the tolerance.
    approx = np.asarray(jax.nn.gelu(x))
    assert np.abs(approx - np.asarray(gelu(x))).max() > 1e-4
    # A custom activation is used, and is static.
    relu = MLP(IN, HIDDEN, act=jax.nn.relu, key=jax.random.key(0))
    assert relu.act is jax.nn.relu and len(treenn.statuses(relu)) == 4
    x = np.asarray(rand((2, IN), 3))
    h = np.maximum(x @ np.asarray(relu.fc1.weight).T + np.asarray(relu.fc1.bias), 0)
    close(relu(jnp.asarray(x)), h @ np.asarray(relu.fc2.weight).T + np.asarray(relu.fc2.bias))


def test_mlp_gradients_match_torch() -> None:
    mlp = MLP(IN, HIDDEN, bias=(True, False), key=jax.random.key(4))
    ref = torch_mlp(mlp)
    x = rand((5, IN), 5)
    grads = treenn.jit(treenn.grad(lambda m, x: jnp.sum(m(x) ** 2)))(mlp, x)
    (ref(to_torch(x)) ** 2).sum().backward()
    close(grads.fc1.weight, ref[0].weight.grad, atol=1e-5)
    close(grads.fc1.bias, ref[0].bias.grad, atol=1e-5)
    close(grads.fc2.weight, ref[2].weight.grad, atol=1e-5)
    assert grads.fc2.bias is None


def test_mlp_dropout_modes_and_keys() -> None:
    mlp = MLP(IN, HIDDEN, drop=0.5, key=jax.random.key(0))
    assert nn.modes(mlp) == {"drop1": False, "drop2": False}
    x = rand((8, IN), 6)
    key = jax.random.key(7)
    y = np.asarray(mlp(x, key=key))
    # The key is split four ways, one per sublayer (fc1, drop1, fc2, drop2: a LoRA
    # adapter on fc1/fc2 may need one): the dropouts' masks are independent.
    _, k_drop1, _, k_drop2 = jax.random.split(key, 4)
    hidden = nn.Dropout(0.5)(gelu(mlp.fc1(x)), key=k_drop1)
    np.testing.assert_array_equal(y, np.asarray(nn.Dropout(0.5)(mlp.fc2(hidden), key=k_drop2)))
    assert 0.3 < (y == 0).mean() < 0.7
    np.testing.assert_array_equal(np.asarray(mlp(x, key=key)), y)
    assert not np.array_equal(np.asarray(mlp(x, key=jax.random.key(8))), y)
    # Evaluation mode: deterministic, no key.
    evaluated = nn.eval_mode(mlp)
    assert nn.modes(evaluated) == {"drop1": True, "drop2": True}
    close(evaluated(x), mlp.fc2(gelu(mlp.fc1(x))))
    # Only the second dropout pinned in eval mode: the first still drops.
    half = nn.train_mode(nn.eval_mode(mlp, "drop2", pin=True))
    assert nn.modes(half) == {"drop1": False, "drop2": True}
    np.testing.assert_array_equal(np.asarray(half(x, key=key)), np.asarray(mlp.fc2(hidden)))
    # Inside treenn.apply, nothing to update.
    out, same = treenn.apply(mlp, x, key=key)
    assert same is mlp
    np.testing.assert_array_equal(np.asarray(out), y)


def test_mlp_errors() -> None:
    key = jax.random.key(0)
    mlp = MLP(IN, HIDDEN, drop=0.1, key=key)
    with pytest.raises(ValueError, match=r"Dropout\(p=0\.1\).*training mode.*key"):
        mlp(jnp.ones((2, IN)))
    with pytest.raises(
        ValueError, match=r"nn\.Linear\(16, 32\).*\(\*batch, 16\).*got shape \(2, 5\)"
    ):
        nn.eval_mode(mlp)(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"nn\.MLP\(4, 8, 4\).*drop=1\.5.*\[0, 1\]"):
        MLP(4, 8, drop=1.5, key=key)
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)drop.*\(0\.1, 0\.2, 0\.3\)"):
        MLP(4, 8, drop=(0.1, 0.2, 0.3), key=key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"nn\.MLP\(4, -1, 4\).*hidden_features=-1"):
        MLP(4, -1, key=key)
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)act"):
        MLP(4, 8, act=3, key=key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MLP(4, 8, 3, jax.nn.relu, key=key)  # type: ignore[misc]  # act is keyword-only


# -- Embedding -----------------------------------------------------------------------------


def test_embedding_names_and_init() -> None:
    embed = Embedding(64, 16, key=jax.random.key(0))
    assert names(embed) == {"weight": (64, 16)}
    w = np.asarray(embed.weight, np.float64)
    assert embed.weight.dtype == jnp.float32
    # N(0, 1), as PyTorch.
    assert abs(w.mean()) < 0.1 and w.std() == pytest.approx(1.0, abs=0.07)
    assert abs(w).max() > 2.5
    again = Embedding(64, 16, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.weight), w.astype(np.float32))
    other = Embedding(64, 16, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(other.weight), np.asarray(embed.weight))
    half = shapes(lambda: Embedding(3, 2, dtype=jnp.bfloat16, key=jax.random.key(0)))
    assert half.weight.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(treenn.trainable(embed))[0].shape == (64, 16)


def test_embedding_padding_row() -> None:
    embed = Embedding(6, 4, padding_idx=2, key=jax.random.key(0))
    w = np.asarray(embed.weight)
    np.testing.assert_array_equal(w[2], np.zeros(4))
    assert np.all(np.delete(w, 2, axis=0) != 0)
    last = Embedding(6, 4, padding_idx=-1, key=jax.random.key(0))
    assert last.padding_idx == 5  # normalised, as PyTorch
    np.testing.assert_array_equal(np.asarray(last.weight)[5], np.zeros(4))
    assert torch.nn.Embedding(6, 4, padding_idx=-1).padding_idx == 5


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_embedding_matches_torch(padding_idx: int | None) -> None:
    embed = Embedding(6, 4, padding_idx=padding_idx, key=jax.random.key(2))
    if padding_idx is not None:
        # A padding row that is no longer zero (e.g. loaded) is returned as it is.
        embed = eqx.tree_at(lambda m: m.weight, embed, embed.weight.at[padding_idx].set(0.5))
    ref = torch.nn.Embedding(6, 4, padding_idx=padding_idx)
    with torch.no_grad():
        ref.weight.copy_(to_torch(embed.weight))
    ids = jnp.array([[0, 1, 3], [3, 5, 0]])
    out = embed(ids)
    assert out.shape == (2, 3, 4) and out.dtype == jnp.float32
    want = ref(to_torch(ids).long())
    close(out, want, rtol=0, atol=0)
    close(embed(jnp.array(4)), ref(torch.tensor(4)), rtol=0, atol=0)  # a scalar id
    close(call(embed, ids), want, rtol=0, atol=0)
    # Gradients: the padding row gets none, as in PyTorch.
    scale = rand((2, 3, 4), 3)
    grads = treenn.grad(lambda m, i: jnp.sum(m(i) * scale))(embed, ids)
    (want * to_torch(scale)).sum().backward()
    close(grads.weight, ref.weight.grad, atol=1e-6)
    if padding_idx is not None:
        np.testing.assert_array_equal(np.asarray(grads.weight)[padding_idx], np.zeros(4))


def test_embedding_integer_dtypes_and_out_of_range_ids() -> None:
    embed = Embedding(6, 4, key=jax.random.key(0))
    w = np.asarray(embed.weight)
    for dtype in (jnp.int8, jnp.uint8, jnp.int16, jnp.uint32, jnp.int32):
        np.testing.assert_array_equal(np.asarray(embed(jnp.array([1, 4], dtype))), w[[1, 4]])
    # Documented: out-of-range ids are clamped (JAX's gather), not wrapped.
    np.testing.assert_array_equal(np.asarray(embed(jnp.array([-1, -7, 6, 99]))), w[[0, 0, 5, 5]])
    np.testing.assert_array_equal(np.asarray(embed(jnp.array([255], jnp.uint8))), w[[5]])


def test_embedding_errors() -> None:
    key = jax.random.key(0)
    embed = Embedding(6, 4, key=key)
    with pytest.raises(TypeError, match=r"(?s)Embedding.*(integer|ids)"):
        embed(jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"(?s)Embedding.*(integer|ids)"):
        embed(jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"nn\.Embedding\(6, 4\).*padding_idx=6.*\[-6, 6\)"):
        Embedding(6, 4, padding_idx=6, key=key)
    with pytest.raises(ValueError, match=r"padding_idx=-7"):
        Embedding(6, 4, padding_idx=-7, key=key)
    with pytest.raises(ValueError, match=r"nn\.Embedding\(0, 2\).*num_embeddings=0"):
        Embedding(0, 2, key=key)
    with pytest.raises(ValueError, match=r"embedding_dim=-1"):
        Embedding(5, -1, key=key)
    with pytest.raises(TypeError):
        Embedding(5, 2, None, key=key)  # type: ignore[misc]  # padding_idx is keyword-only
    params = inspect.signature(embed).parameters
    assert next(iter(params)) == "ids"
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY and params["key"].default is None


# -- Linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_linear_matches_torch(bias: bool, batch: tuple[int, ...]) -> None:
    layer = nn.Linear(5, 4, bias=bias, key=jax.random.key(3))
    ref = torch.nn.Linear(5, 4, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(to_torch(layer.weight))
        if bias:
            ref.bias.copy_(to_torch(layer.bias))
    x = rand((*batch, 5))
    close(call(layer, x), ref(to_torch(x)))
    # PyTorch's default init: both U(±1/sqrt(in_features)), like torch's own draw.
    bound = 1 / math.sqrt(5)
    assert float(jnp.abs(layer.weight).max()) <= bound
    assert (
        abs(float(jnp.abs(layer.weight).max()) - float(ref.weight.detach().abs().max())) < bound / 2
    )


# -- Linear ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_linear_shapes_and_numerics(key: jax.Array, batch: tuple[int, ...]) -> None:
    layer = nn.Linear(4, 3, key=key)
    x = rand((*batch, 4))
    y = layer(x)
    assert y.shape == (*batch, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(
        np64(y), linear_ref(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6
    )


def test_linear_without_bias(key: jax.Array) -> None:
    layer = nn.Linear(4, 3, bias=False, key=key)
    assert layer.bias is None
    assert names(layer) == {"weight": (3, 4)}
    x = rand((5, 4))
    np.testing.assert_allclose(
        np64(layer(x)), linear_ref(x, layer.weight, None), rtol=1e-5, atol=1e-6
    )


def test_linear_names_and_init(key: jax.Array) -> None:
    layer = nn.Linear(64, 32, key=key)
    assert names(layer) == {"weight": (32, 64), "bias": (32,)}
    assert layer.weight.dtype == jnp.float32
    bound = 1 / math.sqrt(64)
    check_uniform_init(layer.weight, bound)
    check_uniform_init(layer.bias, bound, n_min=32)
    assert not np.array_equal(np.asarray(layer.weight[0, :32]), np.asarray(layer.bias))
    # Different keys, different parameters; same key, same parameters.
    other = nn.Linear(64, 32, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(other.weight), np.asarray(layer.weight))
    again = nn.Linear(64, 32, key=key)
    np.testing.assert_array_equal(np.asarray(again.weight), np.asarray(layer.weight))


def test_linear_dtype_argument(key: jax.Array) -> None:
    layer = nn.Linear(3, 2, dtype=jnp.bfloat16, key=key)
    assert layer.weight.dtype == jnp.bfloat16 and layer.bias.dtype == jnp.bfloat16
    assert layer(jnp.ones((4, 3), jnp.bfloat16)).dtype == jnp.bfloat16


def test_linear_errors(key: jax.Array) -> None:
    layer = nn.Linear(4, 3, key=key)
    with pytest.raises(ValueError, match=r"nn\.Linear\(4, 3\).*\(\*batch, 4\).*got shape \(2, 5\)"):
        layer(jnp.ones((2, 5)))
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)Linear.*in_features"):
        layer(jnp.ones(()))
    with pytest.raises(ValueError, match=r"nn\.Linear\(-1, 3\).*>= 0"):
        nn.Linear(-1, 3, key=key)
