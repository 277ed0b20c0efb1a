"""Shared fixtures. The suite runs strict, as Equinox's does: rank promotion raises,
dtype promotion is strict, warnings are errors (pyproject.toml), and `treenn` is checked
at runtime by jaxtyping + beartype (settings in typecheck.ini, installed below)."""

from __future__ import annotations

import configparser
import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jaxtyping

# Runtime type checking of treenn, configured in typecheck.ini ([runtime]); installed
# before treenn is first imported, so that every function in it is checked.
_RUNTIME = configparser.ConfigParser()
_RUNTIME.read(Path(__file__).resolve().parents[1] / "typecheck.ini")
_HOOK = jaxtyping.install_import_hook(
    [p.strip() for p in _RUNTIME["runtime"]["packages"].split(",")],
    _RUNTIME["runtime"]["typechecker"],
)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import treenn  # noqa: E402
import treenn.nn as nn  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config: pytest.Config) -> None:
    # Most of the quick loop's time is XLA compiling the same small programs run after
    # run: keep the executables in pytest's cache folder (beside --lf's records; `-p
    # no:cacheprovider` turns both off). JAX keys each entry by the program, the
    # compiler options and the versions, so a change to treenn recompiles what it
    # changes. The size bound turns on JAX's file lock, which xdist's workers share.
    cache = getattr(config, "cache", None)
    if cache is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache.mkdir("jax-compilation")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 1 << 30)


