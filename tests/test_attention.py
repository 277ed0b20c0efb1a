"""Multi-head attention: `MultiheadAttention` against `torch.nn.MultiheadAttention
(batch_first=True)` with copied weights, `Attention` against a hand-written copy of timm's
ViT attention; masks, dropout and modes, the fused and explicit paths, clear errors."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import is_array, named, rand
from jaxtyping import TypeCheckError

import treenn
from treenn.nn import (
    Attention,
    Dropout,
    Linear,
    MultiheadAttention,
    Sequential,
    eval_mode,
    modes,
    train_mode,
)

E, HEADS = 8, 2


def randomized(model: Any, seed: int = 0) -> Any:
    """`model` with every array redrawn (nonzero biases: the zero init hides nothing)."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    rng = np.random.default_rng(seed)
    new = [
        jnp.asarray(rng.standard_normal(x.shape) * 0.5, x.dtype) if is_array(x) else x
        for x in leaves  # modes (bool leaves) stay
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def tt(x: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(x))


def unchecked(layer: Any) -> Callable[..., Any]:
    """The layer's `__call__` without the test suite's runtime type checker, to see the
    errors a user gets (the checker, when on, may reject a bad shape first)."""
    return functools.partial(inspect.unwrap(type(layer).__call__), layer)


def torch_mha(m: MultiheadAttention) -> torch.nn.MultiheadAttention:
    """A PyTorch layer holding `m`'s parameters, loaded by name (strict)."""
    t = torch.nn.MultiheadAttention(
        m.embed_dim,
        m.num_heads,
        dropout=m.dropout,
        bias=m.in_proj_bias is not None,
        kdim=m.kdim,
        vdim=m.vdim,
        batch_first=True,
    )
    t.load_state_dict({k: tt(v) for k, v in named(m).items()}, strict=True)
    return t.eval()


def flat(x: Any, keep: int) -> torch.Tensor | None:
    """`x` as a tensor with its leading axes folded into one batch axis."""
    if x is None:
        return None
    x = np.asarray(x)
    return torch.tensor(x.reshape((-1, *x.shape[x.ndim - keep :])))


# -- names and initialisation -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"kdim": 6, "vdim": 4}, {"kdim": 6}, {"kdim": 6, "bias": False}],
)
def test_mha_names_match_pytorch(key: jax.Array, kwargs: dict[str, Any]) -> None:
    m = MultiheadAttention(E, HEADS, key=key, **kwargs)
    t = torch.nn.MultiheadAttention(E, HEADS, batch_first=True, **kwargs)
    ours = {k: tuple(v.shape) for k, v in named(m).items()}
    theirs = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    assert ours == theirs
    assert list(ours) == list(theirs)  # same order too
    assert all(v.dtype == jnp.float32 for v in named(m).values())


def _uniform_within(x: Any, bound: float, other: float) -> None:
    """Drawn from U(-bound, bound), not from U(-other, other): every value within `bound`,
    the largest close to it (and beyond `other` when that is smaller), the spread of a
    uniform. A larger `other` is excluded by the first check."""
    x = np.asarray(x, np.float64).reshape(-1)
    assert np.all(np.abs(x) <= bound) and np.abs(x).max() > 0.8 * bound
    if other < bound:
        assert np.abs(x).max() > other
    assert x.std() == pytest.approx(bound / math.sqrt(3), rel=0.25)


