"""Conv1d/2d/3d and ConvTranspose1d/2d/3d against `torch.nn` (weights copied from treenn
to torch, inputs moved channels-last -> channels-first), PyTorch's parameter layout and
initialisation, and clear errors."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BATCHES, check_uniform_init, names, np64, rand, rand_np
from jaxtyping import TypeCheckError

import treenn.nn as nn
from treenn.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
)

CONV = {1: Conv1d, 2: Conv2d, 3: Conv3d}
CONV_T = {1: ConvTranspose1d, 2: ConvTranspose2d, 3: ConvTranspose3d}
TORCH_CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
TORCH_CONV_T = {
    1: torch.nn.ConvTranspose1d,
    2: torch.nn.ConvTranspose2d,
    3: torch.nn.ConvTranspose3d,
}
DIMS = [1, 2, 3]
# Leading batch axes: the main cases run with (2,), a few with these too.
EXTRA_BATCHES = [(), (2, 1)]
# "rbg" keys: their initialisers compile several times faster than threefry's (one
# compilation per parameter shape), which keeps the suite fast. The initialisation is the
# same function of the key either way.
KEY = jax.random.key(0, impl="rbg")


Maker = Callable[[jax.Array], Any]


def build_and_run(specs: list[tuple[Maker, np.ndarray]]) -> tuple[list[Any], list[np.ndarray]]:
    """Build every layer (`make(key)`) and call them all on their inputs in one jitted
    function: one compilation per test rather than one per case and operation."""
    layers = [make(jax.random.fold_in(KEY, i)) for i, (make, _) in enumerate(specs)]
    xs = [jnp.asarray(x) for _, x in specs]
    outs = jax.jit(lambda layers, xs: [layer(x) for layer, x in zip(layers, xs)])(layers, xs)
    return layers, [np.asarray(y) for y in outs]


# name -> (make, input, reference: layer -> expected output)
Cases = dict[str, tuple[Maker, np.ndarray, Callable[[Any], np.ndarray]]]


def check_cases(cases: Cases) -> None:
    layers, outs = build_and_run([(make, x) for make, x, _ in cases.values()])
    for (name, (_, _, reference)), layer, got in zip(cases.items(), layers, outs):
        want = reference(layer)
        assert got.shape == want.shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def to_torch(x: np.ndarray, n: int) -> torch.Tensor:
    """`(*batch, *spatial, C)` -> `(N, C, *spatial)`, the batch axes flattened."""
    x = x.reshape((-1, *x.shape[x.ndim - n - 1 :]))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def from_torch(y: torch.Tensor, batch: tuple[int, ...]) -> np.ndarray:
    y = np.moveaxis(y.detach().numpy(), 1, -1)
    return y.reshape((*batch, *y.shape[1:]))


def copy_to_torch(layer: Any, ref: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        assert tuple(ref.weight.shape) == tuple(layer.weight.shape)
        ref.weight.copy_(torch.tensor(np.asarray(layer.weight)))
        if layer.bias is None:
            assert ref.bias is None
        else:
            ref.bias.copy_(torch.tensor(np.asarray(layer.bias)))
    return ref


def tup(n: int, *values: Any) -> tuple[Any, ...]:
    return tuple(values[:n])


def same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def torch_pad(pairs: Any) -> tuple[int, ...]:
    """(low, high) pairs, first spatial axis first -> F.pad's order (last axis first)."""
    return tuple(v for lo_hi in reversed(pairs) for v in lo_hi)


# -- Conv -------------------------------------------------------------------------------

# name -> n -> (in, out, kernel, our kwargs, torch kwargs, explicit torch pre-padding or
# None). With pre-padding, torch runs with padding=0 on the F.pad-ed input. The weights
# have few distinct shapes ((96, 4, *kernel) with groups 1 or 2, depthwise (4, 1,
# *kernel)), shared with the transposed, init and other tests: each new shape costs a
# compilation of the initialiser.
ConvCase = Callable[[int], tuple[int, int, Any, dict[str, Any], dict[str, Any], Any]]
SIZES = (7, 6, 5)


def K(n: int) -> tuple[int, ...]:
    """A kernel size with an even, an odd and a 3-d axis."""
    return tup(n, 4, 2, 3)


