"""Trace + compile time of a ResNet-18 training step: treenn vs a hand-written jax.jit step.

`treenn.train_step(loss, optax.adam)` on `treenn.models.resnet18(1000)` (BatchNorm in
training mode, statistics collected), against the same model hand-written in plain JAX
(`_handwritten.py`: a function of dicts of arrays, from the same weights, checked to give
the same loss) under `jax.jit` + `jax.value_and_grad` + optax. Each repetition builds
fresh step functions, so nothing is cached between repetitions; the two are timed in
turn (the order alternating), through `.lower(...)` (trace and lower to StableHLO) and
`.compile()` (XLA), and the script prints medians and ratios. One warm-up repetition
(JAX's own first-use costs) is not counted.

Run: `python tests/benchmarks/compile.py [--repeats 5] [--tiny]`. Target: treenn <= 1.1x.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _handwritten as hw
import jax
import numpy as np
import optax
from _harness import Verdicts, header, median

import treenn
from treenn.models import resnet18


def time_treenn(model: Any, x: jax.Array, y: jax.Array, tx: Any) -> tuple[float, float]:
    step: Any = treenn.train_step(hw.xent, tx)
    opt = tx.init(treenn.trainable(model))
    start = time.perf_counter()
    lowered = step.lower(model, opt, x, y)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def time_raw(model: Any, x: jax.Array, y: jax.Array, tx: Any) -> tuple[float, float]:
    params, buffers = hw.arrays_of(model)
    step = jax.jit(hw.train_step(hw.resnet, tx, train=True))
    opt = tx.init(params)
    start = time.perf_counter()
    lowered = step.lower(params, buffers, opt, x, y)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def check_same(model: Any, x: jax.Array, y: jax.Array, tx: Any) -> None:
    """Both steps compute the same thing (the comparison is of like with like)."""
    params, buffers = hw.arrays_of(model)
    raw_loss = jax.jit(hw.train_step(hw.resnet, tx, train=True))(
        params, buffers, tx.init(params), x, y
    )[-1]
    loss = treenn.train_step(hw.xent, tx)(model, tx.init(treenn.trainable(model)), x, y)[-1]
    np.testing.assert_allclose(float(loss), float(raw_loss), rtol=1e-5)


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run, no timing value")
    args = parser.parse_args(argv)
    width, size, repeats = (8, 32, 1) if args.tiny else (64, 64, args.repeats)
    header(
        f"Trace + compile of a ResNet-18 training step (width {width}, 1000 classes, "
        f"batch 2 of {size}x{size}; median of {repeats}, alternating)"
    )
    key = jax.random.key(0)
    model = resnet18(1000, width=width, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, size, size, 3))
    y = jax.numpy.array([3, 7])
    tx = optax.adam(1e-3)
    check_same(model, x, y, tx)
    variants = {"hand-written jax.jit": time_raw, "treenn.train_step": time_treenn}
    for fn in variants.values():  # warm-up, not counted
        fn(model, x, y, tx)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for i in range(repeats):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name](model, x, y, tx))
    print(f"{'variant':22} {'trace+lower s':>14} {'compile s':>10} {'total s':>8} {'ratio':>6}")
    totals = {name: median([a + b for a, b in ts]) for name, ts in times.items()}
    base = totals["hand-written jax.jit"]
    for name, ts in times.items():
        lower, comp = median([a for a, _ in ts]), median([b for _, b in ts])
        print(
            f"{name:22} {lower:14.2f} {comp:10.2f} {totals[name]:8.2f} {totals[name] / base:6.3f}"
        )
    verdicts = Verdicts(smoke=args.tiny)
    ratio = totals["treenn.train_step"] / base
    verdicts.check(
        "ResNet-18 step trace + compile <= 1.1x hand-written jax.jit", ratio <= 1.1, f"{ratio:.3f}x"
    )
    return verdicts


if __name__ == "__main__":
    main()