def test_mha_init_is_pytorchs(key: jax.Array) -> None:
    """PyTorch's `_reset_parameters`: xavier_uniform on the (3E, E) in-projection as one
    matrix (not per chunk, not nn.Linear's U(±1/sqrt(E))), zero biases; out_proj weight
    nn.Linear's default. The test's usual sizes keep it cheap (no new compilations)."""
    m = MultiheadAttention(E, HEADS, key=key)
    xavier = math.sqrt(6 / (E + 3 * E))
    _uniform_within(m.in_proj_weight, xavier, other=1 / math.sqrt(E))
    assert np.abs(np.asarray(m.in_proj_weight)).max() < math.sqrt(6 / (2 * E))  # not per chunk
    _uniform_within(m.out_proj.weight, 1 / math.sqrt(E), other=xavier)
    assert m.in_proj_bias is not None and m.out_proj.bias is not None
    np.testing.assert_array_equal(np.asarray(m.in_proj_bias), 0.0)
    np.testing.assert_array_equal(np.asarray(m.out_proj.bias), 0.0)
    split = MultiheadAttention(E, HEADS, kdim=6, vdim=4, key=key)
    _uniform_within(split.q_proj_weight, math.sqrt(6 / (E + E)), other=1 / math.sqrt(E))
    _uniform_within(split.k_proj_weight, math.sqrt(6 / (E + 6)), other=1 / math.sqrt(6))
    _uniform_within(split.v_proj_weight, math.sqrt(6 / (E + 4)), other=1 / math.sqrt(4))
    assert split.in_proj_weight is None
    np.testing.assert_array_equal(np.asarray(split.in_proj_bias), 0.0)
    # Deterministic in the key, different across keys and across the three projections.
    again = MultiheadAttention(E, HEADS, key=key)
    np.testing.assert_array_equal(np.asarray(again.in_proj_weight), np.asarray(m.in_proj_weight))
    other = MultiheadAttention(E, HEADS, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(other.in_proj_weight), np.asarray(m.in_proj_weight))
    qw, kw, vw = np.split(np.asarray(m.in_proj_weight), 3)
    assert not np.allclose(qw, kw) and not np.allclose(kw, vw)


def test_mha_attributes(key: jax.Array) -> None:
    m = MultiheadAttention(E, HEADS, dropout=0.25, kdim=6, key=key)
    assert (m.embed_dim, m.num_heads, m.head_dim, m.kdim, m.vdim) == (8, 2, 4, 6, 8)
    assert m.dropout == 0.25 and isinstance(m.attn_drop, Dropout) and m.attn_drop.p == 0.25
    assert isinstance(m.out_proj, Linear)
    params = inspect.signature(m).parameters
    assert list(params)[:3] == ["query", "kv", "value"]
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY and params["key"].default is None


# -- numerics against PyTorch ---------------------------------------------------------------


L, S = 3, 5