@contextlib.contextmanager
def optax_promotion() -> Iterator[None]:
    """optax mixes Python floats with int32 step counts, which strict promotion rejects;
    use around optax calls only (treenn itself stays strict)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


class Net(treenn.Module):
    """A small conv net with every first-set layer: paths `backbone.layers.{0..4}`
    (Conv2d, BatchNorm, relu, Dropout, Conv2d) and `head` (Linear)."""

    backbone: nn.Sequential
    head: nn.Linear

    def __init__(self, *, key: jax.Array, classes: int = 3):
        k1, k2, k3 = jax.random.split(key, 3)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, key=k1),
            nn.BatchNorm(4),
            jax.nn.relu,
            nn.Dropout(0.25),
            nn.Conv2d(4, 4, 3, padding=1, key=k2),
        )
        self.head = nn.Linear(4, classes, key=k3)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h = self.backbone(x, key=key)
        return self.head(jnp.mean(h, axis=(-3, -2)))


class EqxUser(treenn.Module):
    """A treenn module holding plain Equinox layers."""

    mlp: eqx.nn.MLP
    drop: eqx.nn.Dropout

    def __init__(self, *, key: jax.Array):
        self.mlp = eqx.nn.MLP(3, 2, 8, 2, key=key)
        self.drop = eqx.nn.Dropout(0.5)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.drop(self.mlp(x), key=key)


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture
def net(key: jax.Array) -> Net:
    return Net(key=key)


@pytest.fixture
def images(key: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, 1), (6, 5, 5, 3))


@pytest.fixture
def labels() -> jax.Array:
    return jnp.array([0, 1, 2, 0, 1, 2])


@pytest.fixture
def eqx_user(key: jax.Array) -> EqxUser:
    return EqxUser(key=key)


# -- helpers shared by the tests (import them from conftest) ---------------------------

NET_PARAMS = {
    "backbone.layers.0.weight",
    "backbone.layers.0.bias",
    "backbone.layers.1.weight",
    "backbone.layers.1.bias",
    "backbone.layers.4.weight",
    "backbone.layers.4.bias",
    "head.weight",
    "head.bias",
}
NET_BUFFERS = {"backbone.layers.1.running_mean", "backbone.layers.1.running_var"}


def statuses(model: object) -> dict[str, str]:
    """Dotted path -> status ('trainable', 'frozen', 'buffer', 'static') of every leaf."""
    return treenn.statuses(model)


def paths_with(model: object, status: str) -> set[str]:
    return {p for p, s in statuses(model).items() if s == status}


def dotted(path: tuple[Any, ...]) -> str:
    """PyTorch-style dotted name of a `jax.tree_util` key path, as `treenn.statuses` and
    selectors spell it (status marks add a key that prints as '')."""
    parts = [jax.tree_util.keystr((k,), simple=True) for k in path]
    return ".".join(p for p in parts if p)


def leaves_by_path(tree: Any) -> list[tuple[str, Any]]:
    """`(dotted path, leaf)` of every leaf, in leaf order, status marks seen through."""
    return [(dotted(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


SUMMARY_COLUMNS = ("path", "module", "shape", "dtype", "params", "status", "mode")


def summary_rows(text: str) -> list[dict[str, str]]:
    """The rows of a printed `treenn.summary`, in order, as `{column: cell}` (columns are
    separated by two or more spaces; no cell holds two spaces in a row)."""
    lines = text.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == list(SUMMARY_COLUMNS)
    out = []
    for line in lines[1:]:
        if set(line.strip()) <= {"-"} or line.startswith(("total", "note")):
            continue
        cells = re.split(r"\s{2,}", line.rstrip())  # a root module's path is ""
        assert len(cells) == len(SUMMARY_COLUMNS), line
        out.append(dict(zip(SUMMARY_COLUMNS, cells)))
    return out


def summary_totals(text: str) -> dict[str, tuple[int, float]]:
    """The totals line of a printed `treenn.summary` as `{status: (params, bytes)}`, bytes
    to the shown precision."""
    line = [ln for ln in text.splitlines() if ln.startswith("total")]
    assert len(line) == 1
    out = {}
    for status, params, amount, unit in re.findall(
        r"(\w+): ([\d,]+) params \(([\d.]+) (B|KiB|MiB|GiB)\)", line[0]
    ):
        scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
        out[status] = (int(params.replace(",", "")), float(amount) * scale)
    return out


# -- layer tests: data, names, references (one copy for every layer family) -------------

# Leading batch shapes every layer is checked with: none, one axis, two axes.
BATCHES = [(), (2,), (2, 3)]


def rand_np(shape: tuple[int, ...], seed: int = 0, loc: Any = 0.0, scale: Any = 1.0) -> np.ndarray:
    """Test data drawn with NumPy (no JAX compilation per shape: keeps the suite fast)."""
    z = np.random.default_rng(seed).standard_normal(shape) * scale + loc
    return z.astype(np.float32)


def rand(shape: tuple[int, ...], seed: int = 0, loc: Any = 0.0, scale: Any = 1.0) -> jax.Array:
    """`rand_np` as a float32 JAX array."""
    return jnp.asarray(rand_np(shape, seed, loc, scale))


def np64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def is_array(x: Any) -> bool:
    """An array, concrete or abstract; not a mode, number or function. (`jax.eval_shape`
    turns Python bools such as `inference` into bool scalars: those are modes too.)"""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return False
    return not (x.dtype == np.bool_ and x.shape == ())


def named(tree: Any) -> dict[str, Any]:
    """PyTorch-style `{dotted name: array}` of a layer's arrays (Equinox's own flatten:
    what `state_dict()` would list)."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if is_array(x):
            parts = [jax.tree_util.keystr((k,), simple=True) for k in path]
            out[".".join(p for p in parts if p)] = x
    return out


def names(tree: Any) -> dict[str, tuple[int, ...]]:
    """PyTorch-style `{dotted name: shape}` of a layer's arrays."""
    return {name: tuple(x.shape) for name, x in named(tree).items()}


def to_torch(x: Any) -> Any:
    """A copy of `x` as a torch tensor (torch imported here only: most tests need none)."""
    import torch

    return torch.from_numpy(np.array(x))


def close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """`got` (JAX or NumPy) equals `want` (NumPy or a torch tensor) within tolerances."""
    if hasattr(want, "detach"):
        want = want.detach().numpy()
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)


def linear_ref(x: Any, w: Any, b: Any) -> np.ndarray:
    y = np64(x) @ np64(w).T
    return y if b is None else y + np64(b)


def check_uniform_init(x: Any, bound: float, n_min: int = 100) -> None:
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