CONV_CASES: dict[str, ConvCase] = {
    "defaults": lambda n: (4, 96, 3, {}, {}, None),
    "stride-padding": lambda n: (4, 96, 3, {"stride": 2, "padding": 1}, {}, None),
    "tuples": lambda n: (
        4,
        96,
        K(n),
        {"stride": tup(n, 1, 2, 3), "padding": tup(n, 1, 0, 2), "dilation": tup(n, 2, 1, 1)},
        {},
        None,
    ),
    "pairs": lambda n: (4, 96, 3, {"padding": tup(n, (1, 0), (2, 1), (0, 2))}, {"padding": 0}, 0),
    "same-dilated": lambda n: (4, 96, 3, {"padding": "same", "dilation": 2}, {}, None),
    "same-even-kernel": lambda n: (4, 96, K(n), {"padding": "Same"}, {"padding": 0}, 0),
    "same-strided": lambda n: (4, 96, 3, {"padding": "SAME", "stride": 2}, {"padding": 0}, 0),
    "valid-strided": lambda n: (
        4,
        96,
        3,
        {"padding": "VALID", "stride": 2},
        {"padding": "valid"},
        None,
    ),
    "groups": lambda n: (8, 96, 3, {"groups": 2, "padding": 1}, {}, None),
    "depthwise-no-bias": lambda n: (4, 4, 3, {"groups": 4, "bias": False, "stride": 2}, {}, None),
}


def conv_case(n: int, case: ConvCase, batch: tuple[int, ...]) -> tuple[Maker, np.ndarray, Any]:
    cin, cout, kernel, kwargs, torch_kwargs, prepad = case(n)
    x = rand_np((*batch, *SIZES[:n], cin), seed=n)

    def make(key: jax.Array) -> Any:
        return CONV[n](cin, cout, kernel, key=key, **kwargs)

    def reference(layer: Any) -> np.ndarray:
        ref = copy_to_torch(layer, TORCH_CONV[n](cin, cout, kernel, **{**kwargs, **torch_kwargs}))
        xt = to_torch(x, n)
        if prepad is not None:
            pads = kwargs["padding"]
            if isinstance(pads, str):  # "SAME": TensorFlow's rule, PyTorch's for stride 1
                k = (kernel,) * n if isinstance(kernel, int) else kernel
                pads = [same_pads(SIZES[i], k[i], kwargs.get("stride", 1), 1) for i in range(n)]
            xt = F.pad(xt, torch_pad(pads))
        return from_torch(ref(xt), batch)

    return make, x, reference


@pytest.mark.parametrize("n", DIMS)
def test_conv_matches_torch(n: int) -> None:
    cases = {name: conv_case(n, case, (2,)) for name, case in CONV_CASES.items()}
    groups = CONV_CASES["groups"]
    for batch in EXTRA_BATCHES:
        strided = lambda n: (*groups(n)[:3], {**groups(n)[3], "stride": 2}, {}, None)
        cases[f"groups-strided, batch={batch}"] = conv_case(n, strided, batch)
    check_cases(cases)


@pytest.mark.parametrize("n", DIMS)
def test_conv_names_shapes_and_init(n: int) -> None:
    conv = CONV[n](8, 96, K(n), groups=2, key=KEY)
    assert names(conv) == {"weight": (96, 4, *K(n)), "bias": (96,)}
    assert conv.weight.dtype == jnp.float32
    assert (conv.kernel_size, conv.stride, conv.dilation) == (K(n), (1,) * n, (1,) * n)
    assert conv.padding == ((0, 0),) * n and conv.groups == 2
    bound = 1 / math.sqrt(4 * math.prod(K(n)))  # fan_in = in / groups * prod(kernel)
    check_uniform(conv.weight, bound)
    check_uniform(conv.bias, bound, stats=False)
    # PyTorch's own initialisation has the same bounds.
    ref = TORCH_CONV[n](8, 96, K(n), groups=2)
    assert 0.8 * bound < float(ref.weight.detach().abs().max()) <= bound
    assert 0.5 * bound < float(ref.bias.detach().abs().max()) <= bound
    # The key decides the parameters.
    again = CONV[n](8, 96, K(n), groups=2, key=KEY)
    np.testing.assert_array_equal(np.asarray(again.weight), np.asarray(conv.weight))
    other = CONV[n](8, 96, K(n), groups=2, key=jax.random.key(1, impl="rbg"))
    assert not np.array_equal(np.asarray(other.weight), np.asarray(conv.weight))
    bare = CONV[n](8, 96, K(n), groups=2, bias=False, key=KEY)
    assert bare.bias is None and names(bare) == {"weight": (96, 4, *K(n))}