def _inputs(case: str, batch: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor kwargs, call kwargs) of a comparison case."""
    q = rand((*batch, L, E), 1)
    kv = rand((*batch, S, E), 2)
    kpm = np.zeros((*batch, S), bool)
    kpm[..., 1] = True
    kpm[..., -1] = True
    bool_mask = np.zeros((L, S), bool)
    bool_mask[0, 2:] = True
    bool_mask[2, 0] = True
    float_mask = np.array(rand((L, S), 3))
    float_mask[1, 3] = -np.inf
    cases: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "self": ({}, {"query": q}),
        "cross": ({}, {"query": q, "kv": kv}),
        "cross-separate-value": ({}, {"query": q, "kv": kv, "value": rand((*batch, S, E), 4)}),
        "kdim-vdim": (
            {"kdim": 6, "vdim": 4},
            {"query": q, "kv": rand((*batch, S, 6), 5), "value": rand((*batch, S, 4), 6)},
        ),
        "no-bias": ({"bias": False}, {"query": q, "kv": kv}),
        "key-padding-mask": ({}, {"query": q, "kv": kv, "key_padding_mask": jnp.asarray(kpm)}),
        "bool-attn-mask": ({}, {"query": q, "kv": kv, "attn_mask": jnp.asarray(bool_mask)}),
        "float-attn-mask": ({}, {"query": q, "kv": kv, "attn_mask": jnp.asarray(float_mask)}),
        "both-masks": (
            {},
            {
                "query": q,
                "kv": kv,
                "key_padding_mask": jnp.asarray(kpm),
                "attn_mask": jnp.asarray(float_mask),
            },
        ),
        "causal-self": ({}, {"query": q, "is_causal": True}),
        "causal-cross-padded": (
            {},
            {"query": q, "kv": kv, "is_causal": True, "key_padding_mask": jnp.asarray(kpm)},
        ),
    }
    return cases[case]


def _torch_call(t: torch.nn.MultiheadAttention, call: dict[str, Any], **extra: Any) -> Any:
    q = call["query"]
    kv = call.get("kv", q)
    value = call.get("value", kv)
    attn_mask = call.get("attn_mask")
    attn_mask = None if attn_mask is None else tt(attn_mask)
    is_causal = call.get("is_causal", False)
    if is_causal:
        # PyTorch's is_causal is a hint that needs the (top-left) causal mask itself.
        causal = torch.ones(q.shape[-2], kv.shape[-2], dtype=torch.bool).triu(1)
        assert attn_mask is None
        attn_mask = causal
    kpm = flat(call.get("key_padding_mask"), 1)
    if kpm is not None and attn_mask is not None and attn_mask.is_floating_point():
        # What PyTorch does itself, without its warning about mixed mask types.
        kpm = torch.zeros(kpm.shape).masked_fill(kpm, -math.inf)
    with torch.no_grad():
        return t(
            flat(q, 2),
            flat(kv, 2),
            flat(value, 2),
            key_padding_mask=kpm,
            attn_mask=attn_mask,
            is_causal=is_causal,
            **extra,
        )


CASES = [
    "self",
    "cross",
    "cross-separate-value",
    "kdim-vdim",
    "no-bias",
    "key-padding-mask",
    "bool-attn-mask",
    "float-attn-mask",
    "both-masks",
    "causal-self",
    "causal-cross-padded",
]


# Every case with one batch axis; no batch axis and two batch axes on the case with every
# per-batch input (query, key input, key padding mask): fewer shapes, a faster suite.
PAIRS = [(case, (2,)) for case in CASES] + [("both-masks", ()), ("both-masks", (2, 3))]


@pytest.mark.parametrize(("case", "batch"), PAIRS, ids=[f"{c}-{b}" for c, b in PAIRS])
def test_mha_matches_pytorch(key: jax.Array, case: str, batch: tuple[int, ...]) -> None:
    ctor, call = _inputs(case, batch)
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key, **ctor)))
    t = torch_mha(m)
    want, want_w = _torch_call(t, call, need_weights=True)
    want_nw, _ = _torch_call(t, call, need_weights=False)
    length, source = L, call.get("kv", call["query"]).shape[-2]

    # Eager with one batch axis (the shapes most tests share: their operations are
    # compiled once); compiled as one program for the other batch shapes.
    y, (y2, w) = (_both_paths if batch == (2,) else _both_paths_jit)(m, call)
    assert y.shape == y2.shape == (*batch, L, E) and y.dtype == jnp.float32
    assert w.shape == (*batch, length, source)
    for got in (y, y2):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want_nw, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w).reshape(want_w.shape), want_w, rtol=1e-5, atol=1e-6)


def _both_paths(m: MultiheadAttention, call: dict[str, Any]) -> Any:
    """The fused path (no weights) and the explicit one (weights requested)."""
    return m(**call), m(**call, need_weights=True)


_both_paths_jit = eqx.filter_jit(_both_paths)


def test_mha_per_head_weights(key: jax.Array) -> None:
    ctor, call = _inputs("both-masks", (2,))
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key, **ctor)))
    _, want = _torch_call(torch_mha(m), call, need_weights=True, average_attn_weights=False)
    _, w = m(**call, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, HEADS, L, S)
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
    _, avg = m(**call, need_weights=True)
    np.testing.assert_allclose(np.asarray(avg), np.asarray(w).mean(1), rtol=1e-6)


def test_mha_positional_and_keyword_inputs(key: jax.Array) -> None:
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key)))
    q, kv, v = rand((2, L, E), 1), rand((2, S, E), 2), rand((2, S, E), 3)
    a = np.asarray(m(q, kv, v))
    np.testing.assert_array_equal(np.asarray(m(query=q, kv=kv, value=v)), a)
    # value defaults to kv; kv defaults to query.
    np.testing.assert_array_equal(np.asarray(m(q, kv)), np.asarray(m(q, kv, kv)))
    np.testing.assert_allclose(np.asarray(m(q)), np.asarray(m(q, q, q)), rtol=1e-6, atol=1e-6)


def test_mha_is_causal_combines_with_attn_mask(key: jax.Array) -> None:
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key)))
    q = rand((2, L, E), 1)
    extra = np.zeros((L, L), bool)
    extra[2, 1] = True
    causal = np.triu(np.ones((L, L), bool), 1)
    both = m(q, attn_mask=jnp.asarray(extra), is_causal=True)
    want = m(q, attn_mask=jnp.asarray(extra | causal))
    np.testing.assert_allclose(np.asarray(both), np.asarray(want), rtol=1e-6, atol=1e-6)
    _, w = m(q, attn_mask=jnp.asarray(extra), is_causal=True, need_weights=True)
    assert np.all(np.asarray(w)[:, extra | causal] == 0)


# -- fully masked rows -------------------------------------------------------------------------


def test_mha_fully_masked_rows_give_zero_attention(key: jax.Array) -> None:
    """A query with no key to attend to gets zero weights and output `out_proj.bias`,
    as PyTorch's scaled_dot_product_attention path; never NaN, nor NaN gradients."""
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key)))
    q, kv = rand((2, L, E), 1), rand((2, S, E), 2)
    kpm = np.zeros((2, S), bool)
    kpm[1] = True  # batch element 1: every key ignored
    mask = np.zeros((L, S), bool)
    mask[0] = True  # query 0: may attend to nothing
    fmask = np.zeros((L, S), np.float32)
    fmask[0] = -np.inf
    bias = np.asarray(m.out_proj.bias)
    # PyTorch, training mode (p=0): its SDPA path, which zeroes such rows.
    t = torch_mha(m).train()
    for kwargs, dead in [
        ({"key_padding_mask": jnp.asarray(kpm)}, (1, slice(None))),
        ({"attn_mask": jnp.asarray(mask)}, (slice(None), 0)),
        ({"attn_mask": jnp.asarray(fmask)}, (slice(None), 0)),
    ]:
        want, _ = _torch_call(t, {"query": q, "kv": kv, **kwargs}, need_weights=False)
        y = np.asarray(m(q, kv, **kwargs))
        y2, w = m(q, kv, **kwargs, need_weights=True)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y2), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[dead], np.broadcast_to(bias, y[dead].shape), rtol=1e-6)
        assert np.all(np.asarray(w)[dead] == 0)
        assert np.isfinite(np.asarray(w)).all()

    # Gradients stay finite on both paths, with both kinds of fully masked rows.
    masks = {"key_padding_mask": jnp.asarray(kpm), "attn_mask": jnp.asarray(fmask)}

    @eqx.filter_jit
    def grads(model: MultiheadAttention) -> tuple[Any, Any]:
        fused = treenn.grad(lambda mdl: jnp.sum(mdl(q, kv, **masks)))(model)
        explicit = treenn.grad(lambda mdl: jnp.sum(mdl(q, kv, **masks, need_weights=True)[0]))(
            model
        )
        return fused, explicit

    fused, explicit = grads(m)
    for g, h in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(explicit)):
        assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(h)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5)


