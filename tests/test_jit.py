"""treenn.jit: arrays traced, everything else static; outputs may hold anything; the
identity fast path never returns stale results.

Every test runs twice: on the fast paths (`treenn/_jit_fast.py`, the default) and on the
plain path alone (`treenn/_jit.py`, as with `TREENN_JIT_FAST=0`); the tests of a fast
path itself (`@fast_only`) run once.
"""

from __future__ import annotations

import collections
import gc
import inspect
import linecache
import os
import re
import subprocess
import sys
import threading
import time
import types
import warnings
import weakref
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jaxtyping import TypeCheckError

import treenn
import treenn.nn as nn
from treenn import _jit, _jit_fast  # private on purpose: the switch between the two paths


def fast_only(test):
    """Mark a test of a fast path itself: it runs on the fast path only."""
    test.fast_only = True
    return test


def pytest_generate_tests(metafunc):
    paths = ["fast"] if getattr(metafunc.function, "fast_only", False) else ["fast", "plain"]
    metafunc.parametrize("jit_path", paths, indirect=True)


@pytest.fixture(autouse=True)
def jit_path(request):
    """`treenn.jit` functions made in the test take this path."""
    previous = _jit._set_fast(request.param == "fast")
    yield request.param
    _jit._set_fast(previous)


def test_each_path_is_what_the_switch_says(jit_path):
    f = treenn.jit(lambda x: x + 1)
    assert isinstance(f, _jit_fast.FastJitted) == (jit_path == "fast")
    np.testing.assert_array_equal(f(jnp.ones(2)), np.full(2, 2.0))


@fast_only
@pytest.mark.slow  # a subprocess
def test_environment_variable_switches_the_fast_paths_off():
    code = (
        "import jax.numpy as jnp, treenn\n"
        "from treenn._jit_fast import FastJitted\n"
        "f = treenn.jit(lambda x: x * 2)\n"
        "print(type(f).__name__, float(f(jnp.ones(()))))\n"
    )
    for value, expected in (("0", "Jitted 2.0"), ("1", "FastJitted 2.0")):
        env = {**os.environ, "TREENN_JIT_FAST": value}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.stdout.strip() == expected, result.stderr


def traced(fn, log):
    """Wrap `fn` so that each trace appends to `log`."""

    def wrapper(*args, **kwargs):
        log.append(1)
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def lin(key):
    return nn.Linear(3, 2, key=key)


@pytest.fixture
def x(key):
    return jax.random.normal(jax.random.fold_in(key, 5), (4, 3))


def _bump(model):
    return eqx.tree_at(lambda m: m.weight, model, model.weight + 1.0)


# -- semantics ---------------------------------------------------------------------------


def test_same_values_as_uncompiled(net, images, key):
    model = nn.eval_mode(net)

    def fn(model, x, key):
        return model(x, key=key), jnp.sum(x)

    got = treenn.jit(fn)(model, images, key)
    want = fn(model, images, key)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_static_python_args_retrace_and_change_behaviour(x):
    log = []

    def body(x, n, op, flag):
        out = x * n if op == "mul" else x + n
        return -out if flag else out

    f = treenn.jit(traced(body, log))
    np.testing.assert_allclose(f(x, 2, "mul", False), x * 2)
    f(x + 1.0, 2, "mul", False)  # new array values: no retrace
    assert len(log) == 1
    np.testing.assert_allclose(f(x, 3, "mul", False), x * 3)
    assert len(log) == 2
    np.testing.assert_allclose(f(x, 3, "add", False), x + 3)
    assert len(log) == 3
    np.testing.assert_allclose(f(x, 3, "add", True), -(x + 3))
    assert len(log) == 4
    np.testing.assert_allclose(f(x, 2.5, "mul", False), x * 2.5)
    assert len(log) == 5
    np.testing.assert_allclose(f(x, 2, "mul", False), x * 2)
    np.testing.assert_allclose(f(x, 3, "add", True), -(x + 3))
    assert len(log) == 5


def test_numpy_arrays_and_scalars_are_traced(x):
    log = []
    f = treenn.jit(traced(lambda x, s: x * s, log))
    np.testing.assert_allclose(f(x, np.float32(2.0)), x * 2)
    np.testing.assert_allclose(f(x, np.float32(3.0)), x * 3)
    np.testing.assert_allclose(
        f(np.ones((4, 3), np.float32), np.float32(3.0)), np.full((4, 3), 3.0)
    )
    assert len(log) == 1


def test_shape_change_retraces_correctly(lin, key):
    log = []
    f = treenn.jit(traced(lambda m, x: m(x), log))
    for n in (2, 5, 2, 5):
        x = jax.random.normal(jax.random.fold_in(key, n), (n, 3))
        np.testing.assert_allclose(f(lin, x), lin(x), rtol=1e-6)
    assert len(log) == 2


def test_output_structure_depending_on_shape(key):
    f = treenn.jit(lambda x: tuple(x[i] * 2 for i in range(x.shape[0])))
    g = treenn.jit(lambda x: {"n": x.shape[0], "rows": [x[i] for i in range(x.shape[0])]})
    for n in (2, 3, 2, 4, 3, 2):
        x = jax.random.normal(jax.random.fold_in(key, n), (n, 2))
        out = f(x)
        assert type(out) is tuple and len(out) == n
        for i in range(n):
            np.testing.assert_allclose(out[i], x[i] * 2)
        d = g(x)
        assert d["n"] == n and len(d["rows"]) == n
        np.testing.assert_allclose(d["rows"][-1], x[n - 1])