def check_uniform(x: Any, bound: float, stats: bool = True) -> None:
    x = np.asarray(x, np.float64).reshape(-1)
    assert np.all(np.abs(x) <= bound)
    assert np.abs(x).max() > 0.5 * bound
    assert len(np.unique(x)) > x.size // 2
    if stats:
        assert x.size >= 500
        assert x.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert abs(x.mean()) < 0.1 * bound


def test_conv2d_keeps_its_behaviour() -> None:
    """The refactored Conv2d: same fields, same parameters for the same key."""
    conv = Conv2d(8, 96, (4, 2), stride=(2, 1), padding=((1, 0), (0, 1)), groups=2, key=KEY)
    fields = [f.name for f in dataclasses.fields(conv)]
    assert fields == [
        "weight",
        "bias",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
    ]
    bound = 1 / math.sqrt(4 * 4 * 2)
    w = np.asarray(conv.weight)
    assert w.shape == (96, 4, 4, 2) and np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.9 * bound and abs(w.mean()) < 0.1 * bound  # U(-b, b)
    again = Conv2d(8, 96, (4, 2), stride=(2, 1), padding=((1, 0), (0, 1)), groups=2, key=KEY)
    np.testing.assert_array_equal(np.asarray(again.weight), w)  # same key, same parameters
    assert conv.padding == ((1, 0), (0, 1)) and conv.stride == (2, 1)
    assert Conv2d(8, 96, (4, 2), padding="same", groups=2, key=KEY).padding == "SAME"


# -- ConvTranspose ----------------------------------------------------------------------

T_SIZES = (4, 3, 5)

# name -> n -> (in, out, kernel, kwargs); torch gets the same kwargs, except that
# (low, high) pairs and "VALID" run as padding=0 and the output is cropped. The weights
# have the shapes of the Conv cases' (see there).
TCase = Callable[[int], tuple[int, int, Any, dict[str, Any]]]
T_CASES: dict[str, TCase] = {
    "defaults": lambda n: (96, 4, 3, {}),
    "stride-padding-output_padding": lambda n: (
        96,
        4,
        3,
        {"stride": 2, "padding": 1, "output_padding": 1},
    ),
    "tuples": lambda n: (
        96,
        4,
        K(n),
        {
            "stride": tup(n, 2, 3, 1),
            "padding": tup(n, 1, 0, 2),
            "output_padding": tup(n, 1, 2, 0),
            "dilation": tup(n, 1, 1, 2),
        },
    ),
    "dilation-output_padding": lambda n: (96, 4, 3, {"dilation": 2, "output_padding": 1}),
    "groups": lambda n: (96, 8, 3, {"groups": 2, "stride": 2, "padding": 2}),
    "depthwise-no-bias": lambda n: (4, 4, 3, {"groups": 4, "stride": 3, "bias": False}),
    "even-kernel-upsample": lambda n: (96, 4, K(n), {"stride": 2, "padding": 1}),
    "valid": lambda n: (96, 4, 3, {"padding": "valid", "stride": 2}),
    "pairs": lambda n: (96, 4, 3, {"padding": tup(n, (1, 0), (0, 2), (2, 1)), "stride": 2}),
}


def transpose_case(n: int, case: TCase, batch: tuple[int, ...]) -> tuple[Maker, np.ndarray, Any]:
    cin, cout, kernel, kwargs = case(n)
    x = rand_np((*batch, *T_SIZES[:n], cin), seed=n)
    crop = None
    torch_kwargs = dict(kwargs)
    if isinstance(kwargs.get("padding"), str):
        torch_kwargs["padding"] = 0
    elif isinstance(kwargs.get("padding"), tuple) and isinstance(kwargs["padding"][0], tuple):
        crop, torch_kwargs["padding"] = kwargs["padding"], 0

    def make(key: jax.Array) -> Any:
        return CONV_T[n](cin, cout, kernel, key=key, **kwargs)

    def reference(layer: Any) -> np.ndarray:
        ref = copy_to_torch(layer, TORCH_CONV_T[n](cin, cout, kernel, **torch_kwargs))
        want = from_torch(ref(to_torch(x, n)), batch)
        if crop is not None:
            for axis, (lo, hi) in zip(len(batch) + np.arange(n), crop):
                want = np.take(want, np.arange(lo, want.shape[axis] - hi), axis=axis)
        return want

    return make, x, reference