# -- the two paths ---------------------------------------------------------------------------


def test_fused_path_is_used_only_without_dropout_and_weights(
    key: jax.Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    fused = jax.nn.dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counting)

    def trace(layer: Any, *args: Any, **kwargs: Any) -> None:
        # Abstract evaluation: traces the call (no compilation), counting the calls.
        eqx.filter_eval_shape(lambda lyr: lyr(*args, **kwargs), layer)

    m = randomized(MultiheadAttention(E, HEADS, dropout=0.5, key=key))
    q = rand((2, L, E), 1)
    ev = eval_mode(m)
    trace(ev, q)
    assert len(calls) == 1  # eval mode: fused
    trace(ev, q, need_weights=True)
    assert len(calls) == 1  # weights requested: explicit
    trace(m, q, key=key)
    assert len(calls) == 1  # dropout active: explicit
    trace(MultiheadAttention(E, HEADS, key=key), q)
    assert len(calls) == 2  # p == 0 in training mode: fused
    a = randomized(Attention(E, HEADS, attn_drop=0.5, key=key))
    trace(eval_mode(a), q)
    assert len(calls) == 3
    trace(a, q, key=key)
    assert len(calls) == 3


def test_fused_and_explicit_paths_agree(key: jax.Array) -> None:
    """Same inputs through `jax.nn.dot_product_attention` and through the explicit
    softmax (selected by `need_weights=True`)."""
    m = eval_mode(randomized(MultiheadAttention(E, HEADS, key=key)))
    ctor, call = _inputs("both-masks", (2,))
    for kwargs in (
        call,
        {"query": call["query"], "is_causal": True},
        {"query": call["query"], "kv": call["kv"], "is_causal": True},
    ):
        fused = np.asarray(m(**kwargs))
        explicit, _ = m(**kwargs, need_weights=True)
        np.testing.assert_allclose(np.asarray(explicit), fused, rtol=1e-6, atol=1e-6)


