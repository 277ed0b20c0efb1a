"""treenn.nn layers: shapes, channels-last numerics against NumPy references written
from PyTorch's formulas, PyTorch initialisation and names, and clear errors."""

from __future__ import annotations

import inspect
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import treenn
import treenn.nn as nn

BATCHES = [(), (2,), (2, 3)]


def rand(key: jax.Array, shape: tuple[int, ...], i: int = 0) -> jax.Array:
    """Test data, drawn with NumPy (no JAX compilation per shape: keeps the suite fast)."""
    seed = int(np.asarray(jax.random.key_data(key)).sum()) + 1000 + i
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def names(tree: Any) -> dict[str, tuple[int, ...]]:
    """PyTorch-style `{dotted name: shape}` of a model's arrays."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        parts = [jax.tree_util.keystr((k,), simple=True) for k in path]
        out[".".join(p for p in parts if p)] = tuple(x.shape)
    return out


# -- NumPy references -------------------------------------------------------------------


def linear_ref(x: Any, w: Any, b: Any) -> np.ndarray:
    y = np64(x) @ np64(w).T
    return y if b is None else y + np64(b)


def same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def conv_ref(
    x: Any, w: Any, b: Any, stride: tuple[int, int], pads: Any, dil: tuple[int, int], groups: int
) -> np.ndarray:
    """Direct loop over an NHWC input with an OIHW (PyTorch) weight."""
    x, w = np64(x), np64(w)
    n, h, wd, _ = x.shape
    o, cg, kh, kw = w.shape
    if pads == "VALID":
        pads = ((0, 0), (0, 0))
    elif pads == "SAME":
        pads = (same_pads(h, kh, stride[0], dil[0]), same_pads(wd, kw, stride[1], dil[1]))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[2] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, ho, wo, o))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for i in range(ho):
            for j in range(wo):
                r0, c0 = i * stride[0], j * stride[1]
                patch = xp[
                    :,
                    r0 : r0 + dil[0] * (kh - 1) + 1 : dil[0],
                    c0 : c0 + dil[1] * (kw - 1) + 1 : dil[1],
                    g * cg : (g + 1) * cg,
                ]
                out[:, i, j, oc] = np.einsum("nhwc,chw->n", patch, w[oc])
    return out if b is None else out + np64(b)


def batchnorm_ref(x: Any, mean: Any, var: Any, w: Any, b: Any, eps: float = 1e-5) -> np.ndarray:
    return (np64(x) - np64(mean)) / np.sqrt(np64(var) + eps) * np64(w) + np64(b)


def layernorm_ref(x: Any, n_axes: int, w: Any, b: Any, eps: float = 1e-5) -> np.ndarray:
    x = np64(x)
    axes = tuple(range(x.ndim - n_axes, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * np64(w)
    if b is not None:
        y = y + np64(b)
    return y


# -- Linear ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_linear_shapes_and_numerics(key: jax.Array, batch: tuple[int, ...]) -> None:
    layer = nn.Linear(4, 3, key=key)
    x = rand(key, (*batch, 4))
    y = layer(x)
    assert y.shape == (*batch, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(
        np64(y), linear_ref(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6
    )


def test_linear_without_bias(key: jax.Array) -> None:
    layer = nn.Linear(4, 3, bias=False, key=key)
    assert layer.bias is None
    assert names(layer) == {"weight": (3, 4)}
    x = rand(key, (5, 4))
    np.testing.assert_allclose(
        np64(layer(x)), linear_ref(x, layer.weight, None), rtol=1e-5, atol=1e-6
    )


def test_linear_names_and_init(key: jax.Array) -> None:
    layer = nn.Linear(64, 32, key=key)
    assert names(layer) == {"weight": (32, 64), "bias": (32,)}
    assert layer.weight.dtype == jnp.float32
    bound = 1 / math.sqrt(64)
    _check_uniform(layer.weight, bound)
    _check_uniform(layer.bias, bound, n_min=32)
    assert not np.array_equal(np.asarray(layer.weight[0, :32]), np.asarray(layer.bias))
    # Different keys, different parameters; same key, same parameters.
    other = nn.Linear(64, 32, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(other.weight), np.asarray(layer.weight))
    again = nn.Linear(64, 32, key=key)
    np.testing.assert_array_equal(np.asarray(again.weight), np.asarray(layer.weight))


def _check_uniform(x: Any, bound: float, n_min: int = 100) -> None:
    """U(-bound, bound): inside the bounds, close to them, not constant, spread like a
    uniform (std bound/sqrt(3))."""
    x = np64(x).reshape(-1)
    assert x.size >= n_min
    assert np.all(np.abs(x) <= bound)
    assert np.abs(x).max() > 0.8 * bound
    assert len(np.unique(x)) > x.size // 2
    if x.size >= 1000:
        assert x.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert abs(x.mean()) < 0.1 * bound


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


# -- Conv2d ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_conv_shapes_channels_last(key: jax.Array, batch: tuple[int, ...]) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, key=key)
    x = rand(key, (*batch, 6, 7, 3))
    y = conv(x)
    assert y.shape == (*batch, 6, 7, 5)
    flat = x.reshape((-1, 6, 7, 3))
    want = conv_ref(flat, conv.weight, conv.bias, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    np.testing.assert_allclose(np64(y).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


CONV_CASES = [
    # (in, out, kernel, kwargs, reference stride, pads, dilation, groups)
    pytest.param(4, 4, 3, {}, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, id="defaults"),
    pytest.param(
        4,
        4,
        3,
        {"stride": 2, "padding": 1},
        (2, 2),
        ((1, 1), (1, 1)),
        (1, 1),
        1,
        id="stride-int-pad",
    ),
    pytest.param(
        4,
        4,
        (2, 3),
        {"stride": (1, 2), "padding": (1, 2)},
        (1, 2),
        ((1, 1), (2, 2)),
        (1, 1),
        1,
        id="tuple-pad",
    ),
    pytest.param(
        4, 4, 3, {"padding": ((1, 0), (2, 1))}, (1, 1), ((1, 0), (2, 1)), (1, 1), 1, id="pair-pad"
    ),
    pytest.param(4, 4, 3, {"padding": "SAME"}, (1, 1), "SAME", (1, 1), 1, id="same"),
    pytest.param(
        4,
        4,
        3,
        {"padding": "same", "stride": 2, "dilation": 2},
        (2, 2),
        "SAME",
        (2, 2),
        1,
        id="same-strided-dilated",
    ),
    pytest.param(4, 4, 3, {"padding": "VALID"}, (1, 1), "VALID", (1, 1), 1, id="valid"),
    pytest.param(
        4,
        4,
        3,
        {"dilation": (2, 1), "padding": 2},
        (1, 1),
        ((2, 2), (2, 2)),
        (2, 1),
        1,
        id="dilation",
    ),
    pytest.param(
        4, 6, 3, {"groups": 2, "padding": 1}, (1, 1), ((1, 1), (1, 1)), (1, 1), 2, id="groups"
    ),
    pytest.param(
        4,
        4,
        3,
        {"groups": 4, "padding": 1, "bias": False},
        (1, 1),
        ((1, 1), (1, 1)),
        (1, 1),
        4,
        id="depthwise-no-bias",
    ),
]


@pytest.mark.parametrize("cin, cout, kernel, kwargs, stride, pads, dil, groups", CONV_CASES)
def test_conv_numerics(
    key: jax.Array,
    cin: int,
    cout: int,
    kernel: Any,
    kwargs: dict[str, Any],
    stride: Any,
    pads: Any,
    dil: Any,
    groups: int,
) -> None:
    conv = nn.Conv2d(cin, cout, kernel, key=key, **kwargs)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert conv.weight.shape == (cout, cin // groups, kh, kw)
    if kwargs.get("bias", True):
        assert conv.bias is not None and conv.bias.shape == (cout,)
    else:
        assert conv.bias is None
    x = rand(key, (2, 7, 6, cin))
    want = conv_ref(x, conv.weight, conv.bias, stride, pads, dil, groups)
    got = conv(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np64(got), want, rtol=1e-5, atol=1e-5)


def test_conv_names_and_init(key: jax.Array) -> None:
    conv = nn.Conv2d(8, 16, (3, 2), groups=2, key=key)
    assert names(conv) == {"weight": (16, 4, 3, 2), "bias": (16,)}
    bound = 1 / math.sqrt(4 * 3 * 2)  # fan_in = in_channels / groups * kh * kw
    _check_uniform(conv.weight, bound)
    assert np.all(np.abs(np64(conv.bias)) <= bound) and len(np.unique(np64(conv.bias))) == 16


def test_conv_errors(key: jax.Array) -> None:
    conv = nn.Conv2d(3, 4, 3, key=key)
    with pytest.raises(
        ValueError,
        match=r"nn\.Conv2d\(3, 4\).*\(\*batch, height, width, 3\).*got shape \(1, 5, 5, 2\)",
    ):
        conv(jnp.ones((1, 5, 5, 2)))
    # Too few axes: the layer's check or the runtime type checker, either naming the layer
    # and the expected layout.
    with pytest.raises(
        (ValueError, TypeCheckError), match=r"(?s)Conv2d.*height.*width.*in_channels"
    ):
        conv(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"groups=3.*divisible by groups"):
        nn.Conv2d(4, 6, 3, groups=3, key=key)
    with pytest.raises(ValueError, match=r"groups=2.*divisible by groups"):
        nn.Conv2d(4, 5, 3, groups=2, key=key)
    with pytest.raises(ValueError, match=r"padding='FULL'"):
        nn.Conv2d(3, 4, 3, padding="FULL", key=key)
    with pytest.raises(ValueError, match=r"padding=.*-1.*non-negative"):
        nn.Conv2d(3, 4, 3, padding=-1, key=key)
    with pytest.raises(ValueError, match=r"stride=0"):
        nn.Conv2d(3, 4, 3, stride=0, key=key)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3, 3\)"):
        nn.Conv2d(3, 4, (3, 3, 3), key=key)


# -- BatchNorm ---------------------------------------------------------------------------


def _affine_bn(n: int, key: jax.Array, **kwargs: Any) -> nn.BatchNorm:
    bn = nn.BatchNorm(n, **kwargs)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        bn,
        (1 + 0.5 * rand(key, (n,), 1), 0.3 * rand(key, (n,), 2)),
    )


def test_batchnorm_names_and_defaults() -> None:
    bn = nn.BatchNorm(3)
    assert names(bn) == {"weight": (3,), "bias": (3,), "running_mean": (3,), "running_var": (3,)}
    np.testing.assert_array_equal(np.asarray(bn.weight), np.ones(3))
    np.testing.assert_array_equal(np.asarray(bn.bias), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.running_mean), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.running_var), np.ones(3))
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.inference is False
    trainable = treenn.trainable(bn)
    assert trainable.running_mean is None and trainable.running_var is None
    assert trainable.weight is not None and trainable.bias is not None
    assert treenn.trainable(treenn.unfreeze(bn)).running_var is None  # buffers stay buffers


@pytest.mark.parametrize("batch", [(8,), (2, 3), (2, 3, 4)])
def test_batchnorm_training_and_running_statistics(key: jax.Array, batch: tuple[int, ...]) -> None:
    bn = _affine_bn(3, key)
    x = 2.0 + 1.5 * rand(key, (*batch, 3))
    y, bn1 = treenn.apply(bn, x)
    flat = np64(x).reshape(-1, 3)
    mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    assert y.shape == x.shape
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, mean, biased, bn.weight, bn.bias), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np64(bn1.running_mean), 0.9 * 0 + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(bn1.running_var), 0.9 * 1 + 0.1 * unbiased, rtol=1e-5)
    # The input model is unchanged; the update is in the returned one only.
    np.testing.assert_array_equal(np.asarray(bn.running_mean), np.zeros(3))
    # A second step compounds from the first's statistics.
    x2 = rand(key, (*batch, 3), 7) - 1.0
    _, bn2 = treenn.apply(bn1, x2)
    flat2 = np64(x2).reshape(-1, 3)
    np.testing.assert_allclose(
        np64(bn2.running_mean),
        0.9 * np64(bn1.running_mean) + 0.1 * flat2.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np64(bn2.running_var), 0.9 * np64(bn1.running_var) + 0.1 * flat2.var(0, ddof=1), rtol=1e-5
    )
    # Running statistics remain buffers after the update.
    assert treenn.trainable(bn2).running_var is None


def test_batchnorm_momentum_and_eps_arguments(key: jax.Array) -> None:
    bn = nn.BatchNorm(2, momentum=0.25, eps=1e-2)
    x = rand(key, (5, 2))
    y, new = treenn.apply(bn, x)
    flat = np64(x)
    np.testing.assert_allclose(np64(new.running_mean), 0.25 * flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(new.running_var), 0.75 + 0.25 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, flat.mean(0), flat.var(0), 1, 0, eps=1e-2), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("batch", BATCHES)
def test_batchnorm_eval_uses_running_statistics(key: jax.Array, batch: tuple[int, ...]) -> None:
    bn = _affine_bn(3, key)
    bn = eqx.tree_at(
        lambda m: (m.running_mean, m.running_var),
        bn,
        (jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 4.0, 1.5])),
    )
    assert treenn.trainable(bn).running_mean is None  # still a buffer after tree_at
    ev = nn.eval_mode(bn)
    x = rand(key, (*batch, 3))
    y = ev(x)  # no treenn.apply needed in eval mode
    assert y.shape == x.shape
    want = batchnorm_ref(x, [0.5, -1.0, 2.0], [0.25, 4.0, 1.5], bn.weight, bn.bias)
    np.testing.assert_allclose(np64(y), want, rtol=1e-5, atol=1e-5)
    out, same = treenn.apply(ev, x)  # eval mode: no statistics update
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(same.running_mean), np.asarray(bn.running_mean))


def test_batchnorm_without_affine(key: jax.Array) -> None:
    bn = nn.BatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    assert names(bn) == {"running_mean": (3,), "running_var": (3,)}
    x = rand(key, (4, 3))
    y, _ = treenn.apply(bn, x)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(x, np64(x).mean(0), np64(x).var(0), 1, 0), rtol=1e-4, atol=1e-5
    )


def test_batchnorm_half_precision_input(key: jax.Array) -> None:
    bn = nn.BatchNorm(3)
    x = rand(key, (6, 3)).astype(jnp.bfloat16)
    y, new = treenn.apply(bn, x)
    assert y.dtype == jnp.bfloat16
    assert new.running_mean.dtype == jnp.float32
    flat = np64(x)
    np.testing.assert_allclose(
        np64(y), batchnorm_ref(flat, flat.mean(0), flat.var(0), 1, 0), rtol=2e-2, atol=2e-2
    )


def test_batchnorm_errors(key: jax.Array) -> None:
    bn = nn.BatchNorm(3)
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*\(\*batch, 3\).*got shape \(4, 2\)"):
        treenn.apply(bn, jnp.ones((4, 2)))
    with pytest.raises((ValueError, TypeCheckError), match=r"(?s)BatchNorm.*num_features"):
        nn.eval_mode(bn)(jnp.ones(()))
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(3\).*more than one value per channel"):
        treenn.apply(bn, jnp.ones((3,)))
    with pytest.raises(RuntimeError, match=r"nn\.BatchNorm\(3\).*treenn\.apply"):
        bn(jnp.ones((4, 3)))  # training mode outside treenn.apply would lose the statistics
    with pytest.raises(ValueError, match=r"nn\.BatchNorm\(0\)"):
        nn.BatchNorm(0)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        nn.BatchNorm(3, momentum=1.5)


# -- LayerNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_layernorm_last_axis(key: jax.Array, batch: tuple[int, ...]) -> None:
    norm = nn.LayerNorm(5)
    assert names(norm) == {"weight": (5,), "bias": (5,)}
    norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (rand(key, (5,), 1), rand(key, (5,), 2)))
    x = 3.0 + rand(key, (*batch, 5))
    y = norm(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(
        np64(y), layernorm_ref(x, 1, norm.weight, norm.bias), rtol=1e-4, atol=1e-5
    )


def test_layernorm_tuple_shape_and_no_affine(key: jax.Array) -> None:
    norm = nn.LayerNorm((3, 4))
    assert names(norm) == {"weight": (3, 4), "bias": (3, 4)}
    norm = eqx.tree_at(
        lambda m: (m.weight, m.bias), norm, (rand(key, (3, 4), 1), rand(key, (3, 4), 2))
    )
    x = rand(key, (2, 3, 4))
    np.testing.assert_allclose(
        np64(norm(x)), layernorm_ref(x, 2, norm.weight, norm.bias), rtol=1e-4, atol=1e-5
    )

    bare = nn.LayerNorm([3, 4], elementwise_affine=False, eps=1e-3)
    assert bare.weight is None and bare.bias is None and names(bare) == {}
    np.testing.assert_allclose(
        np64(bare(x)), layernorm_ref(x, 2, None, None, eps=1e-3), rtol=1e-4, atol=1e-5
    )

    no_bias = nn.LayerNorm(4, bias=False)
    assert names(no_bias) == {"weight": (4,)}


def test_layernorm_errors(key: jax.Array) -> None:
    with pytest.raises(
        ValueError, match=r"nn\.LayerNorm\(\(3, 4\)\).*\(\*batch, 3, 4\).*got shape \(2, 4, 3\)"
    ):
        nn.LayerNorm((3, 4))(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"nn\.LayerNorm\(\(3, 4\)\).*got shape \(4,\)"):
        nn.LayerNorm((3, 4))(jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"nn\.LayerNorm\(0\)"):
        nn.LayerNorm(0)


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
    x = rand(key, (*batch, 4))
    assert nn.Dropout(0.5)(x, key=key).shape == x.shape


def test_dropout_eval_and_edge_probabilities(key: jax.Array) -> None:
    x = rand(key, (3, 4))
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
    assert jax.tree_util.tree_leaves(nn.Dropout(0.5)) == []


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
    x = rand(key, (5, 3))
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
    h = rand(key, (5, 4))
    want = linear_ref(np.maximum(np64(h), 0), last.weight, last.bias)
    np.testing.assert_allclose(np64(tail(h)), want, rtol=1e-5, atol=1e-6)


def test_sequential_accepts_equinox_layers(key: jax.Array) -> None:
    seq = nn.Sequential(eqx.nn.Linear(3, 2, key=key), eqx.nn.Dropout(0.5, inference=True))
    x = rand(key, (3,))
    np.testing.assert_allclose(np64(seq(x, key=key)), np64(seq[0](x)), rtol=1e-6)


def test_sequential_with_batchnorm_inside_apply(key: jax.Array) -> None:
    seq = nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4), jax.nn.relu, nn.Dropout(0.5))
    x = rand(key, (6, 3))
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
    x = rand(key, (2, 3))
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