@pytest.mark.parametrize("n", DIMS)
def test_conv_transpose_matches_torch(n: int) -> None:
    cases = {name: transpose_case(n, case, (2,)) for name, case in T_CASES.items()}
    groups = T_CASES["groups"]
    for batch in EXTRA_BATCHES:
        padded = lambda n: (*groups(n)[:3], {**groups(n)[3], "output_padding": 1})
        cases[f"groups-output_padding, batch={batch}"] = transpose_case(n, padded, batch)
    check_cases(cases)


ADJOINT_CASES = [
    # n, kernel, stride, dilation, groups
    (1, 3, 2, 1, 1),
    (1, (4,), 2, 1, 2),
    (1, 3, 3, 1, 1),  # stride = kernel: nothing cropped
    (1, 3, 4, 1, 1),  # stride > kernel: a zero appended
    (1, 3, 6, 2, 2),  # stride > dilated kernel
    (2, 3, 1, 2, 1),
    (2, (4, 2), (2, 3), 1, 2),
    (3, 3, 2, 1, 1),
]


def test_conv_transpose_same_is_the_adjoint_of_conv_same() -> None:
    """padding="SAME": output `size * stride`, and exactly the transpose of a "SAME" Conv
    (itself checked against PyTorch) with the same weight."""
    makes, xs, ys = [], [], []
    for n, kernel, stride, dilation, groups in ADJOINT_CASES:
        kw = {"stride": stride, "dilation": dilation, "groups": groups, "bias": False}
        makes.append(
            lambda key, n=n, kernel=kernel, groups=groups, kw=kw: (
                CONV[n](4 * groups, 96, kernel, padding="SAME", key=key, **kw),
                CONV_T[n](96, 4 * groups, kernel, padding="same", key=key, **kw),
            )
        )
        strides = (stride,) * n if isinstance(stride, int) else stride
        small = (3, 2, 2)[:n]
        xs.append(jnp.asarray(rand_np((2, *(m * s for m, s in zip(small, strides)), 4 * groups))))
        ys.append(jnp.asarray(rand_np((2, *small, 96), seed=1)))
    pairs = [make(KEY) for make in makes]
    for conv, up in pairs:
        assert up.weight.shape == conv.weight.shape  # (96, 4, *kernel) both
    ups = [eqx.tree_at(lambda m: m.weight, up, conv.weight) for conv, up in pairs]
    convs = [conv for conv, _ in pairs]

    @jax.jit
    def run(convs: Any, ups: Any, xs: Any, ys: Any) -> Any:
        return [
            (c(x), jax.linear_transpose(c, x)(y)[0], u(y)) for c, u, x, y in zip(convs, ups, xs, ys)
        ]

    for case, x, y, (cx, adjoint, got) in zip(ADJOINT_CASES, xs, ys, run(convs, ups, xs, ys)):
        assert cx.shape == y.shape and got.shape == x.shape, case
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(adjoint), rtol=1e-5, atol=1e-5, err_msg=str(case)
        )


@pytest.mark.parametrize("n", DIMS)
def test_conv_transpose_names_shapes_and_init(n: int) -> None:
    up = CONV_T[n](96, 8, K(n), groups=2, stride=2, key=KEY)
    assert names(up) == {"weight": (96, 4, *K(n)), "bias": (8,)}
    assert up.output_padding == (0,) * n and up.stride == (2,) * n and up.groups == 2
    # PyTorch's fan_in for transposed convs: weight.size(1) * prod(kernel) (out / groups,
    # not in / groups).
    bound = 1 / math.sqrt(4 * math.prod(K(n)))
    check_uniform(up.weight, bound)
    check_uniform(up.bias, bound, stats=False)
    ref = TORCH_CONV_T[n](96, 8, K(n), groups=2, stride=2)
    assert 0.8 * bound < float(ref.weight.detach().abs().max()) <= bound
    bare = CONV_T[n](96, 8, K(n), groups=2, bias=False, key=KEY)
    assert bare.bias is None and names(bare) == {"weight": (96, 4, *K(n))}