def test_paths_agree_in_bfloat16(key: jax.Array) -> None:
    # The dtype argument, checked abstractly (drawing bfloat16 numbers compiles slowly).
    shapes = eqx.filter_eval_shape(MultiheadAttention, E, HEADS, dtype=jnp.bfloat16, key=key)
    assert {v.dtype for v in named(shapes).values()} == {jnp.dtype(jnp.bfloat16)}
    m = MultiheadAttention(E, HEADS, key=key)
    m = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if is_array(x) else x, m)
    m = eval_mode(randomized(m))
    q = rand((2, L, E), 1).astype(jnp.bfloat16)
    mask = jnp.asarray(np.triu(np.ones((L, L), np.float32), 1) * -1.5)
    y, (y2, w) = _both_paths_jit(m, {"query": q, "attn_mask": mask})
    assert y.dtype == y2.dtype == w.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(y2, np.float32), rtol=2e-2, atol=2e-2
    )


def test_mha_under_jit_and_grad(key: jax.Array) -> None:
    m = randomized(MultiheadAttention(E, HEADS, key=key))
    q, kv = rand((2, L, E), 1), rand((2, S, E), 2)

    def loss(model: MultiheadAttention, q: jax.Array, kv: jax.Array) -> Any:
        fused = model(q, kv)
        explicit, _ = model(q, kv, need_weights=True)
        return jnp.mean(fused**2) + jnp.mean(explicit**2)

    value, grads = treenn.jit(treenn.value_and_grad(loss))(m, q, kv)
    assert set(named(grads)) == set(named(m))
    assert all(np.isfinite(np.asarray(g)).all() for g in named(grads).values())
    want = 2 * jnp.mean(m(q, kv) ** 2)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)


# -- dropout and modes -----------------------------------------------------------------------


def test_mha_dropout(key: jax.Array) -> None:
    m = randomized(MultiheadAttention(E, HEADS, dropout=0.5, key=key))
    plain = eqx.tree_at(lambda x: x.attn_drop, m, Dropout(0.0))
    q = rand((2, L, E), 1)
    ev = eval_mode(m)
    assert ev.attn_drop.inference and not m.attn_drop.inference
    # Evaluation mode is the p=0 layer, with or without a key.
    np.testing.assert_array_equal(np.asarray(ev(q)), np.asarray(plain(q)))
    np.testing.assert_array_equal(np.asarray(ev(q, key=key)), np.asarray(plain(q)))
    # Training mode: random, deterministic in the key.
    a, b = np.asarray(m(q, key=key)), np.asarray(m(q, key=jax.random.key(7)))
    assert not np.allclose(a, np.asarray(plain(q)))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(np.asarray(m(q, key=key)), a)
    # The returned weights are the dropped-out ones (as PyTorch): 0 or 2x the eval ones.
    _, w = m(q, need_weights=True, average_attn_weights=False, key=key)
    _, w0 = ev(q, need_weights=True, average_attn_weights=False)
    w, w0 = np.asarray(w), np.asarray(w0)
    dropped = w == 0
    assert 0 < dropped.mean() < 1
    np.testing.assert_allclose(w[~dropped], 2 * w0[~dropped], rtol=1e-6)
    # Training mode with p > 0 needs a key.
    with pytest.raises(ValueError, match=r"nn\.MultiheadAttention\(8, 2\).*attn_drop.*key="):
        m(q)
    # p == 0 needs none.
    MultiheadAttention(E, HEADS, key=key)(q)


