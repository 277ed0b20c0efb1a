"""MaxPool, AvgPool, AdaptiveAvgPool (1-d, 2-d, 3-d) against `torch.nn` (inputs moved
channels-last -> channels-first), GlobalAvgPool against NumPy, static configuration, and
clear errors."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rand_np
from jaxtyping import TypeCheckError

from treenn.nn import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    GlobalAvgPool,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
)

MAX = {1: MaxPool1d, 2: MaxPool2d, 3: MaxPool3d}
AVG = {1: AvgPool1d, 2: AvgPool2d, 3: AvgPool3d}
ADAPTIVE = {1: AdaptiveAvgPool1d, 2: AdaptiveAvgPool2d, 3: AdaptiveAvgPool3d}
TORCH_MAX = {1: torch.nn.MaxPool1d, 2: torch.nn.MaxPool2d, 3: torch.nn.MaxPool3d}
TORCH_AVG = {1: torch.nn.AvgPool1d, 2: torch.nn.AvgPool2d, 3: torch.nn.AvgPool3d}
TORCH_ADAPTIVE = {
    1: torch.nn.AdaptiveAvgPool1d,
    2: torch.nn.AdaptiveAvgPool2d,
    3: torch.nn.AdaptiveAvgPool3d,
}
DIMS = [1, 2, 3]
BATCHES = [(), (2,), (2, 1)]
# The main cases run with batch (2,), a few with these too.
EXTRA_BATCHES = [(), (2, 1)]
SIZES = (7, 6, 5)  # odd and even spatial sizes
CHANNELS = 3


def to_torch(x: np.ndarray, n: int) -> torch.Tensor:
    """`(*batch, *spatial, C)` -> `(N, C, *spatial)`, the batch axes flattened."""
    x = x.reshape((-1, *x.shape[x.ndim - n - 1 :]))
    return torch.tensor(np.moveaxis(x, -1, 1))


def from_torch(y: torch.Tensor, batch: tuple[int, ...]) -> np.ndarray:
    y = np.moveaxis(y.detach().numpy(), 1, -1)
    return y.reshape((*batch, *y.shape[1:]))


def tup(n: int, *values: Any) -> tuple[Any, ...]:
    return tuple(values[:n])


# name -> (layer, input, expected output)
Cases = dict[str, tuple[Any, np.ndarray, np.ndarray]]


def check_cases(cases: Cases, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Run every case in one jitted function (one compilation per test rather than one
    per case and operation: keeps the suite fast) and compare."""
    layers = [layer for layer, _, _ in cases.values()]
    xs = [jnp.asarray(x) for _, x, _ in cases.values()]
    outs = jax.jit(lambda layers, xs: [layer(x) for layer, x in zip(layers, xs)])(layers, xs)
    for (name, (_, _, want)), got in zip(cases.items(), outs):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=name)


def torch_case(
    ours: Any, theirs: Any, n: int, batch: tuple[int, ...], seed: int = 0, negative: bool = False
) -> tuple[Any, np.ndarray, np.ndarray]:
    x = rand_np((*batch, *SIZES[:n], CHANNELS), seed)
    if negative:
        x = -np.abs(x) - 1
    return ours, x, from_torch(theirs(to_torch(x, n)), batch)


# -- MaxPool / AvgPool ----------------------------------------------------------------------