def test_gradients_match_torch() -> None:
    """Gradients through the transposed layout, w.r.t. the parameters and the input."""
    layer = ConvTranspose2d(96, 8, (4, 2), stride=(2, 1), padding=1, groups=2, key=KEY)
    ref = copy_to_torch(layer, torch.nn.ConvTranspose2d(96, 8, (4, 2), (2, 1), 1, groups=2))
    x = rand_np((2, 3, 2, 96))
    r = rand_np((2, 6, 1, 8), seed=3)

    def loss(m: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(m(x) * r)

    gm, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, jnp.asarray(x))
    xt = to_torch(x, 2).requires_grad_(True)
    (ref(xt) * to_torch(r, 2)).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(np.asarray(gm.weight), ref.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(gm.bias), ref.bias.grad.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(gx), from_torch(xt.grad, (2,)), **tol)


def test_dtype_argument() -> None:
    conv = Conv1d(8, 96, 4, groups=2, dtype=jnp.bfloat16, key=KEY)
    up = ConvTranspose1d(96, 8, 4, stride=2, groups=2, dtype=jnp.bfloat16, key=KEY)
    assert conv.weight.dtype == jnp.bfloat16 and conv.bias.dtype == jnp.bfloat16
    assert up.weight.dtype == jnp.bfloat16 and up.bias.dtype == jnp.bfloat16

    @jax.jit
    def run(conv: Any, up: Any, x: jax.Array) -> Any:
        y = conv(x)
        return y, up(y)

    y, z = run(conv, up, jnp.ones((2, 5, 8), jnp.bfloat16))
    assert y.shape == (2, 2, 96) and y.dtype == jnp.bfloat16
    assert z.shape == (2, 6, 8) and z.dtype == jnp.bfloat16


# -- calling convention and errors ----------------------------------------------------------