def test_attention_dropouts(key: jax.Array) -> None:
    a = randomized(Attention(E, HEADS, attn_drop=0.3, proj_drop=0.3, key=key))
    x = rand((2, L, E), 1)
    ev = eval_mode(a)
    plain = eqx.tree_at(lambda m: (m.attn_drop, m.proj_drop), a, (Dropout(0.0), Dropout(0.0)))
    np.testing.assert_array_equal(np.asarray(ev(x)), np.asarray(plain(x)))
    y = np.asarray(a(x, key=key))
    assert not np.allclose(y, np.asarray(plain(x)))
    np.testing.assert_array_equal(np.asarray(a(x, key=key)), y)
    with pytest.raises(ValueError, match=r"nn\.Attention\(8, num_heads=2\).*attn_drop.*key="):
        a(x)
    only_proj = eval_mode(a, "attn_drop")
    with pytest.raises(ValueError, match=r"nn\.Attention\(8, num_heads=2\).*proj_drop.*key="):
        only_proj(x)
    # Only the output dropout is active: the output is the eval one, masked and rescaled.
    z = np.asarray(only_proj(x, key=key))
    full = np.asarray(ev(x))
    kept = z != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(z[kept], full[kept] / 0.7, rtol=1e-5)


class Block(treenn.Module):
    """A ViT block's attention half, to check the paths a ViT would have."""

    norm1: Any
    attn: Attention

    def __init__(self, *, key: jax.Array):
        self.norm1 = Linear(E, E, key=key)
        self.attn = Attention(E, HEADS, attn_drop=0.1, proj_drop=0.1, key=key)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return x + self.attn(self.norm1(x), key=key)


class ViT(treenn.Module):
    blocks: list[Block]
    pool: MultiheadAttention

    def __init__(self, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.blocks = [Block(key=k1), Block(key=k2)]
        self.pool = MultiheadAttention(E, HEADS, dropout=0.1, key=k3)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        for block, k in zip(self.blocks, keys):
            x = block(x, key=k)
        return self.pool(x, key=keys[2])


def test_modes_see_the_dropouts(key: jax.Array) -> None:
    vit = ViT(key=key)
    assert modes(vit) == {
        "blocks.0.attn.attn_drop": False,
        "blocks.0.attn.proj_drop": False,
        "blocks.1.attn.attn_drop": False,
        "blocks.1.attn.proj_drop": False,
        "pool.attn_drop": False,
    }
    assert "blocks.0.attn.qkv.weight" in named(vit)
    assert "blocks.1.attn.proj.bias" in named(vit)
    assert "pool.in_proj_weight" in named(vit) and "pool.out_proj.weight" in named(vit)
    x = rand((2, L, E), 1)
    with pytest.raises(ValueError, match=r"key="):
        vit(x)
    ev = eval_mode(vit)
    assert all(modes(ev).values()) and not any(modes(vit).values())
    y = np.asarray(ev(x))
    assert y.shape == (2, L, E)
    # Selectors reach the attention dropouts by path.
    only = eval_mode(vit, "**.attn_drop")
    assert {p for p, v in modes(only).items() if v} == {
        "blocks.0.attn.attn_drop",
        "blocks.1.attn.attn_drop",
        "pool.attn_drop",
    }
    pinned = eval_mode(vit, "pool", pin=True)
    assert modes(train_mode(pinned))["pool.attn_drop"] is True


def test_mha_with_treenn_helpers(key: jax.Array) -> None:
    """Freezing by path, the trainable partition and the summary see PyTorch's names."""
    m = MultiheadAttention(E, HEADS, dropout=0.1, key=key)
    frozen = treenn.freeze(m, "in_proj_*")
    assert set(named(treenn.trainable(frozen))) == {"out_proj.weight", "out_proj.bias"}
    q = rand((2, L, E), 1)
    np.testing.assert_array_equal(np.asarray(eval_mode(frozen)(q)), np.asarray(eval_mode(m)(q)))
    table = treenn.summary(frozen)
    for path in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "attn_drop"):
        assert path in table