# name -> n -> kwargs, the same for treenn and PyTorch
WINDOW_CASES: dict[str, Callable[[int], dict[str, Any]]] = {
    "kernel-2": lambda n: {"kernel_size": 2},
    "k3-s2-p1-ceil": lambda n: {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    # size 7: the last window would start in the right padding and is dropped
    "ceil-drops-last-window": lambda n: {
        "kernel_size": 2,
        "stride": 2,
        "padding": 1,
        "ceil_mode": True,
    },
    "ceil-no-padding": lambda n: {"kernel_size": 3, "stride": 2, "ceil_mode": True},
    "tuples": lambda n: {
        "kernel_size": tup(n, 3, 2, 3),
        "stride": tup(n, 2, 1, 3),
        "padding": tup(n, 1, 0, 1),
    },
}
MAX_ONLY: dict[str, Callable[[int], dict[str, Any]]] = {
    "dilation": lambda n: {
        "kernel_size": 2,
        "stride": 1,
        "padding": 1,
        "dilation": tup(n, 2, 3, 1),
    },
    "dilation-ceil": lambda n: {
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
        "dilation": 2,
        "ceil_mode": True,
    },
}
AVG_ONLY: dict[str, Callable[[int], dict[str, Any]]] = {
    "exclude-pad": lambda n: {
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
        "count_include_pad": False,
    },
    "exclude-pad-ceil": lambda n: {
        "kernel_size": tup(n, 3, 2, 3),
        "stride": 2,
        "padding": 1,
        "ceil_mode": True,
        "count_include_pad": False,
    },
    "include-pad-ceil-tuples": lambda n: {
        "kernel_size": tup(n, 2, 3, 2),
        "stride": tup(n, 3, 2, 2),
        "padding": 1,
        "ceil_mode": True,
    },
}


@pytest.mark.parametrize("n", DIMS)
def test_max_pool_matches_torch(n: int) -> None:
    cases = {
        name: torch_case(MAX[n](**kw(n)), TORCH_MAX[n](**kw(n)), n, (2,), seed=i)
        for i, (name, kw) in enumerate({**WINDOW_CASES, **MAX_ONLY}.items())
    }
    # Padding is -inf: an all-negative input never sees a padded 0.
    kw = {"kernel_size": 3, "stride": 2, "padding": 1}
    cases["padding-is-minus-inf"] = torch_case(
        MAX[n](**kw), TORCH_MAX[n](**kw), n, (2,), negative=True
    )
    for batch in EXTRA_BATCHES:
        kw = WINDOW_CASES["k3-s2-p1-ceil"](n)
        cases[f"batch={batch}"] = torch_case(MAX[n](**kw), TORCH_MAX[n](**kw), n, batch)
    check_cases(cases)
    assert np.all(cases["padding-is-minus-inf"][2] <= -1)


@pytest.mark.parametrize("n", DIMS)
def test_avg_pool_matches_torch(n: int) -> None:
    cases = {
        name: torch_case(AVG[n](**kw(n)), TORCH_AVG[n](**kw(n)), n, (2,), seed=i)
        for i, (name, kw) in enumerate({**WINDOW_CASES, **AVG_ONLY}.items())
    }
    for batch in EXTRA_BATCHES:
        kw = AVG_ONLY["exclude-pad-ceil"](n)
        cases[f"batch={batch}"] = torch_case(AVG[n](**kw), TORCH_AVG[n](**kw), n, batch)
    check_cases(cases)


def test_pool_gradients_match_torch() -> None:
    layers = [
        (
            MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        ),
        (
            AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        ),
        (AdaptiveAvgPool2d((3, 4)), torch.nn.AdaptiveAvgPool2d((3, 4))),
    ]
    x = rand_np((2, 7, 6, CHANNELS))
    ours = [layer for layer, _ in layers]
    rs = [rand_np(tuple(jax.eval_shape(layer, jnp.asarray(x)).shape), seed=5) for layer in ours]

    @jax.jit
    def grads(ours: Any, x: jax.Array) -> Any:
        return [jax.grad(lambda x: jnp.sum(layer(x) * r))(x) for layer, r in zip(ours, rs)]

    for (layer, ref), r, got in zip(layers, rs, grads(ours, jnp.asarray(x))):
        xt = to_torch(x, 2).requires_grad_(True)
        (ref(xt) * to_torch(r, 2)).sum().backward()
        want = from_torch(xt.grad, (2,))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=str(layer))


# -- AdaptiveAvgPool and GlobalAvgPool ----------------------------------------------------------

ADAPTIVE_CASES: dict[str, Callable[[int], Any]] = {
    "one": lambda n: 1,
    "non-divisible": lambda n: 3,  # 7, 6, 5 -> 3: overlapping bins
    "divisible": lambda n: tup(n, 7, 3, 5),
    "larger-than-input": lambda n: tup(n, 9, 8, 11),
    "keep-an-axis": lambda n: tup(n, None, 4, None) if n > 1 else (7,),  # torch: no 1-d None
    "mixed": lambda n: tup(n, 2, 5, 4),
}