def test_output_structure_depending_on_shape_with_a_prng_key_argument(key):
    # Typed PRNG keys have an extended dtype that NumPy cannot read.
    f = treenn.jit(lambda x, k: tuple(x[i] + jax.random.normal(k) for i in range(x.shape[0])))
    for n in (2, 3, 2):
        out = f(jnp.zeros((n, 2)), jax.random.fold_in(key, n))
        assert type(out) is tuple and len(out) == n


def test_outputs_hold_models_and_objects(net, x, lin):
    def f(model, x):
        return model, "hello", 3, None, jax.nn.relu, {"y": model(x), "tag": ("a", 1.5)}

    model, s, n, none, fn, d = treenn.jit(f)(lin, x)
    assert eqx.tree_equal(model, lin)
    assert s == "hello" and n == 3 and type(n) is int and none is None
    assert fn is jax.nn.relu and d["tag"] == ("a", 1.5)
    np.testing.assert_allclose(d["y"], lin(x), rtol=1e-6)
    out = treenn.jit(lambda m: m)(treenn.freeze(net, "head.**"))
    assert eqx.tree_equal(out, treenn.freeze(net, "head.**"))
    assert treenn.trainable(out).head.weight is None
    assert nn.modes(out) == nn.modes(net)


def test_outputs_may_hold_unhashable_objects(x):
    # "outputs may hold anything": a non-array output leaf need not be hashable.
    out = treenn.jit(lambda x: (x * 2, {"names": {"a", "b"}}))(x)
    np.testing.assert_allclose(out[0], x * 2)
    assert out[1]["names"] == {"a", "b"}


def test_kwargs(lin, x):
    log = []

    def f(x, *, model, scale, mode="plain"):
        y = model(x) * scale
        return y + 1.0 if mode == "shift" else y

    g = treenn.jit(traced(f, log))
    np.testing.assert_allclose(g(x, model=lin, scale=jnp.float32(2.0)), lin(x) * 2, rtol=1e-6)
    np.testing.assert_allclose(g(x, model=lin, scale=jnp.float32(3.0)), lin(x) * 3, rtol=1e-6)
    assert len(log) == 1
    np.testing.assert_allclose(
        g(x, scale=jnp.float32(3.0), model=lin, mode="shift"), lin(x) * 3 + 1.0, rtol=1e-6
    )
    assert len(log) == 2
    other = _bump(lin)
    np.testing.assert_allclose(g(x, model=other, scale=jnp.float32(1.0)), other(x), rtol=1e-6)


def test_callable_module_arrays_are_traced(lin, x):
    seen = []

    class Probe(treenn.Module):
        inner: nn.Linear

        def __call__(self, x):
            seen.append(isinstance(self.inner.weight, jax.core.Tracer))
            return self.inner(x)

        def double(self, x):
            return 2 * self.inner(x)

    probe = Probe(lin)
    np.testing.assert_allclose(treenn.jit(probe)(x), lin(x), rtol=1e-6)
    assert seen == [True]  # the module's arrays were traced, not baked in as constants
    updated = Probe(_bump(lin))
    np.testing.assert_allclose(treenn.jit(updated)(x), updated(x), rtol=1e-6)
    np.testing.assert_allclose(treenn.jit(probe.double)(x), 2 * lin(x), rtol=1e-6)
    np.testing.assert_allclose(treenn.jit(updated.double)(x), 2 * updated(x), rtol=1e-6)


def test_callable_module_sees_in_place_updates(lin, x):
    class Holder(treenn.Module):
        layers: list

        def __call__(self, x):
            return self.layers[0](x)

    holder = Holder([lin])
    f = treenn.jit(holder)
    np.testing.assert_allclose(f(x), lin(x), rtol=1e-6)
    holder.layers[0] = _bump(lin)
    np.testing.assert_allclose(f(x), holder.layers[0](x), rtol=1e-6)