def test_mha_in_sequential(key: jax.Array) -> None:
    """`key=` is the PRNG key, so the layer composes with nn.Sequential."""
    k1, k2 = jax.random.split(key)
    seq = Sequential(Linear(4, E, key=k1), MultiheadAttention(E, HEADS, dropout=0.5, key=k2))
    x = rand((2, L, 4), 1)
    assert modes(seq) == {"layers.1.attn_drop": False}
    y = seq(x, key=key)
    assert y.shape == (2, L, E)
    np.testing.assert_array_equal(np.asarray(seq(x, key=key)), np.asarray(y))
    assert eval_mode(seq)(x).shape == (2, L, E)


# -- timm's Attention --------------------------------------------------------------------------


class TimmAttention(torch.nn.Module):
    """timm's `vision_transformer.Attention` (qk_norm off), written out by hand."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = torch.nn.Dropout(0.0)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


@pytest.mark.parametrize(
    ("batch", "qkv_bias"), [((), True), ((2,), True), ((2, 3), True), ((2,), False)], ids=str
)
def test_attention_matches_timm(key: jax.Array, batch: tuple[int, ...], qkv_bias: bool) -> None:
    a = randomized(Attention(E, HEADS, qkv_bias=qkv_bias, key=key))
    ref = TimmAttention(E, HEADS, qkv_bias).eval()
    ref.load_state_dict({k: tt(v) for k, v in named(a).items()}, strict=True)
    x = rand((*batch, L, E), 1)
    with torch.no_grad():
        want = ref(flat(x, 2)).numpy()
    y = a(x) if batch == (2,) else eqx.filter_jit(a.__call__)(x)  # see test_mha_matches_pytorch
    assert y.shape == (*batch, L, E)
    np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_attention_names_and_defaults(key: jax.Array) -> None:
    a = Attention(E, key=jax.random.key(0)) if E % 8 == 0 else None
    assert a is not None and a.num_heads == 8 and a.head_dim == 1
    a = Attention(E, HEADS, qkv_bias=False, key=key)
    assert {k: tuple(v.shape) for k, v in named(a).items()} == {
        "qkv.weight": (3 * E, E),
        "proj.weight": (E, E),
        "proj.bias": (E,),
    }
    assert isinstance(a.qkv, Linear) and isinstance(a.proj, Linear)
    assert isinstance(a.attn_drop, Dropout) and isinstance(a.proj_drop, Dropout)
    params = inspect.signature(a).parameters
    assert list(params) == ["x", "key"]
    assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY


# -- errors --------------------------------------------------------------------------------------


def test_constructor_errors(key: jax.Array) -> None:
    with pytest.raises(ValueError, match=r"embed_dim=10 must be divisible by num_heads=4"):
        MultiheadAttention(10, 4, key=key)
    with pytest.raises(ValueError, match=r"MultiheadAttention\(8, 0\).*>= 1"):
        MultiheadAttention(8, 0, key=key)
    with pytest.raises(ValueError, match=r"MultiheadAttention\(8, 2\).*dropout=1.5.*\[0, 1\]"):
        MultiheadAttention(8, 2, dropout=1.5, key=key)
    with pytest.raises(ValueError, match=r"nn\.Attention\(10, num_heads=4\).*dim=10.*num_heads=4"):
        Attention(10, 4, key=key)
    with pytest.raises(ValueError, match=r"nn\.Attention.*proj_drop=-0.1.*\[0, 1\]"):
        Attention(8, 2, proj_drop=-0.1, key=key)


def _both(layer: Any, regex: str, *args: Any, **kwargs: Any) -> None:
    """The clear ValueError without the runtime checker; with it, either that or the
    checker's TypeCheckError (both name the layer and the offending argument)."""
    with pytest.raises(ValueError, match=regex):
        unchecked(layer)(*args, **kwargs)
    with pytest.raises((ValueError, TypeCheckError)):
        layer(*args, **kwargs)