@pytest.mark.parametrize("n", DIMS)
def test_adaptive_avg_pool_matches_torch(n: int) -> None:
    cases = {
        name: torch_case(ADAPTIVE[n](size(n)), TORCH_ADAPTIVE[n](size(n)), n, (2,), seed=i)
        for i, (name, size) in enumerate(ADAPTIVE_CASES.items())
    }
    for batch in EXTRA_BATCHES:
        size = ADAPTIVE_CASES["mixed"](n)
        cases[f"batch={batch}"] = torch_case(ADAPTIVE[n](size), TORCH_ADAPTIVE[n](size), n, batch)
    check_cases(cases, rtol=1e-5)


def test_adaptive_avg_pool_output_size() -> None:
    assert AdaptiveAvgPool2d(3).output_size == (3, 3)
    assert AdaptiveAvgPool3d((2, None, 4)).output_size == (2, None, 4)
    assert AdaptiveAvgPool1d(None).output_size == (None,)
    shape = jax.eval_shape(AdaptiveAvgPool2d((None, 2)), jnp.ones((4, 9, 5, 3))).shape
    assert shape == (4, 9, 2, 3)


@pytest.mark.parametrize("n", DIMS)
def test_global_avg_pool(n: int) -> None:
    cases: Cases = {}
    for batch in BATCHES:
        x = rand_np((*batch, *SIZES[:n], CHANNELS), seed=len(batch))
        mean = x.astype(np.float64).mean(axis=tuple(range(len(batch), len(batch) + n)))
        cases[f"batch={batch}"] = (GlobalAvgPool(n), x, mean.astype(np.float32))
        kept = mean.reshape((*batch, *(1,) * n, CHANNELS)).astype(np.float32)
        cases[f"keepdims, batch={batch}"] = (GlobalAvgPool(n, keepdims=True), x, kept)
    check_cases(cases, rtol=1e-5)
    assert cases["batch=(2, 1)"][2].shape == (2, 1, CHANNELS)


# -- structure, calling convention, dtypes, errors ----------------------------------------------


def all_layers() -> list[Any]:
    return [
        *(cls(2) for cls in MAX.values()),
        *(cls(2) for cls in AVG.values()),
        *(cls(2) for cls in ADAPTIVE.values()),
        GlobalAvgPool(1),
        GlobalAvgPool(2),
        GlobalAvgPool(3, keepdims=True),
    ]


def test_pooling_layers_hold_no_arrays_and_static_config() -> None:
    for layer in all_layers():
        assert jax.tree_util.tree_leaves(layer) == [], layer
        fields = dataclasses.fields(layer)
        assert fields and all(f.metadata.get("static") for f in fields), layer
    pool = MaxPool2d((3, 2), padding=1, dilation=(1, 2), ceil_mode=True)
    assert (pool.kernel_size, pool.stride, pool.padding) == ((3, 2), (3, 2), (1, 1))
    assert pool.dilation == (1, 2) and pool.ceil_mode is True
    avg = AvgPool3d(2, stride=(1, 2, 1), count_include_pad=False)
    assert avg.stride == (1, 2, 1) and avg.padding == (0, 0, 0)
    assert avg.count_include_pad is False and avg.ceil_mode is False
    assert AvgPool1d(3).count_include_pad is True


def test_calling_convention() -> None:
    for layer in all_layers():
        n = layer.num_spatial_dims
        params = inspect.signature(layer).parameters
        assert list(params) == ["x", "key"], layer
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["key"].default is None
        x = jnp.ones((1, *(4,) * n, 2))
        assert jax.eval_shape(lambda x: layer(x, key=jax.random.key(0)), x).shape[-1] == 2
        with pytest.raises(TypeError):
            layer(x, jax.random.key(0))
    for cls in (MaxPool2d, AvgPool2d):
        with pytest.raises(TypeError):
            cls(2, 1)  # stride is keyword-only
        ctor = inspect.signature(cls).parameters
        assert [p for p in ctor if ctor[p].kind is inspect.Parameter.KEYWORD_ONLY][:2] == [
            "stride",
            "padding",
        ]