def test_equinox_models(key, eqx_user):
    mlp = eqx.nn.MLP(3, 2, 8, 2, key=key)
    xs = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    f = treenn.jit(lambda m, x: jax.vmap(m)(x))
    np.testing.assert_allclose(f(mlp, xs), jax.vmap(mlp)(xs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(treenn.jit(mlp)(xs[0]), mlp(xs[0]), rtol=1e-5, atol=1e-6)
    other = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.fold_in(key, 1))
    np.testing.assert_allclose(f(other, xs), jax.vmap(other)(xs), rtol=1e-5, atol=1e-6)
    user = nn.eval_mode(eqx_user)
    g = treenn.jit(lambda m, x: jax.vmap(m)(x))
    np.testing.assert_allclose(g(user, xs), jax.vmap(user)(xs), rtol=1e-5, atol=1e-6)


# -- donate ------------------------------------------------------------------------------


@pytest.mark.parametrize("donate", ["none", "all", "all-except-first", "warn", "warn-except-first"])
def test_donate_values_accepted(donate):
    f = treenn.jit(lambda a, b: (a * 2, b + 1), donate=donate)
    a, b = jnp.ones(3), jnp.zeros(3)
    out = f(a, b)
    np.testing.assert_allclose(out[0], np.full(3, 2.0))
    np.testing.assert_allclose(out[1], np.ones(3))


def test_donate_donates_the_right_arguments():
    def f(a, b):
        return a * 2, b + 1

    a, b = jnp.ones(3), jnp.zeros(3)
    treenn.jit(f, donate="none")(a, b)
    assert not a.is_deleted() and not b.is_deleted()
    treenn.jit(f, donate="all-except-first")(a, b)
    assert not a.is_deleted() and b.is_deleted()
    a, b = jnp.ones(3), jnp.zeros(3)
    treenn.jit(f, donate="all")(a, b)
    assert a.is_deleted() and b.is_deleted()


def test_donate_warn_shows_unusable_donation_and_all_does_not(x):
    expected = float(jnp.sum(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(treenn.jit(jnp.sum, donate="all")(x)) == pytest.approx(expected)
    with pytest.warns(UserWarning, match="donated buffers were not usable"):
        treenn.jit(jnp.sum, donate="warn")(jnp.ones(3))


@pytest.mark.parametrize("bad", ["everything", "None", "", "ALL"])
def test_invalid_donate_raises(bad):
    # With the suite's runtime type checking, the `Literal` annotation rejects it first.
    with pytest.raises((ValueError, TypeCheckError), match="donate"):
        treenn.jit(lambda x: x, donate=bad)
    with pytest.raises((ValueError, TypeCheckError), match="donate"):
        treenn.jit(donate=bad)(lambda x: x)
    # Without it (as users run it): a ValueError naming the value and the choices.
    unchecked = inspect.unwrap(treenn.jit)
    with pytest.raises(ValueError, match=rf"donate={re.escape(repr(bad))}.*all-except-first"):
        unchecked(lambda x: x, donate=bad)


def test_decorator_forms(x):
    @treenn.jit
    def f(x):
        return x * 2

    @treenn.jit(donate="none")
    def g(x):
        return x * 3

    np.testing.assert_allclose(f(x), x * 2)
    np.testing.assert_allclose(g(x), x * 3)
    assert f.__name__ == "f" and g.__name__ == "g"


def test_unhashable_static_leaf_raises(x):
    f = treenn.jit(lambda x, s: x)
    with pytest.raises(TypeError, match="set"):
        f(x, {1, 2})
    with pytest.raises(TypeError, match="bytearray"):
        f(x, (1, bytearray(b"ab")))


# -- the identity fast path --------------------------------------------------------------


def test_passing_back_returned_model_matches_eager(lin, x):
    def step(model, x):
        grads = treenn.grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
        model = treenn.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
        return model, jnp.sum(model(x))

    jitted = treenn.jit(step)
    m_jit, m_eager = lin, lin
    for _ in range(4):
        m_jit, v_jit = jitted(m_jit, x)
        m_eager, v_eager = step(m_eager, x)
        np.testing.assert_allclose(v_jit, v_eager, rtol=1e-5)
        np.testing.assert_allclose(m_jit.weight, m_eager.weight, rtol=1e-5)


def test_swapping_returned_objects_between_arguments(lin, x):
    f = treenn.jit(lambda a, b: (b, a, a.weight - b.weight))
    b = _bump(lin)
    a2, b2, d = f(lin, b)
    np.testing.assert_allclose(d, -np.ones((2, 3)))
    a3, b3, d = f(a2, b2)  # a2 is b, b2 is lin: both remembered from the last call
    np.testing.assert_allclose(d, np.ones((2, 3)))
    _, _, d = f(a3, a3)
    np.testing.assert_allclose(d, np.zeros((2, 3)))


def test_different_model_same_structure_and_alternating(lin, x):
    f = treenn.jit(lambda m, x: m(x))
    other = _bump(lin)
    for model in (lin, other, lin, lin, other, other, lin):
        np.testing.assert_allclose(f(model, x), model(x), rtol=1e-6)


def test_returned_model_from_other_jit_and_received_arguments(lin, x):
    bump = treenn.jit(_bump)
    apply = treenn.jit(lambda m, x: m(x))
    m = lin
    for _ in range(3):
        m = bump(m)
        np.testing.assert_allclose(apply(m, x), m(x), rtol=1e-6)


class Box:
    """A mutable, user-registered pytree node."""

    def __init__(self, w):
        self.w = w


jtu.register_pytree_node(Box, lambda b: ((b.w,), None), lambda _, c: Box(c[0]))


@pytest.mark.parametrize("kind", ["list", "dict", "OrderedDict", "defaultdict", "custom_node"])
def test_in_place_mutation_of_containers_is_seen(kind):
    a, b = jnp.ones(2), jnp.full(2, 5.0)
    if kind == "list":
        holder = [a]
        get, put = (lambda h: h[0]), (lambda h, v: h.__setitem__(0, v))
    elif kind == "custom_node":
        holder = Box(a)
        get, put = (lambda h: h.w), (lambda h, v: setattr(h, "w", v))
    else:
        cls = {
            "dict": dict,
            "OrderedDict": collections.OrderedDict,
            "defaultdict": lambda **kw: collections.defaultdict(int, **kw),
        }[kind]
        holder = cls(w=a)
        get, put = (lambda h: h["w"]), (lambda h, v: h.__setitem__("w", v))
    model = (holder, "static")  # an otherwise immutable tree around it
    f = treenn.jit(lambda m: get(m[0]) * 2)
    np.testing.assert_allclose(f(model), 2 * np.ones(2))
    put(holder, b)
    np.testing.assert_allclose(f(model), np.full(2, 10.0))
    put(holder, a)
    np.testing.assert_allclose(f(model), 2 * np.ones(2))


def test_module_holding_mutated_list(lin, x):
    class Holder(treenn.Module):
        layers: list

    holder = Holder([lin])
    f = treenn.jit(lambda h, x: h.layers[0](x))
    np.testing.assert_allclose(f(holder, x), lin(x), rtol=1e-6)
    holder.layers[0] = _bump(lin)
    np.testing.assert_allclose(f(holder, x), holder.layers[0](x), rtol=1e-6)


def test_numpy_array_mutated_in_place_is_seen():
    t = (np.ones(2, np.float32),)
    f = treenn.jit(lambda t: t[0] * 2)
    np.testing.assert_allclose(f(t), np.full(2, 2.0))
    t[0][:] = 4.0
    np.testing.assert_allclose(f(t), np.full(2, 8.0))


def test_mode_change_between_calls(key):
    model = nn.Sequential(nn.Dropout(0.5))
    x = jnp.ones((64,))
    f = treenn.jit(lambda m, x, key: m(x, key=key))
    train = f(model, x, key)
    assert np.any(np.asarray(train) == 0.0)
    evaluated = f(nn.eval_mode(model), x, key)
    np.testing.assert_array_equal(evaluated, x)
    np.testing.assert_array_equal(f(model, x, key), train)
    np.testing.assert_array_equal(f(nn.eval_mode(model), x, key), x)


def test_frozen_status_change_between_calls(key, x):
    model = nn.Sequential(nn.Linear(3, 2, key=key), nn.Linear(2, 1, key=jax.random.fold_in(key, 1)))
    f = treenn.jit(treenn.grad(lambda m, x: jnp.sum(m(x))))
    g = f(model, x)
    assert g.layers[0].weight is not None
    frozen = treenn.freeze(model, "layers.0.**")
    g2 = f(frozen, x)
    assert g2.layers[0].weight is None
    np.testing.assert_allclose(g2.layers[1].weight, g.layers[1].weight, rtol=1e-6)
    assert f(model, x).layers[0].weight is not None
    assert f(treenn.unfreeze(frozen), x).layers[0].weight is not None


def test_training_loop_with_state(key):
    """The whole recipe under treenn.jit: BatchNorm statistics and parameters advance
    exactly as under jax.jit, with each call's returned model passed back in."""
    k1, k2 = jax.random.split(key)
    model = nn.Sequential(
        nn.Linear(3, 4, key=k1), nn.BatchNorm(4), jax.nn.relu, nn.Linear(4, 3, key=k2)
    )
    xs = jax.random.normal(jax.random.fold_in(key, 9), (8, 3))
    ys = jnp.arange(8) % 3

    def loss_fn(model, x, y):
        logits, model = treenn.apply(model, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), model

    def step(model, x, y):
        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        updates = jax.tree.map(lambda g: -0.1 * g, grads)
        return treenn.apply_updates(model, updates), loss

    jitted = treenn.jit(step, donate="all-except-first")
    reference = eqx.filter_jit(step)  # `inference` is a Python bool leaf: static
    m_eager, m_jit = model, model
    for _ in range(3):
        m_eager, l_eager = reference(m_eager, xs, ys)
        m_jit, l_jit = jitted(m_jit, xs, ys)
        np.testing.assert_allclose(l_jit, l_eager, rtol=1e-5)
    bn_j, bn_e = m_jit.layers[1], m_eager.layers[1]
    np.testing.assert_allclose(bn_j.running_mean, bn_e.running_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_j.running_var, bn_e.running_var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(bn_j.running_var), 1.0)
    np.testing.assert_allclose(
        m_jit.layers[3].weight, m_eager.layers[3].weight, rtol=1e-5, atol=1e-6
    )
    assert treenn.trainable(m_jit).layers[1].running_mean is None


# -- inputs passed through unchanged -------------------------------------------------------


def test_frozen_arrays_come_back_as_the_same_arrays(key, x):
    """A frozen array the step leaves alone is the input array itself (no copy per
    step); the trained arrays are new and equal to the eager step's."""
    k1, k2 = jax.random.split(key)
    model = nn.Sequential(nn.Linear(3, 4, key=k1), nn.Linear(4, 2, key=k2))
    model = treenn.freeze(model, "layers.0")

    def step(model, x):
        grads = treenn.grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
        return treenn.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))

    jitted = treenn.jit(step)
    out, want = jitted(model, x), step(model, x)
    assert out.layers[0].weight is model.layers[0].weight
    assert out.layers[0].bias is model.layers[0].bias
    assert out.layers[1].weight is not model.layers[1].weight
    np.testing.assert_allclose(out.layers[1].weight, want.layers[1].weight, rtol=1e-6)
    assert treenn.trainable(out).layers[0].weight is None  # still frozen
    again = jitted(out, x)  # the returned model, passed back in
    assert again.layers[0].weight is model.layers[0].weight
    np.testing.assert_allclose(again.layers[1].weight, step(want, x).layers[1].weight, rtol=1e-6)


def test_outputs_mixing_computed_and_passed_through_arrays():
    """Each output element takes its arrays from the right place, computed or passed
    through, whatever its kind: a dict, a bare array, a tuple, a list, a one-array
    module (a tree, not a bare array)."""
    a, b = jnp.ones(2), jnp.arange(3.0)

    def fn(a, b):
        return {"k": b, "s": a + 1}, a, (b * 2, a), [a, b + 1], _Wrap(b - 1), b

    out = treenn.jit(fn)(a, b)
    want = fn(a, b)
    assert jtu.tree_structure(out) == jtu.tree_structure(want)
    for got, expected in zip(jtu.tree_leaves(out), jtu.tree_leaves(want)):
        np.testing.assert_array_equal(got, expected)
    assert out[0]["k"] is b and out[1] is a and out[2][1] is a and out[3][0] is a
    assert out[5] is b and isinstance(out[4], _Wrap)


def test_numpy_input_passed_through_comes_back_as_a_jax_array():
    f = treenn.jit(lambda a, b: (a, b * 2))
    a, b = np.arange(3.0, dtype=np.float32), np.float32(2.0)
    same, doubled = f(a, b)
    assert isinstance(same, jax.Array) and isinstance(doubled, jax.Array)
    np.testing.assert_array_equal(same, a)
    assert float(doubled) == 4.0
    on_device = jnp.asarray(a)
    assert f(on_device, b)[0] is on_device


@pytest.mark.parametrize("donate", ["all", "all-except-first"])
def test_donated_inputs_are_returned_as_new_arrays(donate):
    a, b = jnp.arange(3.0), jnp.ones(3)
    out_a, out_b, total = treenn.jit(lambda a, b: (a, b, jnp.sum(a + b)), donate=donate)(a, b)
    assert b.is_deleted() and out_b is not b  # donated: its buffer now belongs to out_b
    np.testing.assert_array_equal(out_b, np.ones(3))
    np.testing.assert_array_equal(out_a, np.arange(3.0))
    assert (out_a is a) == (donate == "all-except-first")
    assert float(total) == 6.0


def test_pass_through_that_depends_on_shapes():
    f = treenn.jit(lambda a: a if a.shape[0] == 2 else a + 1)
    two, three = jnp.ones(2), jnp.ones(3)
    assert f(two) is two
    np.testing.assert_array_equal(f(three), np.full(3, 2.0))
    assert f(two) is two  # each shape keeps its own trace's pass-through
    np.testing.assert_array_equal(f(jnp.zeros(3)), np.ones(3))


def test_lower_traces_without_running_and_compiles(lin, x):
    log = []
    f = treenn.jit(traced(lambda m, x: m(x) * 2, log))
    lowered = f.lower(lin, x)
    assert len(log) == 1
    flops = lowered.compile().cost_analysis()["flops"]
    assert flops >= 2 * x.shape[0] * lin.in_features * lin.out_features  # the matmul
    np.testing.assert_allclose(f(lin, x), lin(x) * 2, rtol=1e-6)
    assert len(log) == 1  # the call reuses the lowering's trace
    frozen = treenn.freeze(lin)
    assert "dot" in f.lower(frozen, x).as_text()  # another structure: its own trace
    np.testing.assert_allclose(f(frozen, x), lin(x) * 2, rtol=1e-6)


# -- issue 14: memory, weak types, threads, methods, binding, donation, depth, typing ------


def test_no_reference_to_inputs_or_outputs_after_the_call(key, x):
    """Nothing outlives a call but the compiled code: a training loop's models (passed
    in, returned, passed back) are freed as soon as the user drops them."""

    def step(model, x):
        grads = treenn.grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
        return treenn.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)), (x, 1)

    jitted = treenn.jit(step)
    model = nn.Sequential(nn.Linear(3, 4, key=key), nn.Linear(4, 2, key=jax.random.fold_in(key, 1)))
    refs = [weakref.ref(a) for a in jax.tree.leaves(model)]
    for _ in range(3):
        model, aux = jitted(model, x)
        refs += [weakref.ref(a) for a in jax.tree.leaves(model)]
    refs.append(weakref.ref(model))
    del model, aux
    gc.collect()
    assert [r for r in refs if r() is not None and r() is not x] == []