def test_mha_call_errors(key: jax.Array) -> None:
    m = MultiheadAttention(E, HEADS, key=key)
    q, kv = rand((2, L, E)), rand((2, S, E))
    name = r"nn\.MultiheadAttention\(8, 2\)"
    _both(m, name + r" expects query of shape \(\*batch, L, embed_dim\) = \(\*batch, L, 8\), "
          r"got shape \(2, 3, 6\)", rand((2, L, 6)))  # fmt: skip
    _both(m, name + r" expects query.*got shape \(8,\)", rand((E,)))
    _both(m, name + r" expects the key input of shape \(\*batch, S, kdim\) = \(2, S, 8\).*"
          r"got shape \(3, 5, 8\)", q, rand((3, S, E)))  # fmt: skip
    _both(m, name + r" expects the key input.*got shape \(2, 5, 6\)", q, rand((2, S, 6)))
    _both(m, name + r" expects value of shape \(\*batch, S, vdim\) = \(2, 5, 8\).*"
          r"got shape \(2, 4, 8\)", q, kv, rand((2, 4, E)))  # fmt: skip
    _both(m, name + r": `value` given without the key input `kv`", q, None, kv)
    kpm = jnp.zeros((2, 4), bool)
    _both(m, name + r" expects key_padding_mask of shape \(\*batch, S\) = \(2, 5\), got shape "
          r"\(2, 4\)", q, kv, key_padding_mask=kpm)  # fmt: skip
    _both(m, name + r" expects key_padding_mask.*\(2, 3\), got shape \(2, 4\)", q,
          key_padding_mask=kpm)  # fmt: skip
    _both(m, name + r": key_padding_mask must be boolean", q, kv,
          key_padding_mask=jnp.zeros((2, S)))  # fmt: skip
    _both(m, name + r" expects attn_mask of shape \(L, S\) = \(3, 5\), got shape \(5, 3\)", q, kv,
          attn_mask=jnp.zeros((S, L), bool))  # fmt: skip
    _both(m, name + r" expects attn_mask.*= \(3, 3\), got shape \(2, 3, 3\)", q,
          attn_mask=jnp.zeros((2, L, L), bool))  # fmt: skip
    _both(m, name + r": attn_mask must be boolean.*or floating.*int32", q,
          attn_mask=jnp.zeros((L, L), jnp.int32))  # fmt: skip
    split = MultiheadAttention(E, HEADS, kdim=6, key=key)
    _both(split, r"MultiheadAttention\(8, 2, kdim=6\) expects the key input.*\(2, S, 6\)", q)
    # torch habit: the key input passed as `key=` (the PRNG key here).
    with pytest.raises(TypeError, match=name + r": `key=` is the PRNG key.*`kv=`"):
        unchecked(m)(q, key=kv)
    with pytest.raises(TypeError, match=r"key"):
        m(q, key=kv)


def test_attention_call_errors(key: jax.Array) -> None:
    a = Attention(E, HEADS, key=key)
    name = r"nn\.Attention\(8, num_heads=2\)"
    _both(a, name + r" expects input of shape \(\*batch, N, C\) = \(\*batch, N, 8\), got shape "
          r"\(2, 3, 6\)", rand((2, L, 6)))  # fmt: skip
    _both(a, name + r" expects input.*got shape \(8,\)", rand((E,)))
    with pytest.raises(TypeError, match=name + r": `key=` is the PRNG key"):
        unchecked(a)(rand((2, L, E)), key=rand((2, L, E)))