@pytest.mark.parametrize("n", DIMS)
def test_calling_convention(n: int) -> None:
    for cls, cin, cout in ((CONV[n], 8, 96), (CONV_T[n], 96, 8)):
        layer = cls(cin, cout, K(n), padding="same", groups=2, key=KEY)
        params = inspect.signature(layer).parameters
        assert list(params) == ["x", "key"], cls
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["key"].default is None
        x = jnp.ones((1, *(2,) * n, cin))
        assert jax.eval_shape(lambda x: layer(x, key=KEY), x).shape == (1, *(2,) * n, cout)
        with pytest.raises(TypeError):
            layer(x, KEY)
        with pytest.raises(TypeError):
            cls(cin, cout, 3, 1, key=KEY)  # stride is keyword-only
        with pytest.raises(TypeError):
            cls(cin, cout, 3, KEY)  # so is the key
        ctor = inspect.signature(cls).parameters
        positional = [p for p in ctor if ctor[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == ["in_channels", "out_channels", "kernel_size"]
        assert ctor["key"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(
    "cls, cin, cout, spatial, names_",
    [
        (Conv1d, 8, 96, (5,), "length"),
        (Conv3d, 8, 96, (3, 3, 3), "depth, height, width"),
        (ConvTranspose1d, 96, 8, (5,), "length"),
        (ConvTranspose2d, 96, 8, (3, 3), "height, width"),
        (ConvTranspose3d, 96, 8, (3, 3, 3), "depth, height, width"),
    ],
)
def test_wrong_input_shapes(
    cls: Any, cin: int, cout: int, spatial: tuple[int, ...], names_: str
) -> None:
    layer = cls(cin, cout, K(cls.num_spatial_dims), groups=2, key=KEY)
    name = cls.__name__
    shape = (2, *spatial, 2)
    with pytest.raises(
        ValueError,
        match=rf"nn\.{name}\({cin}, {cout}\) expects input of shape \(\*batch, {names_}, "
        rf"{cin}\), got shape {re.escape(str(shape))}",
    ):
        layer(jnp.ones(shape))
    # Too few axes: the layer's check or the runtime type checker, either naming the layer
    # and the expected layout.
    with pytest.raises(
        (ValueError, TypeCheckError),
        match=rf"(?s){name}.*{names_.split(', ')[-1]}.*in_channels",
    ):
        layer(jnp.ones((*spatial[1:], cin)))


def test_input_too_small() -> None:
    with pytest.raises(
        ValueError, match=r"nn\.Conv2d\(8, 96\): input of shape \(1, 2, 5, 8\) is too small"
    ):
        Conv2d(8, 96, (4, 2), groups=2, key=KEY)(jnp.ones((1, 2, 5, 8)))
    with pytest.raises(ValueError, match=r"nn\.ConvTranspose1d\(96, 8\): input.*too small"):
        ConvTranspose1d(96, 8, 4, padding=3, groups=2, key=KEY)(jnp.ones((1, 1, 96)))


@pytest.mark.parametrize("cls", [Conv1d, Conv3d, ConvTranspose2d])
def test_constructor_errors(cls: Any) -> None:
    name = rf"nn\.{cls.__name__}"
    n = cls.num_spatial_dims
    with pytest.raises(ValueError, match=rf"{name}\(4, 6, groups=4\).*divisible by groups"):
        cls(4, 6, 3, groups=4, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}\(4, 5, groups=2\).*divisible by groups"):
        cls(4, 5, 3, groups=2, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}\(4, 4, groups=0\)"):
        cls(4, 4, 3, groups=0, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: in_channels=0.*positive"):
        cls(0, 4, 3, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: padding='FULL'"):
        cls(3, 4, 3, padding="FULL", key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: padding=-1.*non-negative"):
        cls(3, 4, 3, padding=-1, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: padding=.*{n} non-negative ints"):
        cls(3, 4, 3, padding=(1,) * (n + 1), key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: stride=0"):
        cls(3, 4, 3, stride=0, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: dilation=0"):
        cls(3, 4, 3, dilation=0, key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: kernel_size=\(3, 3, 3, 3\).*{n} positive"):
        cls(3, 4, (3, 3, 3, 3), key=KEY)
    with pytest.raises(ValueError, match=rf"{name}: kernel_size=0"):
        cls(3, 4, 0, key=KEY)


def test_output_padding_errors() -> None:
    with pytest.raises(ValueError, match=r"nn\.ConvTranspose2d: output_padding=2.*smaller than"):
        ConvTranspose2d(3, 4, 3, stride=2, output_padding=2, key=KEY)
    with pytest.raises(ValueError, match=r"nn\.ConvTranspose1d: output_padding=1.*smaller than"):
        ConvTranspose1d(3, 4, 3, output_padding=1, key=KEY)
    with pytest.raises(ValueError, match=r"nn\.ConvTranspose3d: output_padding=-1.*non-negative"):
        ConvTranspose3d(3, 4, 3, output_padding=-1, key=KEY)
    with pytest.raises(ValueError, match=r"output_padding=1 cannot be used with padding='SAME'"):
        ConvTranspose1d(3, 4, 3, stride=2, padding="same", output_padding=1, key=KEY)


# -- Conv2d against a direct NumPy loop ------------------------------------------------


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


# -- Conv2d ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_conv_shapes_channels_last(key: jax.Array, batch: tuple[int, ...]) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, key=key)
    x = rand((*batch, 6, 7, 3))
    y = conv(x)
    assert y.shape == (*batch, 6, 7, 5)
    flat = x.reshape((-1, 6, 7, 3))
    want = conv_ref(flat, conv.weight, conv.bias, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    np.testing.assert_allclose(np64(y).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


NUMPY_CONV_CASES = [
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


@pytest.mark.parametrize("cin, cout, kernel, kwargs, stride, pads, dil, groups", NUMPY_CONV_CASES)
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
    x = rand((2, 7, 6, cin))
    want = conv_ref(x, conv.weight, conv.bias, stride, pads, dil, groups)
    got = conv(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np64(got), want, rtol=1e-5, atol=1e-5)


def test_conv_names_and_init(key: jax.Array) -> None:
    conv = nn.Conv2d(8, 16, (3, 2), groups=2, key=key)
    assert names(conv) == {"weight": (16, 4, 3, 2), "bias": (16,)}
    bound = 1 / math.sqrt(4 * 3 * 2)  # fan_in = in_channels / groups * kh * kw
    check_uniform_init(conv.weight, bound)
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