@fast_only
def test_remembered_trees_are_forgotten_with_them(lin, x):
    """The previous call's trees are recognised by identity without being kept alive:
    an optimiser-state-like tuple (not weakly referable) included."""
    f = treenn.jit(lambda m, s: (_bump(m), (s[0] + 1, _bump(s[1])), jnp.sum(m.weight)))
    model, state = lin, (jnp.zeros(()), lin)
    for i in range(3):
        model, state, total = f(model, state)
        np.testing.assert_allclose(state[0], i + 1.0)
        np.testing.assert_allclose(total, jnp.sum(lin.weight) + 6.0 * i)
    assert len(f._memo) >= 2  # the model and the state tuple, recognised next call
    refs = [weakref.ref(a) for a in jax.tree.leaves((model, state))]
    del model, state, total
    gc.collect()
    held = {id(a) for a in jax.tree.leaves(lin)}  # the fixture's bias, passed through
    assert [r for r in refs if r() is not None and id(r()) not in held] == []
    assert len(f._memo) == 0


def run_threads(worker: Any, args: Any) -> None:
    """`worker(a)` in a thread per `a`, switching threads often (races show up quickly)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(a,)) for a in args]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def test_threads_passing_their_own_models_back(lin):
    f = treenn.jit(lambda m: eqx.tree_at(lambda m: m.bias, m, m.bias + 1.0))
    errors: list[str] = []

    def worker(i):
        model = eqx.tree_at(lambda m: m.bias, lin, jnp.full(2, 100.0 * i))
        for n in range(1, 201):
            model = f(model)
            if float(model.bias[0]) != 100.0 * i + n:
                errors.append(f"thread {i} step {n}: {float(model.bias[0])}")
                return

    run_threads(worker, range(4))
    assert errors == []


class _LookupOnly(dict):  # type: ignore[type-arg]
    """A dict that fails when iterated: single lookups and pops only."""

    def _iterated(self, *args: Any) -> Any:
        raise AssertionError("the shared memo was iterated")

    __iter__ = keys = values = items = _iterated  # type: ignore[assignment]


@fast_only
def test_the_shared_memo_is_only_looked_up(lin):
    """Regression: `_prepare` took the shared memo as an argument, and the suite's runtime
    type checker iterated it while other threads (and weakref callbacks) changed it:
    "dictionary changed size during iteration" in `test_threads_...` above, 8 times in 20
    runs of it. Anything but single lookups races; this fails deterministically if the
    shared memo is handed to something that iterates it."""
    f = treenn.jit(lambda m: eqx.tree_at(lambda m: m.bias, m, m.bias + 1.0))
    model = f(lin)
    f._memo = _LookupOnly(f._memo)
    assert id(model) in f._memo
    model = f(model)  # recognised from the memo
    np.testing.assert_allclose(model.bias, lin.bias + 2.0)
    f._memo = _LookupOnly(f._memo)
    key = id(model)
    assert key in f._memo
    del model
    gc.collect()  # the weakref callback pops the dead model's record
    assert key not in f._memo


def test_weak_types_are_part_of_the_key():
    # As `jax.jit`: a weakly typed argument (a Python scalar turned array) is its own trace.
    cast = treenn.jit(lambda x: x.astype(jnp.float32))
    probe = treenn.jit(lambda x: (x.weak_type, x))
    strong, weak = jnp.asarray(2.0, jnp.float32), jnp.asarray(2.0)
    assert not strong.weak_type and weak.weak_type
    for x in (strong, weak, strong, weak, strong):
        assert float(cast(x)) == 2.0
        is_weak, same = probe(x)
        assert is_weak is x.weak_type and same.weak_type is jax.jit(lambda x: x)(x).weak_type


def test_thread_safe_when_the_output_structure_depends_on_the_shape():
    f = treenn.jit(lambda x: tuple(x[i] for i in range(x.shape[0])))
    errors: list[str] = []
    stop = time.monotonic() + 2.0

    def worker(n):
        x = jnp.arange(float(n))
        try:
            while time.monotonic() < stop and not errors:
                out = f(x)
                if len(out) != n or float(out[-1]) != n - 1:
                    errors.append(f"shape ({n},) got {len(out)} elements")
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(repr(err))

    run_threads(worker, (5, 3, 4, 2))
    assert errors == []


def test_decorated_methods_bind_self(lin, x):
    class _Scaled(eqx.Module):  # made here: on the path this test runs
        lin: nn.Linear
        scale: float = 2.0

        @treenn.jit
        def __call__(self, x):
            return self.lin(x) * self.scale

        @treenn.jit(donate="all-except-first")
        def shifted(self, x, shift):
            return self.lin(x) + shift

    net = _Scaled(lin)
    np.testing.assert_allclose(net(x), lin(x) * 2.0, rtol=1e-6)
    other = _Scaled(_bump(lin), scale=3.0)  # arrays traced, the float static
    np.testing.assert_allclose(other(x), _bump(lin)(x) * 3.0, rtol=1e-6)
    shift = jnp.ones((4, 2))
    np.testing.assert_allclose(net.shifted(x, shift), lin(x) + 1.0, rtol=1e-6)
    assert shift.is_deleted() and not lin.weight.is_deleted()  # self is the kept first
    assert _Scaled.__call__(net, x).shape == (4, 2)  # unbound access: an ordinary function


def test_positional_and_keyword_calls_trace_once(x):
    log = []

    def f(a, b, *, scale=1.0):
        log.append(1)
        return (a + b) * scale

    g = treenn.jit(f)
    for call in (
        lambda: g(x, x),
        lambda: g(x, b=x),
        lambda: g(a=x, b=x),
        lambda: g(b=x, a=x),
    ):
        np.testing.assert_allclose(call(), 2 * x)
    assert len(log) == 1
    np.testing.assert_allclose(g(x, x, scale=3.0), 6 * x)
    assert len(log) == 2
    with pytest.raises(TypeError, match=r"treenn.jit\(.*f\).*'c'"):
        g(x, x, c=x)


def test_donating_an_array_used_elsewhere_in_the_call_raises(x):
    a = jnp.ones(3)
    f = treenn.jit(lambda m, y: (m, y * 2), donate="all-except-first")
    with pytest.raises(ValueError, match=r"args\[0\] and as args\[1\].*donated"):
        f(a, a)
    with pytest.raises(ValueError, match=r"args\[0\]\[1\]\['w'\] and as args\[1\]"):
        f((x, {"w": a}), y=a)
    assert not a.is_deleted()
    both = treenn.jit(lambda t: t[0] + t[1], donate="all")
    with pytest.raises(ValueError, match=r"args\[0\]\[0\] and as args\[0\]\[1\]"):
        both((a, a))
    assert not a.is_deleted()
    m, y = f(a, jnp.ones(3))  # distinct arrays: fine, the kept one passed through
    assert m is a and float(y[0]) == 2.0
    # Under an outer transform nothing is donated: the same tracer twice is fine.
    np.testing.assert_allclose(jax.jit(lambda a: both((a, a)))(a), np.full(3, 2.0))


class _Wrap(eqx.Module):
    inner: Any


def test_deeply_nested_models():
    tree = jnp.ones(2)
    for _ in range(500):
        tree = _Wrap(tree)
    out = treenn.jit(lambda t, s: jax.tree.map(lambda a: a + s, t))(tree, jnp.float32(1.0))
    depth = 0
    while isinstance(out, _Wrap):
        out, depth = out.inner, depth + 1
    assert depth == 500
    np.testing.assert_array_equal(out, np.full(2, 2.0))


class _Gate(eqx.Module):
    w: jax.Array
    inference: bool  # an ordinary field holding a Python bool, as Equinox's layers


def test_python_bool_leaves_are_static_and_a_change_retraces(x):
    log = []
    f = treenn.jit(traced(lambda m, x: x * m.w if m.inference else x + m.w, log))
    train, infer = _Gate(jnp.float32(2.0), False), _Gate(jnp.float32(2.0), True)
    np.testing.assert_allclose(f(train, x), x + 2.0)
    np.testing.assert_allclose(f(infer, x), x * 2.0)
    np.testing.assert_allclose(f(train, x), x + 2.0)
    np.testing.assert_allclose(f(_Gate(jnp.float32(3.0), True), x), x * 3.0)
    assert len(log) == 2  # one trace per mode; new weights reuse it


def test_static_leaves_are_compared_by_type_as_well():
    # `1 == 1.0 == True`, yet each is its own trace (as `jax.jit`'s static arguments).
    f = treenn.jit(lambda x, n: (x, type(n).__name__))
    x = jnp.ones(2)
    assert [f(x, n)[1] for n in (1, True, 1.0, 1)] == ["int", "bool", "float", "int"]


def test_clear_caches_drops_compiled_functions(x):
    log = []
    f = treenn.jit(traced(lambda x: x * 2, log))
    f(x)
    f(x)
    assert len(log) == 1
    treenn.clear_caches()
    np.testing.assert_allclose(f(x), x * 2)
    assert len(log) == 2


def test_trace_cache_is_bounded(monkeypatch, x):
    monkeypatch.setattr(_jit, "_MAX_TRACES", 3)
    f = treenn.jit(lambda x, n: x * n)
    for n in range(1, 8):
        np.testing.assert_allclose(f(x, n), x * n)
    assert len(f._cache) == 3
    np.testing.assert_allclose(f(x, 1), x)  # evicted: traced again, still right


def test_a_full_trace_cache_drops_the_least_recently_used_trace(monkeypatch, x):
    """Regression (issue 21, defect 15): a full trace cache dropped its oldest trace even
    when that was the one in use, so a hot step recompiled whenever new structures came."""
    monkeypatch.setattr(_jit, "_MAX_TRACES", 3)
    log: list[int] = []
    f = treenn.jit(traced(lambda x, n: x * n, log))
    for n in range(1, 10):
        np.testing.assert_allclose(f(x, 0), np.zeros_like(x))  # the step in use
        np.testing.assert_allclose(f(x, n), x * n)  # a new structure each time
    assert len(log) == 10  # one trace each: the one in use was never traced again


@fast_only
def test_many_structures_do_not_recompile_the_one_in_use(monkeypatch, x):
    """Regression (issue 21, defect 15): past `_MAX_STRUCTURES` interned structures the
    table was emptied, and the structure in use, interned anew, missed its trace: a
    silent recompile every `_MAX_STRUCTURES` new structures."""
    monkeypatch.setattr(_jit_fast, "_MAX_STRUCTURES", 4)
    log: list[int] = []
    f = treenn.jit(traced(lambda x, tag: x * 2, log))
    for n in range(12):
        f(x, "in use")
        f(x, f"new {n}")  # a static string: a new structure
    assert len(f._structures) <= 4
    assert len(log) == 13  # "in use" traced once, each new one once


@fast_only
@pytest.mark.parametrize("recipe", ["frozen BatchNorm", "freeze_backbone"])
def test_pinned_models_are_recognised_next_call(key, recipe):
    """Regression (issue 21, defect 9): the memo took `Pinned`, the mark around a pinned
    module's `inference` bool, for a node that may change in place, so a pinned model
    (frozen BatchNorm, `freeze_backbone`) was flattened again on every call: 3-4x the
    dispatch time of a ResNet-18 step. A pin is structure, like the bool it holds."""
    k1, k2 = jax.random.split(key)
    model = nn.Sequential(
        nn.Linear(3, 4, key=k1), nn.BatchNorm(4), nn.Dropout(0.5), nn.Linear(4, 2, key=k2)
    )
    if recipe == "frozen BatchNorm":
        model = nn.eval_mode(model, nn.BatchNorm, pin=True)
    else:
        model = treenn.freeze_backbone(model, "layers.3")
    pins = nn.pinned(model)
    assert pins  # the recipe pinned something
    tx = optax.sgd(0.1)
    step = treenn.train_step(lambda m, x, y, key: jnp.mean((m(x, key=key) - y) ** 2), tx)
    opt_state = tx.init(treenn.trainable(model))
    xs, ys = jnp.ones((8, 3)), jnp.zeros((8, 2))
    for i in range(3):
        model, opt_state, loss = step(model, opt_state, xs, ys, jax.random.fold_in(key, i))
        assert id(model) in step._memo, "the returned model is not recognised next call"
    assert nn.pinned(model) == pins and np.isfinite(float(loss))


@fast_only
def test_unchanged_subtrees_are_the_inputs_own(key, x):
    """A frozen layer that a step passes through comes back as the input's own (immutable)
    layer, not a copy built anew each call; the rest is built as usual."""
    k1, k2 = jax.random.split(key)
    model = treenn.freeze(
        nn.Sequential(nn.Linear(3, 4, key=k1), nn.Linear(4, 2, key=k2)), "layers.0"
    )

    def step(model, x):
        grads = treenn.grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
        return treenn.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))

    jitted = treenn.jit(step)
    out = jitted(model, x)
    layers, before = out.__dict__["layers"], model.__dict__["layers"]
    assert layers[0] is before[0] and layers[1] is not before[1]
    assert treenn.statuses(out) == treenn.statuses(model)
    np.testing.assert_allclose(layers[1].weight, step(model, x).layers[1].weight, rtol=1e-6)
    assert jitted(out, x).__dict__["layers"][0] is before[0]  # and so on, every step


@fast_only
def test_an_input_holding_numpy_arrays_is_not_shared():
    # As from `jax.jit`, what comes back holds JAX arrays, never the caller's NumPy ones.
    f = treenn.jit(lambda w, s: (w, s * 2))
    host = _Wrap(np.ones(2, np.float32))
    for _ in range(2):
        out, _ = f(host, jnp.float32(1.0))
        assert out is not host and isinstance(out.inner, jax.Array)
    device = _Wrap(jnp.ones(2))
    assert f(device, jnp.float32(1.0))[0] is device


@fast_only
def test_generated_code_keeps_its_source(lin):
    """Generated builders and tuple guards show their source to debuggers (inspect,
    tracebacks, pdb), as Equinox's generated flatten functions do."""
    f = treenn.jit(lambda m, s: (_bump(m), (s[0] + 1, s[1])))  # s[1]: shared
    f(lin, (jnp.zeros(()), lin))
    generated = [
        x
        for x in gc.get_objects()
        # type(), not isinstance(): isinstance reads `__class__`, which warns on some
        # objects other libraries leave in the heap (torch's deprecated reduce_op).
        if type(x) is types.FunctionType and x.__code__.co_filename.startswith("<treenn generated ")
    ]
    kinds = {
        fn.__code__.co_filename.rsplit(" ", 1)[0][len("<treenn generated ") :] for fn in generated
    }
    assert {"build", "shared build", "tuple guard", "tuple check"} <= kinds
    for fn in generated:
        filename = fn.__code__.co_filename
        assert "".join(linecache.getlines(filename)) == fn.__source__
        assert inspect.getsource(fn) == fn.__source__


