"""`treenn.clear_caches()` empties every per-type and per-structure table treenn keeps,
and those tables stay bounded however many new classes a program meets."""

from __future__ import annotations

import sys
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import treenn
import treenn.nn as nn
from treenn import _caches  # private on purpose: the cache registry clear_caches() empties


def _cached_entries() -> int:
    return sum(len(c) for c in [*_caches._WEAK, *_caches._STRONG] if isinstance(c, dict))


def _fresh_class(i: int) -> type:
    # A new Equinox class per call: what a program defining classes in a loop meets.
    return type(f"Block{i}", (eqx.Module,), {"__annotations__": {"w": jax.Array}})


def test_clear_caches_empties_the_tree_helpers_tables():
    model = nn.Sequential(nn.Linear(2, 3, key=jax.random.key(0)), nn.Dropout(0.5))
    model = nn.eval_mode(treenn.freeze(model, nn.Linear), nn.Dropout)
    treenn.summary(model)
    treenn.clear_caches()
    seeded = _cached_entries()
    treenn.summary(nn.train_mode(treenn.unfreeze(model, "**.bias")))
    assert _cached_entries() > seeded
    treenn.clear_caches()
    assert _cached_entries() == seeded
    # Everything still works from empty tables, and gives the same answers.
    again = nn.eval_mode(treenn.freeze(model, nn.Linear), nn.Dropout)
    assert treenn.statuses(again) == treenn.statuses(model)
    assert nn.modes(again) == nn.modes(model)


@pytest.mark.slow  # a thousand fresh classes frozen: minutes in the whole suite
def test_per_type_tables_are_bounded():
    limit = max(c.maxsize for c in _caches._WEAK if isinstance(c, _caches.Cache))
    for i in range(limit + 50):
        module = _fresh_class(i)(w=jnp.zeros(2))  # type: ignore[call-arg]
        treenn.freeze(module)
    assert all(len(c) <= c.maxsize for c in _caches._WEAK if isinstance(c, _caches.Cache))


def test_cache_keeps_its_seed_entries():
    cache = _caches.Cache({"seed": 1}, maxsize=3)
    cache["a"], cache["b"] = 2, 3
    cache["c"] = 4  # full: its least recently used entry goes, never a seed
    assert dict(cache) == {"seed": 1, "b": 3, "c": 4}
    treenn.clear_caches()
    assert dict(cache) == {"seed": 1}


def test_a_full_cache_drops_only_its_least_recently_used_entry():
    """Regression (issue 21, defect 15): a full cache emptied itself completely, so every
    entry in use was computed again (for `treenn.jit`, a silent recompile)."""
    cache = _caches.Cache(maxsize=8)
    for i in range(8):
        cache[i] = str(i)
    for _ in range(3):
        assert cache.get(0) == "0" and cache.get(1) == "1"  # in use
    for i in range(8, 20):  # twelve new entries past the bound
        cache[i] = str(i)
        assert cache.get(0) == "0" and cache.get(1) == "1"
    assert len(cache) == 8
    assert sorted(cache) == [0, 1, 14, 15, 16, 17, 18, 19]  # in use, then the newest
    assert cache.get(2) is None and cache.get(2, "gone") == "gone"


def test_cache_from_several_threads_stays_bounded_and_right():
    cache = _caches.Cache(maxsize=64)
    errors: list[str] = []

    def worker(t: int) -> None:
        for i in range(2000):
            key = (t, i % 100)
            value = cache.get(key)
            if value is None:
                cache[key] = value = key
            if value != key:
                errors.append(f"{key}: {value}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(cache) <= 64