def test_dtypes_are_kept() -> None:
    """Half-precision in, half-precision out; sums accumulated in float32 (as PyTorch)."""
    layers = [
        MaxPool2d(2, padding=1),
        AvgPool2d(3, padding=1),
        AdaptiveAvgPool2d(3),
        GlobalAvgPool(2),
    ]
    x = jnp.asarray(rand_np((2, 9, 8, 3)) + 100, jnp.bfloat16)
    run = jax.jit(lambda layers, x: [layer(x) for layer in layers])
    for layer, y, y32 in zip(layers, run(layers, x), run(layers, x.astype(jnp.float32))):
        assert y.dtype == jnp.bfloat16, layer
        # Within one bfloat16 rounding of the float32 result (no bfloat16 accumulation).
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y32), rtol=2**-8, err_msg=str(layer)
        )


@pytest.mark.parametrize(
    "layer, names",
    [
        (MaxPool1d(2), "length, channels"),
        (MaxPool2d(2), "height, width, channels"),
        (AvgPool3d(2), "depth, height, width, channels"),
        (AdaptiveAvgPool2d(2), "height, width, channels"),
        (GlobalAvgPool(2), "height, width, channels"),
    ],
)
def test_wrong_rank(layer: Any, names: str) -> None:
    # The layer's check or the runtime type checker, either naming the layer and the
    # expected layout.
    n = layer.num_spatial_dims
    last = names.split(", ")[-2]
    with pytest.raises((ValueError, TypeCheckError), match=rf"(?s){type(layer).__name__}.*{last}"):
        layer(jnp.ones((4,) * n))


def test_input_too_small() -> None:
    with pytest.raises(
        ValueError,
        match=r"nn\.MaxPool2d\(kernel_size=\(3, 3\).*input of shape \(1, 2, 5, 1\) is too small",
    ):
        MaxPool2d(3)(jnp.ones((1, 2, 5, 1)))
    with pytest.raises(ValueError, match=r"nn\.AvgPool1d.*too small"):
        AvgPool1d(4, padding=1)(jnp.ones((1, 1, 1)))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"nn\.MaxPool2d: padding=\(2, 2\) must be at most half"):
        MaxPool2d(3, padding=2)
    with pytest.raises(ValueError, match=r"nn\.AvgPool1d: padding=\(2,\) must be at most half"):
        AvgPool1d(3, padding=2)
    with pytest.raises(ValueError, match=r"nn\.MaxPool1d: padding=\(2,\) must be at most half"):
        MaxPool1d(3, padding=2, dilation=2)  # PyTorch's rule: the undilated kernel
    with pytest.raises(ValueError, match=r"nn\.MaxPool3d: padding=-1.*non-negative"):
        MaxPool3d(3, padding=-1)
    with pytest.raises(ValueError, match=r"nn\.AvgPool3d: stride=0"):
        AvgPool3d(2, stride=0)
    with pytest.raises(ValueError, match=r"nn\.MaxPool1d: kernel_size=\(2, 2\).*1 positive"):
        MaxPool1d((2, 2))
    with pytest.raises(ValueError, match=r"nn\.AvgPool2d: kernel_size=0"):
        AvgPool2d(0)
    with pytest.raises(ValueError, match=r"nn\.MaxPool2d: dilation=0"):
        MaxPool2d(2, dilation=0)
    with pytest.raises(ValueError, match=r"nn\.AdaptiveAvgPool2d: output_size=0"):
        AdaptiveAvgPool2d(0)
    with pytest.raises(ValueError, match=r"nn\.AdaptiveAvgPool3d: output_size=\(2, 2\)"):
        AdaptiveAvgPool3d((2, 2))
    with pytest.raises(ValueError, match=r"nn\.GlobalAvgPool: num_spatial_dims=0"):
        GlobalAvgPool(0)