@fast_only
@pytest.mark.parametrize("mechanism", ["memo", "tuple_guards", "builders", "shared_subtrees"])
def test_each_fast_path_switched_off_gives_the_same_training_run(key, x, mechanism):
    def run(**mechanisms):
        previous = _jit_fast._set_mechanisms(**mechanisms)
        try:
            step = treenn.jit(step_fn)
        finally:
            _jit_fast._set_mechanisms(**previous)
        model, state = start, (jnp.zeros(()), start)
        for _ in range(3):
            model, state, total = step(model, state)
        return model, state, total

    def step_fn(m, s):
        return _bump(m), (s[0] + 1, _bump(s[1])), jnp.sum(m.weight)

    start = treenn.freeze(nn.Linear(3, 2, key=key), "bias")
    got, want = run(**{mechanism: False}), run()
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no fast path 'memos'"):
        _jit_fast._set_mechanisms(memos=False)


def test_unhashable_static_leaf_error_names_its_path(x):
    with pytest.raises(TypeError, match=r"unhashable set at args\[1\]\['names'\]"):
        treenn.jit(lambda x, d: x)(x, {"names": {"a"}})


TYPED = """
import jax
import jax.numpy as jnp
import treenn


@treenn.jit
def f(x: jax.Array, n: int, *, scale: float = 1.0) -> tuple[jax.Array, str]:
    return x * n * scale, "ok"


class Net(treenn.Module):
    w: jax.Array

    @treenn.jit(donate="all-except-first")
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w * x


y, s = f(jnp.ones(2), 3, scale=2.0)
reveal_type(y)
reveal_type(s)
reveal_type(Net(jnp.ones(2))(jnp.ones(2)))
f(jnp.ones(2), "three")
f(jnp.ones(2), 3, scal=2.0)
Net(jnp.ones(2))(jnp.ones(2), 1)
"""


@pytest.mark.slow
def test_jit_preserves_the_signature_for_mypy(tmp_path):
    snippet = tmp_path / "typed.py"
    snippet.write_text(TYPED)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(root / "typecheck.ini")]
        + ["--follow-imports=silent", "--no-error-summary", str(snippet)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    lines = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if ": " in line]
    assert lines[:3] == [
        'note: Revealed type is "jax._src.basearray.Array"',
        'note: Revealed type is "str"',
        'note: Revealed type is "jax._src.basearray.Array"',
    ], result.stdout
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 3, result.stdout
    assert 'incompatible type "str"; expected "int"' in errors[0]
    assert 'Unexpected keyword argument "scal"' in errors[1]
    assert "Too many arguments" in errors[2]
